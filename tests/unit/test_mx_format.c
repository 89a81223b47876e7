/* The format table against an independent derivation of each format from
 * its exponent/mantissa widths (OCP MX v1.0), decode over every code, and
 * pack/unpack identity. */
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

/* name, bits, ebits, mbits, max as written in docs/design.md section 2 */
static const struct {
    const char *name;
    int bits, ebits, mbits, emax;
    double max;
} spec_rows[] = {
    {"mxint8", 8, 0, 6, 0, 127.0 / 64},   {"mxint4", 4, 0, 2, 0, 7.0 / 4},     {"mxint3", 3, 0, 1, 0, 3.0 / 2},
    {"mxint2", 2, 0, 0, 0, 1.0},          {"mxfp8_e4m3", 8, 4, 3, 8, 448.0},   {"mxfp8_e5m2", 8, 5, 2, 15, 57344.0},
    {"mxfp6_e3m2", 6, 3, 2, 4, 28.0},     {"mxfp6_e2m3", 6, 2, 3, 2, 7.5},     {"mxfp4_e2m1", 4, 2, 1, 2, 6.0},
};

static void test_table_matches_spec(void **state)
{
    (void)state;
    assert_int_equal(sizeof(spec_rows) / sizeof(spec_rows[0]), MXQ_FORMAT_COUNT);
    for (size_t i = 0; i < MXQ_FORMAT_COUNT; i++) {
        const mxq_format *f = mxq_format_by_name(spec_rows[i].name);
        assert_non_null(f);
        assert_ptr_equal(mxq_format_get(f->id), f);
        assert_int_equal(f->bits, spec_rows[i].bits);
        assert_int_equal(f->ebits, spec_rows[i].ebits);
        assert_int_equal(f->mbits, spec_rows[i].mbits);
        assert_int_equal(f->emax, spec_rows[i].emax);
        assert_true((double)f->max == spec_rows[i].max);
        assert_int_equal(f->is_int, spec_rows[i].ebits == 0);
        assert_int_equal(f->storage_bits, f->bits == 3 ? 4 : f->bits);
        if (!f->is_int) {
            int bias = (1 << (f->ebits - 1)) - 1;
            assert_int_equal(f->emin, 1 - bias);
        }
        /* max_code decodes to max, and is the largest code that does not
         * decode to NaN/Inf */
        assert_true(mxq_mx_decode(f, (uint8_t)f->max_code, 0) == f->max);
        assert_non_null(strstr(mxq_format_names(), f->name));
    }
    assert_null(mxq_format_by_name("mxint5"));
    assert_null(mxq_format_by_name(NULL));
}

/* Every code of every format decodes to a grid value, decodes are distinct
 * (apart from +-0), and encode(decode(c)) == c for every non-special code. */
static void test_decode_encode_all_codes(void **state)
{
    (void)state;
    for (int id = 0; id < MXQ_FORMAT_COUNT; id++) {
        const mxq_format *f = mxq_format_get((mxq_format_id)id);
        int ncodes = 1 << f->bits;
        int positive_finite = 0;
        for (int c = 0; c < ncodes; c++) {
            float v = mxq_mx_decode(f, (uint8_t)c, 0);
            if (!isfinite(v))
                continue;
            if (fabsf(v) > f->max) {
                /* only the integer code -2^(bits-1) lies outside, never produced */
                assert_true(f->is_int);
                assert_int_equal(c, 1 << (f->bits - 1));
                continue;
            }
            if (v > 0)
                positive_finite++;
            for (int rnd = 0; rnd < 2; rnd++) {
                uint8_t back = mxq_mx_encode(f, (mxq_rounding)rnd, v, 0);
                if (v == 0.0f) /* +-0 for floats keep their sign bit; integer 0 is 0 */
                    assert_true(mxq_mx_decode(f, back, 0) == 0.0f);
                else
                    assert_int_equal(back, c);
            }
        }
        /* positive values: integers max_code of them; floats every magnitude
         * code 1..max_code */
        assert_int_equal(positive_finite, f->max_code);
    }
}

static void test_pack_unpack_identity(void **state)
{
    (void)state;
    tu_rng rng = {12345};
    const size_t lengths[] = {1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 127, 172, 1000, 4099};
    for (int id = 0; id < MXQ_FORMAT_COUNT; id++) {
        const mxq_format *f = mxq_format_get((mxq_format_id)id);
        for (size_t li = 0; li < sizeof(lengths) / sizeof(lengths[0]); li++) {
            size_t n = lengths[li];
            uint8_t *codes = malloc(n), *back = malloc(n);
            size_t nbytes = mxq_mx_packed_row_bytes(f, n);
            assert_int_equal(nbytes, (n * (size_t)f->storage_bits + 7) / 8);
            uint8_t *packed = malloc(nbytes + 1);
            packed[nbytes] = 0xA5; /* guard byte: packing must not write past the row */
            for (size_t i = 0; i < n; i++)
                codes[i] = (uint8_t)(tu_rng_next(&rng) & ((1u << f->bits) - 1));
            mxq_mx_pack_row(f, codes, n, packed);
            assert_int_equal(packed[nbytes], 0xA5);
            mxq_mx_unpack_row(f, packed, n, back);
            assert_memory_equal(codes, back, n);
            free(codes);
            free(back);
            free(packed);
        }
    }
}

/* The storage layout of docs/design.md section 2, bit by bit, for one group. */
static void test_pack_layout(void **state)
{
    (void)state;
    uint8_t codes[4] = {0x3F, 0x01, 0x2A, 0x15};
    uint8_t packed[3];
    mxq_mx_pack_row(mxq_format_by_name("mxfp6_e2m3"), codes, 4, packed);
    uint32_t word = 0x3Fu | 0x01u << 6 | 0x2Au << 12 | 0x15u << 18;
    assert_int_equal(packed[0], word & 0xFF);
    assert_int_equal(packed[1], (word >> 8) & 0xFF);
    assert_int_equal(packed[2], word >> 16);

    uint8_t c4[3] = {0x1, 0xF, 0x7};
    uint8_t p4[2];
    mxq_mx_pack_row(mxq_format_by_name("mxint4"), c4, 3, p4);
    assert_int_equal(p4[0], 0xF1);
    assert_int_equal(p4[1], 0x07); /* odd tail: high nibble zero */

    uint8_t c3[2] = {0x7, 0x5};
    uint8_t p3[1];
    mxq_mx_pack_row(mxq_format_by_name("mxint3"), c3, 2, p3);
    assert_int_equal(p3[0], 0x57);

    uint8_t c2[5] = {1, 2, 3, 0, 3};
    uint8_t p2[2];
    mxq_mx_pack_row(mxq_format_by_name("mxint2"), c2, 5, p2);
    assert_int_equal(p2[0], 1 | 2 << 2 | 3 << 4 | 0 << 6);
    assert_int_equal(p2[1], 3);
}

static void test_names(void **state)
{
    (void)state;
    mxq_rounding r;
    assert_int_equal(mxq_rounding_by_name("even", &r), 0);
    assert_int_equal(r, MXQ_ROUND_EVEN);
    assert_int_equal(mxq_rounding_by_name("nearest", &r), 0);
    assert_int_equal(r, MXQ_ROUND_NEAREST);
    assert_int_equal(mxq_rounding_by_name("up", &r), -1);
    assert_string_equal(mxq_rounding_name(MXQ_ROUND_NEAREST), "nearest");
    assert_true(mxq_kernel_available(MXQ_KERNEL_REFERENCE));
    assert_int_not_equal(mxq_kernel_resolve(MXQ_KERNEL_AUTO), MXQ_KERNEL_AUTO);
}

/* The list of names printed in messages and --help is the table's. */
static void test_format_names_are_the_table(void **state)
{
    (void)state;
    char joined[512] = "";
    for (int id = 0; id < MXQ_FORMAT_COUNT; id++)
        snprintf(joined + strlen(joined), sizeof(joined) - strlen(joined), "%s%s", id ? " " : "",
                 mxq_format_get((mxq_format_id)id)->name);
    assert_string_equal(mxq_format_names(), joined);
}

/* A code is valid exactly when it decodes (with scale 1) to a finite
 * value the format can reach: no Inf/NaN codes, no integer code below
 * -max (MXINT4's -8); and every code the encoder writes is valid. */
static void test_code_validity(void **state)
{
    (void)state;
    for (int id = 0; id < MXQ_FORMAT_COUNT; id++) {
        const mxq_format *f = mxq_format_get((mxq_format_id)id);
        for (int code = 0; code < 256; code++) {
            const float v = code >> f->bits ? NAN : mxq_mx_decode(f, (uint8_t)code, 0);
            const int reachable = isfinite(v) && fabsf(v) <= f->max;
            if (mxq_mx_code_valid(f, (uint8_t)code) != reachable)
                fail_msg("%s code 0x%x: valid %d, decodes to %g", f->name, code, mxq_mx_code_valid(f, (uint8_t)code),
                         (double)v);
        }
        for (float x = -2.0f * f->max; x <= 2.0f * f->max; x += f->max / 37.0f)
            assert_true(mxq_mx_code_valid(f, mxq_mx_encode(f, MXQ_ROUND_EVEN, x, 0)));
    }
    const mxq_format *int4 = mxq_format_by_name("mxint4");
    uint8_t codes[3], repacked[2];
    const uint8_t clean[2] = {0x97, 0x01}, minus8[2] = {0x87, 0x01}, padded[2] = {0x97, 0x21};
    assert_true(mxq_mx_check_row(int4, clean, 3, codes, repacked) == (size_t)-1);
    assert_true(mxq_mx_check_row(int4, minus8, 3, codes, repacked) == 1);
    assert_true(mxq_mx_check_row(int4, padded, 3, codes, repacked) == 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_format_names_are_the_table),
        cmocka_unit_test(test_table_matches_spec), cmocka_unit_test(test_decode_encode_all_codes),
        cmocka_unit_test(test_pack_unpack_identity), cmocka_unit_test(test_pack_layout),
        cmocka_unit_test(test_names), cmocka_unit_test(test_code_validity),
    };
    return cmocka_run_group_tests_name("mx_format", tests, NULL, NULL);
}
