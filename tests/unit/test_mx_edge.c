/* Edge rows of the MX rule (docs/design.md section 2), with expectations worked
 * out by hand from the rule, not from mxq. Each case runs through every
 * available kernel. */
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

#define MAX_N 64

typedef struct {
    float value[MAX_N];
    uint8_t scale[MAX_N];
    uint8_t packed[MAX_N];
} result;

/* Quantize one row with every kernel; all must agree byte for byte. */
static result quantize_row(const char *format, mxq_rounding rounding, int block, const float *in, size_t n)
{
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    result results[2];
    memset(results, 0, sizeof(results));
    mxq_kernel kernels[2] = {MXQ_KERNEL_REFERENCE, MXQ_KERNEL_AVX512};
    int nk = mxq_kernel_available(MXQ_KERNEL_AVX512) ? 2 : 1;
    for (int k = 0; k < nk; k++) {
        mxq_mx_spec spec = {mxq_format_by_name(format), block, rounding, kernels[k]};
        assert_non_null(spec.format);
        assert_int_equal(
            mxq_mx_quantize_rows(ctx, &spec, in, 1, n, results[k].packed, results[k].scale, results[k].value),
            MXQ_OK);
    }
    if (nk == 2) {
        assert_memory_equal(results[0].value, results[1].value, n * sizeof(float));
        assert_memory_equal(results[0].scale, results[1].scale, mxq_mx_blocks_per_row(n, block));
        assert_memory_equal(results[0].packed, results[1].packed,
                            mxq_mx_packed_row_bytes(mxq_format_by_name(format), n));
    }
    mxq_ctx_destroy(ctx);
    return results[0];
}

static void assert_values(const result *r, const float *expected, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!tu_same_float(r->value[i], expected[i]))
            fail_msg("element %zu: got %a (%g), expected %a (%g)", i, (double)r->value[i], (double)r->value[i],
                     (double)expected[i], (double)expected[i]);
    }
}

static void test_all_zero_block(void **state)
{
    (void)state;
    float in[8] = {0};
    in[4] = 1.0f; /* second block of 4 is not zero */
    /* Integers: emax 0, so se = -126 -> byte 1. */
    result r = quantize_row("mxint8", MXQ_ROUND_EVEN, 4, in, 8);
    assert_int_equal(r.scale[0], 1);
    assert_int_equal(r.scale[1], 127);
    float expected[8] = {0, 0, 0, 0, 1, 0, 0, 0};
    assert_values(&r, expected, 8);
    /* Floats: -126 - emax < -127 clamps to -127 -> byte 0. */
    r = quantize_row("mxfp4_e2m1", MXQ_ROUND_EVEN, 4, in, 8);
    assert_int_equal(r.scale[0], 0);
    assert_int_equal(r.scale[1], 127 - 2);
    r = quantize_row("mxfp8_e5m2", MXQ_ROUND_EVEN, 4, in, 8);
    assert_int_equal(r.scale[0], 0);
}

static void check_special_block(float special)
{
    float in[8] = {1.0f, special, 2.0f, 3.0f, 1.0f, 2.0f, 3.0f, 4.0f};
    const char *formats[] = {"mxint8", "mxint4", "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1"};
    for (size_t f = 0; f < sizeof(formats) / sizeof(formats[0]); f++) {
        result r = quantize_row(formats[f], MXQ_ROUND_EVEN, 4, in, 8);
        assert_int_equal(r.scale[0], 0xFF);
        for (int i = 0; i < 4; i++)
            assert_true(isnan(r.value[i])); /* the whole block, finite neighbours too */
        assert_int_not_equal(r.scale[1], 0xFF);
        for (int i = 4; i < 8; i++)
            assert_true(isfinite(r.value[i]));
    }
}

static void test_nan_block(void **state)
{
    (void)state;
    check_special_block(NAN);
    check_special_block(-NAN);
}

static void test_inf_block(void **state)
{
    (void)state;
    check_special_block(INFINITY);
    check_special_block(-INFINITY);
}

/* floor(log2(amax)) must come from the exponent bits: just below 2^k it is
 * k-1 (float32 log2f rounds to k there). */
static void test_just_below_power_of_two(void **state)
{
    (void)state;
    float below8 = nextafterf(8.0f, 0.0f);
    float in[2] = {below8, 1.0f};
    /* mxint8: e = 2 -> byte 129; below8 / 4 = 1.99999988 -> 128/64 saturates to 127/64. */
    result r = quantize_row("mxint8", MXQ_ROUND_EVEN, 2, in, 2);
    assert_int_equal(r.scale[0], 127 + 2);
    float expected[2] = {127.0f / 64 * 4, 1.0f};
    assert_values(&r, expected, 2);

    /* mxfp4: amax just below 1 -> e = -1, se = -3; v = 7.9999995 rounds to 8
     * (grid step 2 in [4, 8)) and saturates to 6: 6 * 2^-3. */
    float below1 = nextafterf(1.0f, 0.0f);
    r = quantize_row("mxfp4_e2m1", MXQ_ROUND_EVEN, 1, &below1, 1);
    assert_int_equal(r.scale[0], 127 - 3);
    float e1[1] = {0.75f};
    assert_values(&r, e1, 1);

    /* A large power of two minus one ulp: 2^100 - ulp -> e = 99. */
    float big = nextafterf(0x1p100f, 0.0f);
    r = quantize_row("mxfp8_e4m3", MXQ_ROUND_EVEN, 1, &big, 1);
    assert_int_equal(r.scale[0], 127 + 99 - 8);
    /* v = 511.99997 -> step 32, t = 15.999999 -> 16 -> 512 saturates to 448 */
    float e2[1] = {448.0f * 0x1p91f};
    assert_values(&r, e2, 1);

    /* Exactly a power of two has e = k. */
    float p8 = 8.0f;
    r = quantize_row("mxint8", MXQ_ROUND_EVEN, 1, &p8, 1);
    assert_int_equal(r.scale[0], 127 + 3);
    float e3[1] = {8.0f};
    assert_values(&r, e3, 1);
}

static void test_fp32_subnormals(void **state)
{
    (void)state;
    /* amax = 2^-127 (an FP32 subnormal): se = -127 (byte 0), elements exact. */
    float in[3] = {0x1p-127f, 3 * 0x1p-129f, -0x1p-149f};
    result r = quantize_row("mxint8", MXQ_ROUND_EVEN, 3, in, 3);
    assert_int_equal(r.scale[0], 0);
    /* 2^-149 / 2^-127 = 2^-22, far below half a step (2^-7): rounds to zero. */
    float expected[3] = {0x1p-127f, 3 * 0x1p-129f, 0.0f};
    assert_values(&r, expected, 3);

    r = quantize_row("mxfp8_e4m3", MXQ_ROUND_EVEN, 3, in, 3);
    assert_int_equal(r.scale[0], 0); /* -127 - 8 clamps to -127 */
    assert_values(&r, expected, 3);

    /* The largest subnormal: exact floor(log2) is -127 (microxcaling's float
     * log2 says -126). */
    float largest_sub = nextafterf(FLT_MIN, 0.0f);
    r = quantize_row("mxint8", MXQ_ROUND_EVEN, 1, &largest_sub, 1);
    assert_int_equal(r.scale[0], 0);
    /* 0x7fffff * 2^-149 / 2^-127 = 1.99999976 -> saturates to 127/64 */
    float e1[1] = {127.0f / 64 * 0x1p-127f};
    assert_values(&r, e1, 1);

    /* The smallest subnormal alone: e = -149, se clamps to -127, value is
     * below half a step: zero. */
    float tiny = 0x1p-149f;
    r = quantize_row("mxint4", MXQ_ROUND_EVEN, 1, &tiny, 1);
    assert_int_equal(r.scale[0], 0);
    float zero[1] = {0.0f};
    assert_values(&r, zero, 1);
}

static void test_huge_values_saturate(void **state)
{
    (void)state;
    float in[2] = {FLT_MAX, -FLT_MAX};
    /* mxint8: e = 127, byte 254; FLT_MAX / 2^127 = 1.99999988 -> saturates. */
    result r = quantize_row("mxint8", MXQ_ROUND_EVEN, 2, in, 2);
    assert_int_equal(r.scale[0], 254);
    float expected[2] = {127.0f / 64 * 0x1p127f, -127.0f / 64 * 0x1p127f};
    assert_values(&r, expected, 2);

    r = quantize_row("mxfp8_e4m3", MXQ_ROUND_NEAREST, 2, in, 2);
    assert_int_equal(r.scale[0], 127 + 127 - 8);
    float e2[2] = {448.0f * 0x1p119f, -448.0f * 0x1p119f};
    assert_values(&r, e2, 2);

    r = quantize_row("mxfp8_e5m2", MXQ_ROUND_EVEN, 2, in, 2);
    assert_int_equal(r.scale[0], 127 + 127 - 15);
    float e3[2] = {57344.0f * 0x1p112f, -57344.0f * 0x1p112f};
    assert_values(&r, e3, 2);

    /* A value far above the others in its block saturates only where the
     * grid is exceeded: mxint4 [1.9] -> 7/4 (t = 7.6 rounds to 8, clamped to 7). */
    float v = 1.9f;
    r = quantize_row("mxint4", MXQ_ROUND_EVEN, 1, &v, 1);
    float e4[1] = {1.75f};
    assert_values(&r, e4, 1);
}

static void test_ties(void **state)
{
    (void)state;
    /* mxint4, se = 0 (amax 1.0), step 1/4. */
    float in[4] = {1.0f, 0.125f, 0.375f, -0.625f};
    result even = quantize_row("mxint4", MXQ_ROUND_EVEN, 4, in, 4);
    float e_even[4] = {1.0f, 0.0f, 0.5f, -0.5f};
    assert_values(&even, e_even, 4);
    result nearest = quantize_row("mxint4", MXQ_ROUND_NEAREST, 4, in, 4);
    float e_nearest[4] = {1.0f, 0.25f, 0.5f, -0.75f};
    assert_values(&nearest, e_nearest, 4);

    /* mxfp4 e2m1, amax 4 -> se = 0. 2.5 lies between 2 and 3, 5 between 4
     * and 6, 0.25 between 0 and 0.5 (subnormal step). */
    float f_in[4] = {4.0f, 2.5f, 5.0f, 0.25f};
    even = quantize_row("mxfp4_e2m1", MXQ_ROUND_EVEN, 4, f_in, 4);
    float f_even[4] = {4.0f, 2.0f, 4.0f, 0.0f};
    assert_values(&even, f_even, 4);
    nearest = quantize_row("mxfp4_e2m1", MXQ_ROUND_NEAREST, 4, f_in, 4);
    float f_nearest[4] = {4.0f, 3.0f, 6.0f, 0.5f};
    assert_values(&nearest, f_nearest, 4);

    /* One ulp below a tie rounds down in both modes (floor(t + 0.5) in
     * float32 would round it up). */
    float below_tie[2] = {1.0f, nextafterf(0.125f, 0.0f)};
    float e_zero[2] = {1.0f, 0.0f};
    result r1 = quantize_row("mxint4", MXQ_ROUND_NEAREST, 2, below_tie, 2);
    assert_values(&r1, e_zero, 2);
    result r2 = quantize_row("mxint4", MXQ_ROUND_EVEN, 2, below_tie, 2);
    assert_values(&r2, e_zero, 2);

    /* Ties on the FP8 E4M3 grid: 1 + 1/16 is halfway between 1 and 1 + 1/8. */
    float e4_in[3] = {256.0f, 1.0f + 1.0f / 16, 1.0f + 3.0f / 16};
    /* amax 256 -> e = 8, se = 0 */
    result r3 = quantize_row("mxfp8_e4m3", MXQ_ROUND_EVEN, 3, e4_in, 3);
    float e4_even[3] = {256.0f, 1.0f, 1.25f};
    assert_values(&r3, e4_even, 3);
    result r4 = quantize_row("mxfp8_e4m3", MXQ_ROUND_NEAREST, 3, e4_in, 3);
    float e4_near[3] = {256.0f, 1.125f, 1.25f};
    assert_values(&r4, e4_near, 3);
}

/* Negative values that round to zero, and -0.0 input. */
static void test_signed_zero(void **state)
{
    (void)state;
    float in[3] = {1.0f, -0.01f, -0.0f};
    result r = quantize_row("mxint4", MXQ_ROUND_EVEN, 3, in, 3);
    float expected[3] = {1.0f, 0.0f, 0.0f};
    assert_values(&r, expected, 3);
    /* Integer codes: zero is 0 whatever the sign (no negative zero code). */
    assert_int_equal(r.packed[0] >> 4, 0);
    assert_int_equal(r.packed[1] & 0x0F, 0);
}

/* The element codes in the packed bytes, checked against hand encodings. */
static void test_packed_codes(void **state)
{
    (void)state;
    /* mxint4, se = 0: 1.0 -> k=4, -1.0 -> k=-4 = 0xC, 0.25 -> 1, -1.75 -> -7 = 0x9 */
    float in[4] = {1.0f, -1.0f, 0.25f, -1.75f};
    result r = quantize_row("mxint4", MXQ_ROUND_EVEN, 4, in, 4);
    assert_int_equal(r.packed[0], 0xC4);
    assert_int_equal(r.packed[1], 0x91);

    /* mxfp4 e2m1 with amax 6 -> e = 2, se = 0: 6 = 0b0111, -0.5 = 0b1001,
     * 1.5 = 0b0011, -4 = 0b1110 */
    float f[4] = {6.0f, -0.5f, 1.5f, -4.0f};
    r = quantize_row("mxfp4_e2m1", MXQ_ROUND_EVEN, 4, f, 4);
    assert_int_equal(r.scale[0], 127);
    assert_int_equal(r.packed[0], 0x97);
    assert_int_equal(r.packed[1], 0xE3);

    /* mxint8: value k/64 stored as int8 k. amax 1.5 -> se = 0: 1.5 -> 96, -0.5 -> -32 */
    float i8[2] = {1.5f, -0.5f};
    r = quantize_row("mxint8", MXQ_ROUND_EVEN, 2, i8, 2);
    assert_int_equal(r.packed[0], 96);
    assert_int_equal(r.packed[1], (uint8_t)(int8_t)-32);

    /* mxfp8 e4m3: 448 -> 0x7E, -2^-9 (smallest subnormal) -> 0x81, with se = 0 (amax 448 -> e 8). */
    float e4[2] = {448.0f, -0x1p-9f};
    r = quantize_row("mxfp8_e4m3", MXQ_ROUND_EVEN, 2, e4, 2);
    assert_int_equal(r.scale[0], 127);
    assert_int_equal(r.packed[0], 0x7E);
    assert_int_equal(r.packed[1], 0x81);

    /* mxfp6 e3m2, amax 28 -> e 4, se 0. 28 = 0b011111, 1 = 0b001100 (bias 3),
     * -0.25 (2^-2 = smallest normal) = 0b100100, 0.0625 (subnormal 1/4 * 2^-2) = 0b000001.
     * Packed: v0 | v1 << 6 | v2 << 12 | v3 << 18. */
    float e3m2[4] = {28.0f, 1.0f, -0.25f, 0.0625f};
    r = quantize_row("mxfp6_e3m2", MXQ_ROUND_EVEN, 4, e3m2, 4);
    uint32_t word = 0x1Fu | 0x0Cu << 6 | 0x24u << 12 | 0x01u << 18;
    assert_int_equal(r.packed[0], word & 0xFF);
    assert_int_equal(r.packed[1], (word >> 8) & 0xFF);
    assert_int_equal(r.packed[2], (word >> 16) & 0xFF);

    /* mxint3, se = 0: 1.5 -> k=3, -1.0 -> k=-2 = 0b110: byte = 3 | 6 << 4 */
    float i3[2] = {1.5f, -1.0f};
    r = quantize_row("mxint3", MXQ_ROUND_EVEN, 2, i3, 2);
    assert_int_equal(r.packed[0], 0x63);

    /* mxint2, se = 0: 1 -> 1, -1 -> 0b11, 0.4 -> 0, -0.6 -> -1: 1 | 3<<2 | 0<<4 | 3<<6 */
    float i2[4] = {1.0f, -1.0f, 0.4f, -0.6f};
    r = quantize_row("mxint2", MXQ_ROUND_EVEN, 4, i2, 4);
    assert_int_equal(r.packed[0], 0x01 | 0x03 << 2 | 0x03 << 6);
}

/* A partial last block is scaled from its own elements only. */
static void test_partial_last_block(void **state)
{
    (void)state;
    float in[5] = {4.0f, 0.0f, 0.0f, 0.0f, 0.5f};
    result r = quantize_row("mxint8", MXQ_ROUND_EVEN, 4, in, 5);
    assert_int_equal(r.scale[0], 127 + 2);
    assert_int_equal(r.scale[1], 127 - 1);
    float expected[5] = {4.0f, 0, 0, 0, 0.5f};
    assert_values(&r, expected, 5);
}

static void test_block_range_errors(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    float in[4] = {1, 2, 3, 4};
    float out[4];
    mxq_mx_spec spec = {mxq_format_by_name("mxint8"), 0, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, in, 1, 4, NULL, NULL, out), MXQ_ERR_ARG);
    assert_non_null(strstr(mxq_error_message(ctx), "block size 0"));
    mxq_error_clear(ctx);
    spec.block = 4097;
    assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, in, 1, 4, NULL, NULL, out), MXQ_ERR_ARG);
    mxq_error_clear(ctx);
    spec.block = 4096; /* larger than the row: one partial block */
    assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, in, 1, 4, NULL, NULL, out), MXQ_OK);
    spec.format = NULL;
    assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, in, 1, 4, NULL, NULL, out), MXQ_ERR_ARG);
    assert_non_null(strstr(mxq_error_message(ctx), "mxfp4_e2m1"));
    mxq_ctx_destroy(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_all_zero_block),     cmocka_unit_test(test_nan_block),
        cmocka_unit_test(test_inf_block),          cmocka_unit_test(test_just_below_power_of_two),
        cmocka_unit_test(test_fp32_subnormals),    cmocka_unit_test(test_huge_values_saturate),
        cmocka_unit_test(test_ties),               cmocka_unit_test(test_signed_zero),
        cmocka_unit_test(test_packed_codes),       cmocka_unit_test(test_partial_last_block),
        cmocka_unit_test(test_block_range_errors),
    };
    return cmocka_run_group_tests_name("mx_edge", tests, NULL, NULL);
}
