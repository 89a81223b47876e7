/* Every case of data/mx/mx_vectors.h5 (Microsoft microxcaling's output) is
 * reproduced bit for bit by the library: `output` and `scale_e8m0`, for the
 * reference kernel and for the fast kernel. One test per group. */
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

typedef struct {
    char group[128];
    const mxq_format *format;
    mxq_rounding rounding;
    int block;
} vector_case;

static const char *const file_formats[] = {"int8", "int4", "int2", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3",
                                           "fp4_e2m1"};
static const char *const roundings[] = {"even", "nearest"};
static const int blocks[] = {32, 128};
#define N_CASES (8 * 2 * 2)

static void run_case(const vector_case *vc, mxq_kernel kernel)
{
    hid_t file = H5Fopen(tu_data_path("mx/mx_vectors.h5"), H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(file >= 0);
    char name[192];
    int rank;
    size_t dims_in[4], dims_out[4], dims_scale[4];
    snprintf(name, sizeof(name), "%s/input", vc->group);
    float *input = tu_h5_read(file, name, H5T_NATIVE_FLOAT, 4, &rank, dims_in);
    assert_int_equal(rank, 2);
    snprintf(name, sizeof(name), "%s/output", vc->group);
    float *expected = tu_h5_read(file, name, H5T_NATIVE_FLOAT, 4, &rank, dims_out);
    snprintf(name, sizeof(name), "%s/scale_e8m0", vc->group);
    int16_t *expected_scale = tu_h5_read(file, name, H5T_NATIVE_INT16, 2, &rank, dims_scale);
    H5Fclose(file);

    size_t rows = dims_in[0], cols = dims_in[1];
    size_t nblocks = mxq_mx_blocks_per_row(cols, vc->block);
    assert_int_equal(dims_scale[1], nblocks);

    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    mxq_mx_spec spec = {.format = vc->format, .block = vc->block, .rounding = vc->rounding, .kernel = kernel};
    float *dequant = malloc(rows * cols * sizeof(float));
    uint8_t *scales = malloc(rows * nblocks);
    uint8_t *packed = malloc(rows * mxq_mx_packed_row_bytes(vc->format, cols));
    assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, input, rows, cols, packed, scales, dequant), MXQ_OK);

    size_t bad_scales = 0, bad_values = 0;
    for (size_t i = 0; i < rows * nblocks; i++) {
        if ((int)scales[i] != (int)expected_scale[i]) {
            if (bad_scales++ < 3)
                print_message("# %s scale[%zu,%zu] = %d, microxcaling %d\n", vc->group, i / nblocks, i % nblocks,
                              scales[i], expected_scale[i]);
        }
    }
    for (size_t i = 0; i < rows * cols; i++) {
        if (!tu_same_float(dequant[i], expected[i])) {
            if (bad_values++ < 3)
                print_message("# %s output[%zu,%zu]: input %a -> %a, microxcaling %a\n", vc->group, i / cols, i % cols,
                              (double)input[i], (double)dequant[i], (double)expected[i]);
        }
    }
    assert_int_equal(bad_scales, 0);
    assert_int_equal(bad_values, 0);

    /* The packed codes must represent the same values. */
    float *unpacked = malloc(rows * cols * sizeof(float));
    assert_int_equal(mxq_mx_dequantize_rows(ctx, &spec, packed, scales, rows, cols, unpacked), MXQ_OK);
    for (size_t i = 0; i < rows * cols; i++)
        assert_true(tu_same_float(unpacked[i], expected[i]));

    free(unpacked);
    free(packed);
    free(scales);
    free(dequant);
    free(input);
    free(expected);
    free(expected_scale);
    mxq_ctx_destroy(ctx);
}

static void test_vector_reference(void **state)
{
    run_case(*state, MXQ_KERNEL_REFERENCE);
}

static void test_vector_fast(void **state)
{
    if (!mxq_kernel_available(MXQ_KERNEL_AVX512))
        skip();
    run_case(*state, MXQ_KERNEL_AVX512);
}

/* The file really has all the groups we expect: a test that found nothing to
 * compare must not pass. */
static void test_vector_file_complete(void **state)
{
    (void)state;
    hid_t file = H5Fopen(tu_data_path("mx/mx_vectors.h5"), H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(file >= 0);
    int found = 0;
    for (int f = 0; f < 8; f++)
        for (int r = 0; r < 2; r++)
            for (int b = 0; b < 2; b++) {
                char name[128];
                snprintf(name, sizeof(name), "/%s/%s/bs%d/output", file_formats[f], roundings[r], blocks[b]);
                found += H5Lexists(file, name, H5P_DEFAULT) > 0;
            }
    H5Fclose(file);
    assert_int_equal(found, N_CASES);
}

int main(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    static vector_case cases[N_CASES];
    static struct CMUnitTest tests[2 * N_CASES + 1];
    static char names[2 * N_CASES][160];
    int n = 0, t = 0;
    tests[t++] = (struct CMUnitTest){"mx_vectors_file_has_all_groups", test_vector_file_complete, NULL, NULL, NULL};
    for (int f = 0; f < 8; f++)
        for (int r = 0; r < 2; r++)
            for (int b = 0; b < 2; b++) {
                vector_case *vc = &cases[n++];
                snprintf(vc->group, sizeof(vc->group), "/%s/%s/bs%d", file_formats[f], roundings[r], blocks[b]);
                char mxq_name[32];
                snprintf(mxq_name, sizeof(mxq_name), "mx%s", file_formats[f]);
                vc->format = mxq_format_by_name(mxq_name);
                assert_non_null(vc->format);
                mxq_rounding_by_name(roundings[r], &vc->rounding);
                vc->block = blocks[b];
                for (int k = 0; k < 2; k++) {
                    char *nm = names[t - 1];
                    snprintf(nm, sizeof(names[0]), "%s%.128s", k == 0 ? "reference" : "fast", vc->group);
                    tests[t++] = (struct CMUnitTest){nm, k == 0 ? test_vector_reference : test_vector_fast, NULL, NULL,
                                                     vc};
                }
            }
    return _cmocka_run_group_tests("mx_vectors", tests, (size_t)t, NULL, NULL);
}
