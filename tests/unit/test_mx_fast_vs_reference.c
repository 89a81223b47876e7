/* The fast kernel against the reference kernel (the specification): packed
 * bytes, scales and dequantized floats identical, bit for bit, on millions of
 * random and adversarial values, for every format, rounding and a spread of
 * block sizes including odd ones and partial last blocks. */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mxq/mxq.h"
#include "testutil.h"

static float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Row magnitudes from 1e-42 (FP32 subnormal) to 1e38, normal values. */
static void fill_random(tu_rng *rng, float *x, size_t rows, size_t cols)
{
    for (size_t r = 0; r < rows; r++) {
        double magnitude = pow(10.0, -42.0 + 80.0 * (double)r / (double)(rows > 1 ? rows - 1 : 1));
        for (size_t c = 0; c < cols; c++)
            x[r * cols + c] = (float)(tu_rng_normal(rng) * magnitude);
    }
}

/* Values built to sit on the hard spots: exact grid ties, one ulp either
 * side of ties, powers of two and their neighbours, saturation boundaries,
 * FP32 subnormals, +-0, NaN/Inf, FLT_MAX. */
static void fill_adversarial(tu_rng *rng, const mxq_format *f, float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t pick = tu_rng_next(rng);
        int kind = (int)(pick % 12);
        int se = (int)((pick >> 8) % 60) - 30;
        double step_exp = f->is_int ? -f->mbits : (int)((pick >> 16) % (unsigned)(f->emax - f->emin + 1)) + f->emin - f->mbits;
        double step = ldexp(1.0, (int)step_exp + se);
        double k = (double)((pick >> 24) % (unsigned)(2 * f->max_code + 2));
        double sign = (pick >> 40) & 1 ? -1.0 : 1.0;
        float v;
        switch (kind) {
        case 0: v = (float)(sign * (k + 0.5) * step); break;                        /* exact tie */
        case 1: v = nextafterf((float)(sign * (k + 0.5) * step), 0.0f); break;      /* just inside */
        case 2: v = nextafterf((float)(sign * (k + 0.5) * step), (float)(sign * INFINITY)); break;
        case 3: v = (float)(sign * ldexp(1.0, se)); break;                          /* power of two */
        case 4: v = nextafterf((float)(sign * ldexp(1.0, se)), 0.0f); break;        /* just below */
        case 5: v = bits_to_float((uint32_t)(pick >> 32) & 0x807FFFFFu); break;     /* FP32 subnormal */
        case 6: v = (pick >> 20) & 1 ? 0.0f : -0.0f; break;
        case 7: v = (float)(sign * f->max * ldexp(1.0, se)); break;                 /* saturation edge */
        case 8: v = nextafterf((float)(sign * (f->max + step / ldexp(1.0, se) * 0.5) * ldexp(1.0, se)), 0.0f); break;
        case 9: v = (pick >> 20) % 64 == 0 ? ((pick >> 27) & 1 ? NAN : -INFINITY) : (float)(sign * k * step); break;
        case 10: v = (float)(sign * (pick >> 20 & 1 ? FLT_MAX : nextafterf(FLT_MIN, 0.0f))); break;
        default: v = (float)(sign * tu_rng_uniform(rng) * ldexp(1.0, se)); break;
        }
        x[i] = v;
    }
}

typedef struct {
    size_t elements;
    size_t mismatches;
} compare_stats;

static void compare_kernels(const mxq_format *f, mxq_rounding rounding, int block, const float *x, size_t rows,
                            size_t cols, compare_stats *stats)
{
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    size_t nb = mxq_mx_blocks_per_row(cols, block), pb = mxq_mx_packed_row_bytes(f, cols);
    uint8_t *packed[2], *scales[2];
    float *deq[2];
    mxq_kernel kernels[2] = {MXQ_KERNEL_REFERENCE, MXQ_KERNEL_AVX512};
    for (int k = 0; k < 2; k++) {
        packed[k] = malloc(rows * pb);
        scales[k] = malloc(rows * nb);
        deq[k] = malloc(rows * cols * sizeof(float));
        mxq_mx_spec spec = {f, block, rounding, kernels[k]};
        assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, x, rows, cols, packed[k], scales[k], deq[k]), MXQ_OK);
    }
    size_t bad = 0;
    for (size_t i = 0; i < rows * cols; i++) {
        uint32_t a, b;
        memcpy(&a, &deq[0][i], 4);
        memcpy(&b, &deq[1][i], 4);
        if (a != b && !(isnan(deq[0][i]) && isnan(deq[1][i]))) {
            if (bad++ < 3)
                print_message("# %s %s block %d: x=%a ref %a fast %a\n", f->name, mxq_rounding_name(rounding), block,
                              (double)x[i], (double)deq[0][i], (double)deq[1][i]);
        }
    }
    if (memcmp(scales[0], scales[1], rows * nb) != 0)
        bad++;
    if (memcmp(packed[0], packed[1], rows * pb) != 0)
        bad++;
    stats->elements += rows * cols;
    stats->mismatches += bad;
    for (int k = 0; k < 2; k++) {
        free(packed[k]);
        free(scales[k]);
        free(deq[k]);
    }
    mxq_ctx_destroy(ctx);
}

static const int test_blocks[] = {1, 2, 3, 7, 16, 17, 32, 33, 64, 100, 128, 4096};

static void run_for_format(mxq_format_id id)
{
    if (!mxq_kernel_available(MXQ_KERNEL_AVX512))
        skip();
    const mxq_format *f = mxq_format_get(id);
    tu_rng rng = {0xC0FFEEull + (uint64_t)id};
    compare_stats stats = {0, 0};
    const size_t rows = 48, cols = 4100; /* not a multiple of 16, 64 or any block */
    float *x = malloc(rows * cols * sizeof(float));
    for (int rnd = 0; rnd < 2; rnd++) {
        for (size_t b = 0; b < sizeof(test_blocks) / sizeof(test_blocks[0]); b++) {
            /* random rows, then adversarial rows, each through both kernels */
            fill_random(&rng, x, rows, cols);
            compare_kernels(f, (mxq_rounding)rnd, test_blocks[b], x, rows, cols, &stats);
            fill_adversarial(&rng, f, x, rows * cols);
            compare_kernels(f, (mxq_rounding)rnd, test_blocks[b], x, rows, cols, &stats);
        }
    }
    free(x);
    print_message("# %s: %zu values compared, %zu mismatches\n", f->name, stats.elements, stats.mismatches);
    assert_true(stats.elements >= 4000000);
    assert_int_equal(stats.mismatches, 0);
}

#define FORMAT_TEST(fn, id) \
    static void fn(void **state) { (void)state; run_for_format(id); }
FORMAT_TEST(test_fast_mxint8, MXQ_MXINT8)
FORMAT_TEST(test_fast_mxint4, MXQ_MXINT4)
FORMAT_TEST(test_fast_mxint3, MXQ_MXINT3)
FORMAT_TEST(test_fast_mxint2, MXQ_MXINT2)
FORMAT_TEST(test_fast_mxfp8_e4m3, MXQ_MXFP8_E4M3)
FORMAT_TEST(test_fast_mxfp8_e5m2, MXQ_MXFP8_E5M2)
FORMAT_TEST(test_fast_mxfp6_e3m2, MXQ_MXFP6_E3M2)
FORMAT_TEST(test_fast_mxfp6_e2m3, MXQ_MXFP6_E2M3)
FORMAT_TEST(test_fast_mxfp4_e2m1, MXQ_MXFP4_E2M1)

/* Every float32 bit pattern of a sparse but exhaustive sweep over exponents
 * and low mantissa bits, as single-element blocks and within one block. */
static void test_fast_exponent_sweep(void **state)
{
    (void)state;
    if (!mxq_kernel_available(MXQ_KERNEL_AVX512))
        skip();
    const size_t n = 256 * 64 * 2;
    float *x = malloc(n * sizeof(float));
    size_t i = 0;
    for (uint32_t e = 0; e < 256; e++)
        for (uint32_t m = 0; m < 64; m++)
            for (uint32_t s = 0; s < 2; s++) {
                uint32_t mant = m < 32 ? m : (0x7FFFFFu - (m - 32)); /* lowest and highest mantissas */
                x[i++] = bits_to_float(s << 31 | e << 23 | mant);
            }
    compare_stats stats = {0, 0};
    for (int id = 0; id < MXQ_FORMAT_COUNT; id++)
        for (int rnd = 0; rnd < 2; rnd++) {
            compare_kernels(mxq_format_get((mxq_format_id)id), (mxq_rounding)rnd, 1, x, 1, n, &stats);
            compare_kernels(mxq_format_get((mxq_format_id)id), (mxq_rounding)rnd, 64, x, 1, n, &stats);
        }
    free(x);
    assert_int_equal(stats.mismatches, 0);
}

/* Packing GPTQ's output (values already on the grid of given scales) must
 * give the bytes the reference quantizer gives for the same values: over
 * the finite patterns of the sweep and every format, rounding and block
 * size 1, 32, 128. */
static void test_pack_with_scales_equals_reference(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    const size_t n = 256 * 64 * 2;
    float *x = malloc(n * sizeof(float)), *deq = malloc(n * sizeof(float));
    uint8_t *packed = malloc(n), *again = malloc(n), *scales = malloc(n);
    size_t i = 0, checked = 0;
    for (uint32_t e = 0; e < 255; e++) /* 255: Inf and NaN */
        for (uint32_t m = 0; m < 64; m++)
            for (uint32_t s = 0; s < 2; s++)
                x[i++] = bits_to_float(s << 31 | e << 23 | (m < 32 ? m : (0x7FFFFFu - (m - 32))));
    const size_t count = i;
    const int blocks[] = {1, 32, 128};
    for (int id = 0; id < MXQ_FORMAT_COUNT; id++)
        for (int rnd = 0; rnd < 2; rnd++)
            for (int b = 0; b < 3; b++) {
                mxq_mx_spec spec = {mxq_format_get((mxq_format_id)id), blocks[b], (mxq_rounding)rnd,
                                    MXQ_KERNEL_REFERENCE};
                size_t bytes = mxq_mx_packed_row_bytes(spec.format, count);
                assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, x, 1, count, packed, scales, deq), MXQ_OK);
                if (mxq_mx_pack_with_scales(ctx, &spec, deq, 1, count, scales, again) != MXQ_OK)
                    fail_msg("%s block %d: %s", spec.format->name, blocks[b], mxq_error_message(ctx));
                assert_memory_equal(packed, again, bytes);
                checked += count;
            }
    print_message("# %zu values packed as the reference packs them\n", checked);
    free(x);
    free(deq);
    free(packed);
    free(again);
    free(scales);
    mxq_ctx_destroy(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fast_mxint8),      cmocka_unit_test(test_fast_mxint4),
        cmocka_unit_test(test_fast_mxint3),      cmocka_unit_test(test_fast_mxint2),
        cmocka_unit_test(test_fast_mxfp8_e4m3),  cmocka_unit_test(test_fast_mxfp8_e5m2),
        cmocka_unit_test(test_fast_mxfp6_e3m2),  cmocka_unit_test(test_fast_mxfp6_e2m3),
        cmocka_unit_test(test_fast_mxfp4_e2m1),  cmocka_unit_test(test_fast_exponent_sweep),
        cmocka_unit_test(test_pack_with_scales_equals_reference),
    };
    return cmocka_run_group_tests_name("mx_fast_vs_reference", tests, NULL, NULL);
}
