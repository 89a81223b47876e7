/* MX dispatch: argument checks, kernel choice, dequantization. */
#include <math.h>
#include <stdlib.h>

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

/* Element codes by value: every code's element value (scale 2^0), sorted,
 * so that a weight on the grid finds its code by binary search on
 * x / 2^se instead of the reference encoder's rounding. Zeros, duplicates
 * and anything the search does not find exactly go to the reference. */
typedef struct {
    float value[256];
    uint8_t code[256];
    int n;
} code_table;

static void code_table_build(const mxq_format *f, mxq_rounding rounding, code_table *t)
{
    t->n = 0;
    for (int c = 0; c < (1 << f->bits) && c < 256; c++) {
        float v = mxq_mx_decode(f, (uint8_t)c, 0);
        /* only codes the encoder itself gives for their value */
        if (v == 0.0f || !isfinite(v) || mxq_mx_encode(f, rounding, v, 0) != (uint8_t)c)
            continue;
        int i = t->n++;
        while (i > 0 && t->value[i - 1] > v) { /* insertion: at most 256 */
            t->value[i] = t->value[i - 1];
            t->code[i] = t->code[i - 1];
            i--;
        }
        t->value[i] = v;
        t->code[i] = (uint8_t)c;
    }
    for (int i = 1; i < t->n; i++) /* two codes of one value: leave it to the reference */
        if (t->value[i] == t->value[i - 1])
            t->value[i] = t->value[i - 1] = NAN;
}

/* The code of x against scale 2^se: from the table when x / 2^se is an
 * element value exactly, else the reference encoder. */
static uint8_t encode_on_grid(const mxq_format *f, mxq_rounding rounding, const code_table *t, float x, int se)
{
    float v = ldexpf(x, -se);
    int lo = 0, hi = t->n - 1;
    while (x != 0.0f && lo <= hi) {
        int mid = (lo + hi) / 2;
        if (t->value[mid] == v && ldexpf(v, se) == x)
            return t->code[mid];
        if (t->value[mid] < v)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return mxq_mx_encode(f, rounding, x, se);
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
            for (size_t c = b * (size_t)spec->block; c < c1; c++) {
                if (se == MXQ_SE_NAN) {
                    codes[c] = 0;
                    continue;
                }
                codes[c] = encode_on_grid(f, spec->rounding, table, row[c], se);
                float back = mxq_mx_decode(f, codes[c], se);
                CHECK(ctx, back == row[c] || (back == 0.0f && row[c] == 0.0f), MXQ_ERR_INTERNAL,
                      "weight %g at [%zu, %zu] is not on the %s grid of scale 2^%d (decodes to %g)", (double)row[c], r,
                      c, f->name, se, (double)back);
            }
        }
        mxq_mx_pack_row(f, codes, cols, packed + r * row_bytes);
    }
fail:
    free(codes);
    free(table);
    return status;
}
