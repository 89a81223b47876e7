/* MX dispatch: argument checks, kernel choice, dequantization. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "formats/mx_kernels.h"
#include "mxq/mx.h"

int mxq_cpu_has_avx512(void)
{
#if defined(__x86_64__) && defined(MXQ_HAVE_AVX512_KERNEL)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

static mxq_mx_rows_kernel pick_kernel(mxq_kernel kernel)
{
#ifdef MXQ_HAVE_AVX512_KERNEL
    if (mxq_kernel_resolve(kernel) == MXQ_KERNEL_AVX512)
        return mxq_mx_quantize_rows_avx512;
#else
    (void)kernel;
#endif
    return mxq_mx_quantize_rows_reference;
}

mxq_status mxq_mx_quantize_rows(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *in, size_t rows,
                                size_t cols, uint8_t *packed, uint8_t *scales, float *dequant)
{
    mxq_status status = MXQ_OK;
    uint8_t *codes = NULL;
    CALL(ctx, mxq_mx_spec_check(ctx, spec));
    if (rows == 0 || cols == 0)
        return MXQ_OK;
    CHECK(ctx, in != NULL, MXQ_ERR_ARG, "MX quantize: input is NULL");
    CHECK(ctx, rows <= SIZE_MAX / cols, MXQ_ERR_ARG, "MX quantize: %zu x %zu elements overflow", rows, cols);
    codes = malloc(cols);
    CHECK_ALLOC(ctx, codes, cols, "one row of MX element codes");
    pick_kernel(spec->kernel)(spec->format, spec->block, spec->rounding, in, rows, cols, packed, scales,
                              dequant, codes);
fail:
    free(codes);
    return status;
}

mxq_status mxq_mx_dequantize_rows(mxq_ctx *ctx, const mxq_mx_spec *spec, const uint8_t *packed,
                                  const uint8_t *scales, size_t rows, size_t cols, float *out)
{
    mxq_status status = MXQ_OK;
    uint8_t *codes = NULL;
    CALL(ctx, mxq_mx_spec_check(ctx, spec));
    if (rows == 0 || cols == 0)
        return MXQ_OK;
    CHECK(ctx, packed && scales && out, MXQ_ERR_ARG, "MX dequantize: NULL buffer");
    codes = malloc(cols);
    CHECK_ALLOC(ctx, codes, cols, "one row of MX element codes");

    /* Every code's value at scale 1, from the reference decoder. Multiplying
     * by 2^se afterwards is exact in float32 (few significant bits, result
     * never below 2^-149), so this equals decode(code, se). */
    const mxq_format *format = spec->format;
    float unit_value[256];
    for (unsigned c = 0; c < (1u << format->bits); c++)
        unit_value[c] = mxq_mx_decode(format, (uint8_t)c, 0);

    const size_t nblocks = mxq_mx_blocks_per_row(cols, spec->block);
    const size_t row_bytes = mxq_mx_packed_row_bytes(format, cols);
    for (size_t r = 0; r < rows; r++) {
        mxq_mx_unpack_row(format, packed + r * row_bytes, cols, codes);
        for (size_t b = 0; b < nblocks; b++) {
            size_t c0 = b * (size_t)spec->block;
            size_t c1 = c0 + (size_t)spec->block < cols ? c0 + (size_t)spec->block : cols;
            uint8_t scale = scales[r * nblocks + b];
            float *dst = out + r * cols;
            if (scale == MXQ_E8M0_NAN) {
                for (size_t c = c0; c < c1; c++)
                    dst[c] = NAN;
                continue;
            }
            float factor = ldexpf(1.0f, (int)scale - 127);
            for (size_t c = c0; c < c1; c++)
                dst[c] = unit_value[codes[c]] * factor;
        }
    }
fail:
    free(codes);
    return status;
}

/* Element codes by value: every code's element value (scale 2^0) in a
 * small open-addressing hash on its float bits, so that a weight on the
 * grid finds its code from x / 2^se with one well-predicted probe (a binary
 * search mispredicts at every step: 20 ns an element). Zeros, values two
 * codes share and codes the encoder never gives stay out: the reference
 * encoder handles those. */
enum { CODE_SLOTS = 1024 };

typedef struct {
    float value[CODE_SLOTS];
    int16_t code[CODE_SLOTS]; /* -1: empty */
} code_table;

static uint32_t float_bits(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
}

static size_t code_slot(float v)
{
    return (size_t)((float_bits(v) * 0x9E3779B1u) >> 22) % CODE_SLOTS;
}

static void code_table_build(const mxq_format *f, mxq_rounding rounding, code_table *t)
{
    for (size_t i = 0; i < CODE_SLOTS; i++)
        t->code[i] = -1;
    for (int c = 0; c < (1 << f->bits) && c < 256; c++) {
        float v = mxq_mx_decode(f, (uint8_t)c, 0);
        if (v == 0.0f || !isfinite(v) || mxq_mx_encode(f, rounding, v, 0) != (uint8_t)c)
            continue;
        size_t i = code_slot(v);
        while (t->code[i] != -1 && t->value[i] != v)
            i = (i + 1) % CODE_SLOTS;
        t->code[i] = t->code[i] == -1 ? (int16_t)c : (int16_t)-2; /* -2: shared, never matched */
        t->value[i] = v;
    }
}

/* The code of x on the grid of 2^se, from the table; -1 when x / 2^se is
 * not exactly one of its values (zero, off-grid, out of float range).
 * down = 2^-se, up = 2^se, both exact (se within the normal range). */
static int table_code(const code_table *t, float x, float down, float up)
{
    float v = x * down;
    for (size_t i = code_slot(v); t->code[i] != -1; i = (i + 1) % CODE_SLOTS)
        if (t->value[i] == v)
            return t->code[i] >= 0 && v * up == x ? t->code[i] : -1;
    return -1;
}

/* One block's codes: the table where it answers, else the reference
 * encoder, whose result must decode to x. */
static mxq_status encode_block(mxq_ctx *ctx, const mxq_mx_spec *spec, const code_table *t, const float *x, size_t n,
                               int se, uint8_t *codes)
{
    mxq_status status = MXQ_OK;
    const int exact = se > -126 && se < 127;
    const float down = exact ? ldexpf(1.0f, -se) : 0.0f, up = exact ? ldexpf(1.0f, se) : 0.0f;
    for (size_t c = 0; c < n; c++) {
        int code = exact && x[c] != 0.0f ? table_code(t, x[c], down, up) : -1;
        if (code >= 0) {
            codes[c] = (uint8_t)code;
            continue;
        }
        codes[c] = mxq_mx_encode(spec->format, spec->rounding, x[c], se);
        float back = mxq_mx_decode(spec->format, codes[c], se);
        CHECK(ctx, back == x[c] || (back == 0.0f && x[c] == 0.0f), MXQ_ERR_INTERNAL,
              "weight %g at column %zu of its block is not on the %s grid of scale 2^%d (decodes to %g)", (double)x[c],
              c, spec->format->name, se, (double)back);
    }
fail:
    return status;
}

mxq_status mxq_mx_pack_with_scales(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *w, size_t rows, size_t cols,
                                   const uint8_t *scales, uint8_t *packed)
{
    mxq_status status = MXQ_OK;
    const mxq_format *f = spec->format;
    const size_t blocks = mxq_mx_blocks_per_row(cols, spec->block), row_bytes = mxq_mx_packed_row_bytes(f, cols);
    uint8_t *codes = malloc(cols + 1);
    code_table *table = malloc(sizeof(code_table));
    CHECK_ALLOC(ctx, codes && table, cols + sizeof(code_table), "element codes");
    code_table_build(f, spec->rounding, table);
    for (size_t r = 0; r < rows; r++) {
        const float *row = w + r * cols;
        for (size_t b = 0; b < blocks; b++) {
            int se = scales[r * blocks + b] == 0xFF ? MXQ_SE_NAN : (int)scales[r * blocks + b] - 127;
            size_t c1 = (b + 1) * (size_t)spec->block < cols ? (b + 1) * (size_t)spec->block : cols;
            size_t c0 = b * (size_t)spec->block;
            if (se == MXQ_SE_NAN)
                memset(codes + c0, 0, c1 - c0);
            else
                CALL_IN(ctx, encode_block(ctx, spec, table, row + c0, c1 - c0, se, codes + c0),
                        "row %zu, the block from column %zu", r, c0);
        }
        mxq_mx_pack_row(f, codes, cols, packed + r * row_bytes);
    }
fail:
    free(codes);
    free(table);
    return status;
}
