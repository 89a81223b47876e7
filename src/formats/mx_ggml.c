#include "formats/mx_ggml.h"

#include <string.h>

/* ggml blocks are little-endian, as this host */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF blocks are written in host byte order");

/* The ggml types, defined once: name, elements and bytes per block. */
static const struct {
    mxq_ggml_type type;
    const char *name;
    int block;
    int block_bytes;
} ggml_types[] = {
    {MXQ_GGML_F32, "F32", 1, 4},
    {MXQ_GGML_F16, "F16", 1, 2},
    {MXQ_GGML_Q4_0, "Q4_0", MXQ_GGML_BLOCK, 2 + MXQ_GGML_BLOCK / 2},  /* f16 d, 4-bit codes */
    {MXQ_GGML_Q8_0, "Q8_0", MXQ_GGML_BLOCK, 2 + MXQ_GGML_BLOCK},      /* f16 d, int8 codes */
    {MXQ_GGML_BF16, "BF16", 1, 2},
    {MXQ_GGML_MXFP4, "MXFP4", MXQ_GGML_BLOCK, 1 + MXQ_GGML_BLOCK / 2}, /* E8M0 byte, E2M1 codes */
};

static int type_index(mxq_ggml_type type)
{
    for (size_t i = 0; i < sizeof(ggml_types) / sizeof(ggml_types[0]); i++)
        if (ggml_types[i].type == type)
            return (int)i;
    return -1;
}

size_t mxq_ggml_row_bytes(mxq_ggml_type type, int64_t n)
{
    int i = type_index(type);
    size_t bytes = 0;
    if (i < 0 || n < 0 || n % ggml_types[i].block != 0 ||
        __builtin_mul_overflow((size_t)(n / ggml_types[i].block), (size_t)ggml_types[i].block_bytes, &bytes))
        return 0;
    return bytes;
}

const char *mxq_ggml_type_name(mxq_ggml_type type)
{
    int i = type_index(type);
    return i < 0 ? "?" : ggml_types[i].name;
}

int mxq_mx_ggml_blocks_fit(size_t cols, int block)
{
    return cols % MXQ_GGML_BLOCK == 0 && block % MXQ_GGML_BLOCK == 0;
}

/* f16 bits of 2^e, or 0 if 2^e is not an f16 value (normal from 2^-14 to
 * 2^15, subnormal down to 2^-24). */
static uint16_t f16_power_of_two(int e)
{
    if (e >= -14 && e <= 15)
        return (uint16_t)((e + 15) << 10);
    if (e >= -24 && e < -14)
        return (uint16_t)(1u << (e + 24));
    return 0;
}

/* k of an integer element code: two's complement in format->bits bits */
static int int_code_value(const mxq_format *format, uint8_t code)
{
    const int bits = format->bits, sign = 1 << (bits - 1);
    const int v = code & ((1 << bits) - 1);
    return v & sign ? v - 2 * sign : v;
}

static int all_zero(const uint8_t *codes)
{
    for (int j = 0; j < MXQ_GGML_BLOCK; j++)
        if (codes[j])
            return 0;
    return 1;
}

int mxq_mx_ggml_block_fits(const mxq_format *format, const uint8_t *codes, int se)
{
    if (se == MXQ_SE_NAN)
        return 0;
    if (format->id == MXQ_MXFP4_E2M1)
        return 1; /* the same E8M0 byte */
    return f16_power_of_two(se - format->mbits) != 0 || all_zero(codes);
}

/* d of a block that fits: 1.0 for an all-zero block outside f16; 0 for
 * one that does not fit */
static uint16_t block_d(const mxq_format *format, const uint8_t *codes, int se)
{
    if (se == MXQ_SE_NAN)
        return 0; /* a NaN block has zero codes: only BF16 keeps its NaN */
    const uint16_t d = f16_power_of_two(se - format->mbits);
    return d ? d : all_zero(codes) ? 0x3C00 : 0;
}

static int scale_exponent(const uint8_t *scales, size_t col, int block) { return (int)scales[col / (size_t)block] - 127; }

/* Q4_0's 16 bytes: q = k + 8, element j low, element j + 16 high */
static void pack_q4_0(const mxq_format *format, const uint8_t *codes, uint8_t *dst)
{
    const int half = MXQ_GGML_BLOCK / 2;
    for (int j = 0; j < half; j++) {
        const int lo = int_code_value(format, codes[j]) + 8, hi = int_code_value(format, codes[j + half]) + 8;
        dst[j] = (uint8_t)(lo | hi << 4);
    }
}

/* Q8_0's 32 bytes: q = k */
static void pack_q8_0(const mxq_format *format, const uint8_t *codes, uint8_t *dst)
{
    for (int j = 0; j < MXQ_GGML_BLOCK; j++)
        dst[j] = (uint8_t)(int8_t)int_code_value(format, codes[j]);
}

/* Blocks of `type` that start with an f16 scale d (2 bytes, little-endian
 * as this host) followed by codes that `pack` writes; 0 if a block's d is
 * not an f16 value. */
static int row_to_f16_scaled_blocks(mxq_ggml_type type, const mxq_format *format, const uint8_t *codes,
                                    const uint8_t *scales, size_t cols, int block,
                                    void (*pack)(const mxq_format *, const uint8_t *, uint8_t *), uint8_t *out)
{
    const size_t block_bytes = mxq_ggml_row_bytes(type, MXQ_GGML_BLOCK);
    for (size_t b = 0; b < cols / MXQ_GGML_BLOCK; b++) {
        const size_t first = b * MXQ_GGML_BLOCK;
        const uint16_t d = block_d(format, codes + first, scale_exponent(scales, first, block));
        if (!d)
            return 0;
        uint8_t *dst = out + b * block_bytes;
        memcpy(dst, &d, 2);
        pack(format, codes + first, dst + 2);
    }
    return 1;
}

int mxq_mx_row_to_q4_0(const mxq_format *format, const uint8_t *codes, const uint8_t *scales, size_t cols, int block,
                       uint8_t *out)
{
    return row_to_f16_scaled_blocks(MXQ_GGML_Q4_0, format, codes, scales, cols, block, pack_q4_0, out);
}

int mxq_mx_row_to_q8_0(const mxq_format *format, const uint8_t *codes, const uint8_t *scales, size_t cols, int block,
                       uint8_t *out)
{
    return row_to_f16_scaled_blocks(MXQ_GGML_Q8_0, format, codes, scales, cols, block, pack_q8_0, out);
}

int mxq_mx_row_to_mxfp4(const uint8_t *codes, const uint8_t *scales, size_t cols, int block, uint8_t *out)
{
    const size_t block_bytes = mxq_ggml_row_bytes(MXQ_GGML_MXFP4, MXQ_GGML_BLOCK);
    const int half = MXQ_GGML_BLOCK / 2;
    for (size_t b = 0; b < cols / MXQ_GGML_BLOCK; b++) {
        const size_t first = b * MXQ_GGML_BLOCK;
        uint8_t *dst = out + b * block_bytes;
        if (scale_exponent(scales, first, block) == MXQ_SE_NAN)
            return 0; /* ggml reads E8M0 0xFF as infinity, not NaN */
        dst[0] = scales[first / (size_t)block];
        for (int j = 0; j < half; j++)
            dst[1 + j] = (uint8_t)((codes[first + j] & 0xF) | (codes[first + j + half] & 0xF) << 4);
    }
    return 1;
}

int mxq_mx_row_to_bf16(const mxq_format *format, const uint8_t *codes, const uint8_t *scales, size_t cols, int block,
                       uint16_t *out)
{
    for (size_t c = 0; c < cols; c++) {
        const float v = mxq_mx_decode(format, codes[c], scale_exponent(scales, c, block));
        uint32_t bits;
        memcpy(&bits, &v, 4);
        if (bits & 0xFFFF)
            return 0; /* an MX value has at most 8 significant bits: only below 2^-133 can it lose any */
        out[c] = (uint16_t)(bits >> 16);
    }
    return 1;
}
