/* `mxq cast` end to end: the binary reproduces every case of mx_vectors.h5,
 * and every kind of bad input gets one clear error line, a non-zero exit and
 * no output file (not even a leftover temporary). */
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "mxq/mxq.h"
#include "testutil.h"

typedef tu_run_result run_result;

/* Run the mxq binary with the given arguments (NULL-terminated). */
static run_result run_mxq(const char *first, ...)
{
    const char *bin = getenv("MXQ_BIN");
    if (!bin)
        fail_msg("MXQ_BIN is not set");
    const char *prefix[2] = {bin, first};
    run_result r;
    va_list ap;
    va_start(ap, first);
    tu_run_prefixed(prefix, first ? 2 : 1, ap, &r);
    va_end(ap);
    return r;
}


static int file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* No ".<name>.tmp-<pid>" leftovers in the scratch directory. */
static void assert_no_temporaries(void)
{
    DIR *d = opendir(tu_scratch_dir());
    assert_non_null(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (strstr(e->d_name, ".tmp-"))
            fail_msg("temporary file left behind: %s", e->d_name);
    closedir(d);
}

static void assert_one_line_error(const run_result *r, const char *must_contain)
{
    if (r->exit_code == 0)
        fail_msg("expected failure, got exit 0; stderr: %s", r->err);
    size_t len = strlen(r->err);
    if (len == 0 || r->err[len - 1] != '\n' || memchr(r->err, '\n', len - 1) != NULL)
        fail_msg("expected exactly one line on stderr, got: <<%s>>", r->err);
    if (!strstr(r->err, "error:"))
        fail_msg("stderr does not say error: %s", r->err);
    if (must_contain && !strstr(r->err, must_contain))
        fail_msg("stderr lacks '%s': %s", must_contain, r->err);
}

/* ---- every mx_vectors group through the binary -------------------------- */

static void test_cast_reproduces_vectors(void **state)
{
    (void)state;
    static const char *const elems[] = {"int8", "int4", "int2", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3",
                                        "fp4_e2m1"};
    static const char *const roundings[] = {"even", "nearest"};
    static const int blocks[] = {32, 128};
    int groups = 0;
    for (int f = 0; f < 8; f++)
        for (int r = 0; r < 2; r++)
            for (int b = 0; b < 2; b++) {
                char group[64], input[1024], format[32], block[16];
                snprintf(group, sizeof(group), "/%s/%s/bs%d", elems[f], roundings[r], blocks[b]);
                snprintf(input, sizeof(input), "%s:%s/input", tu_data_path("mx/mx_vectors.h5"), group);
                snprintf(format, sizeof(format), "mx%s", elems[f]);
                snprintf(block, sizeof(block), "%d", blocks[b]);
                const char *out = tu_scratch_path("vec.h5");
                run_result res = run_mxq("cast", "--format", format, "--block", block, "--rounding", roundings[r],
                                         "--quiet", input, out, NULL);
                if (res.exit_code != 0)
                    fail_msg("mxq cast failed for %s: %s", group, res.err);

                hid_t got = H5Fopen(out, H5F_ACC_RDONLY, H5P_DEFAULT);
                hid_t ref = H5Fopen(tu_data_path("mx/mx_vectors.h5"), H5F_ACC_RDONLY, H5P_DEFAULT);
                assert_true(got >= 0 && ref >= 0);
                int rank;
                size_t d1[4], d2[4], d3[4], d4[4];
                char name[128];
                float *o = tu_h5_read(got, "/output", H5T_NATIVE_FLOAT, 4, &rank, d1);
                snprintf(name, sizeof(name), "%s/output", group);
                float *eo = tu_h5_read(ref, name, H5T_NATIVE_FLOAT, 4, &rank, d2);
                int16_t *s = tu_h5_read(got, "/scale_e8m0", H5T_NATIVE_INT16, 2, &rank, d3);
                snprintf(name, sizeof(name), "%s/scale_e8m0", group);
                int16_t *es = tu_h5_read(ref, name, H5T_NATIVE_INT16, 2, &rank, d4);
                assert_memory_equal(d1, d2, 2 * sizeof(size_t));
                assert_memory_equal(d3, d4, 2 * sizeof(size_t));
                for (size_t i = 0; i < d1[0] * d1[1]; i++)
                    if (!tu_same_float(o[i], eo[i]))
                        fail_msg("%s output[%zu]: %a vs microxcaling %a", group, i, (double)o[i], (double)eo[i]);
                assert_memory_equal(s, es, d3[0] * d3[1] * sizeof(int16_t));

                /* /packed decodes back to /output */
                mxq_ctx *ctx;
                assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
                size_t dp[4];
                uint8_t *packed = tu_h5_read(got, "/packed", H5T_NATIVE_UINT8, 1, &rank, dp);
                uint8_t *s8 = tu_h5_read(got, "/scale_e8m0", H5T_NATIVE_UINT8, 1, &rank, d3);
                mxq_mx_spec spec = {mxq_format_by_name(format), blocks[b], MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
                assert_int_equal(dp[1], mxq_mx_packed_row_bytes(spec.format, d1[1]));
                float *back = malloc(d1[0] * d1[1] * sizeof(float));
                assert_int_equal(mxq_mx_dequantize_rows(ctx, &spec, packed, s8, d1[0], d1[1], back), MXQ_OK);
                for (size_t i = 0; i < d1[0] * d1[1]; i++)
                    assert_true(tu_same_float(back[i], eo[i]));
                mxq_ctx_destroy(ctx);
                free(back);
                free(packed);
                free(s8);
                free(o);
                free(eo);
                free(s);
                free(es);
                H5Fclose(got);
                H5Fclose(ref);
                groups++;
            }
    assert_int_equal(groups, 32);
}

static void test_cast_attributes_and_log(void **state)
{
    (void)state;
    char input[1024];
    snprintf(input, sizeof(input), "%s:/int4/even/bs32/input", tu_data_path("mx/mx_vectors.h5"));
    const char *out = tu_scratch_path("attrs.h5");
    run_result r = run_mxq("cast", "-f", "mxint4", "-b", "32", input, out, NULL);
    assert_int_equal(r.exit_code, 0);
    assert_non_null(strstr(r.err, "SQNR")); /* progress/summary line on the log stream */
    hid_t f = H5Fopen(out, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);
    char fmt[32] = {0};
    hid_t a = H5Aopen(f, "format", H5P_DEFAULT);
    hid_t t = H5Aget_type(a);
    assert_true(H5Tget_size(t) < sizeof(fmt));
    H5Aread(a, t, fmt);
    assert_string_equal(fmt, "mxint4");
    H5Tclose(t);
    H5Aclose(a);
    long long block = 0;
    a = H5Aopen(f, "block", H5P_DEFAULT);
    H5Aread(a, H5T_NATIVE_LLONG, &block);
    H5Aclose(a);
    assert_int_equal(block, 32);
    H5Fclose(f);
}

static void test_help(void **state)
{
    (void)state;
    run_result r = run_mxq("--help", NULL);
    assert_int_equal(r.exit_code, 0);
    assert_non_null(strstr(r.out, "cast"));
    r = run_mxq("cast", "--help", NULL);
    assert_int_equal(r.exit_code, 0);
    assert_non_null(strstr(r.out, "--rounding"));
    assert_non_null(strstr(r.out, "mxfp6_e2m3"));
    r = run_mxq("help", "cast", NULL);
    assert_int_equal(r.exit_code, 0);
    assert_non_null(strstr(r.out, "--block"));
    r = run_mxq("frobnicate", NULL);
    assert_one_line_error(&r, "unknown command 'frobnicate'");
}

/* ---- bad input ---------------------------------------------------------- */

static char vec_input[1024];

static const char *good_input(void)
{
    snprintf(vec_input, sizeof(vec_input), "%s:/int8/even/bs32/input", tu_data_path("mx/mx_vectors.h5"));
    return vec_input;
}

static void test_error_unknown_format(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("e1.h5");
    run_result r = run_mxq("cast", "--format", "mxint5", "--block", "32", good_input(), out, NULL);
    assert_one_line_error(&r, "unknown format 'mxint5'");
    assert_non_null(strstr(r.err, "mxint8 mxint4 mxint3 mxint2 mxfp8_e4m3")); /* lists the valid ones */
    assert_false(file_exists(out));
}

static void test_error_bad_block(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("e2.h5");
    const char *bad[] = {"0", "4097", "-3", "abc", "32x", ""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        run_result r = run_mxq("cast", "--format", "mxint8", "--block", bad[i], good_input(), out, NULL);
        assert_one_line_error(&r, "block size must be an integer in 1..4096");
        assert_false(file_exists(out));
    }
    run_result r = run_mxq("cast", "--format", "mxint8", good_input(), out, NULL);
    assert_one_line_error(&r, "--block is required");
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", "--rounding", "up", good_input(), out, NULL);
    assert_one_line_error(&r, "unknown rounding 'up'");
}

static void test_error_missing_file(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("e3.h5");
    run_result r = run_mxq("cast", "--format", "mxint8", "--block", "32", "/nonexistent/in.h5", out, NULL);
    assert_one_line_error(&r, "/nonexistent/in.h5");
    assert_non_null(strstr(r.err, "No such file"));
    assert_false(file_exists(out));
}

static void test_error_not_hdf5(void **state)
{
    (void)state;
    const char *in = tu_scratch_path("not_hdf5.h5");
    FILE *f = fopen(in, "w");
    fputs("hello\n", f);
    fclose(f);
    const char *out = tu_scratch_path("e4.h5");
    run_result r = run_mxq("cast", "--format", "mxint8", "--block", "32", in, out, NULL);
    assert_one_line_error(&r, "is not an HDF5 file");
    assert_false(file_exists(out));
}

static void test_error_missing_dataset(void **state)
{
    (void)state;
    char input[1024];
    snprintf(input, sizeof(input), "%s:/int8/even/bs32/nope", tu_data_path("mx/mx_vectors.h5"));
    const char *out = tu_scratch_path("e5.h5");
    run_result r = run_mxq("cast", "--format", "mxint8", "--block", "32", input, out, NULL);
    assert_one_line_error(&r, "no dataset '/int8/even/bs32/nope'");
    assert_false(file_exists(out));
    /* default dataset /input does not exist at the root of mx_vectors.h5 */
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", tu_data_path("mx/mx_vectors.h5"), out, NULL);
    assert_one_line_error(&r, "no dataset '/input'");
    /* a group is not a dataset */
    snprintf(input, sizeof(input), "%s:/int8/even", tu_data_path("mx/mx_vectors.h5"));
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", input, out, NULL);
    assert_one_line_error(&r, "is not a dataset");
}

static void write_dataset(const char *path, const char *name, hid_t type, int rank, const hsize_t *dims,
                          const void *data)
{
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t s = H5Screate_simple(rank, dims, NULL);
    hid_t d = H5Dcreate2(f, name, type, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    H5Dclose(d);
    H5Sclose(s);
    H5Fclose(f);
}

static void test_error_wrong_rank_or_type(void **state)
{
    (void)state;
    float data[24] = {0};
    double ddata[24] = {0};
    int idata[24] = {0};
    const char *out = tu_scratch_path("e6.h5");

    hsize_t d1[1] = {24};
    const char *in1 = tu_scratch_path("rank1.h5");
    write_dataset(in1, "/input", H5T_NATIVE_FLOAT, 1, d1, data);
    run_result r = run_mxq("cast", "--format", "mxint8", "--block", "32", in1, out, NULL);
    assert_one_line_error(&r, "must be 2-D");
    assert_false(file_exists(out));

    hsize_t d3[3] = {2, 3, 4};
    const char *in3 = tu_scratch_path("rank3.h5");
    write_dataset(in3, "/input", H5T_NATIVE_FLOAT, 3, d3, data);
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", in3, out, NULL);
    assert_one_line_error(&r, "has 3 dimensions");

    hsize_t d2[2] = {4, 6};
    const char *inf64 = tu_scratch_path("f64.h5");
    write_dataset(inf64, "/input", H5T_NATIVE_DOUBLE, 2, d2, ddata);
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", inf64, out, NULL);
    assert_one_line_error(&r, "must be float32");
    assert_non_null(strstr(r.err, "8 bytes"));

    const char *inint = tu_scratch_path("i32.h5");
    write_dataset(inint, "/input", H5T_NATIVE_INT, 2, d2, idata);
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", inint, out, NULL);
    assert_one_line_error(&r, "must be float32");
    assert_non_null(strstr(r.err, "integer"));
    assert_false(file_exists(out));
}

static void test_error_unwritable_output(void **state)
{
    (void)state;
    run_result r = run_mxq("cast", "--format", "mxint8", "--block", "32", good_input(), "/nonexistent_dir/out.h5", NULL);
    assert_one_line_error(&r, "/nonexistent_dir/out.h5");
    assert_non_null(strstr(r.err, "No such file or directory"));

    /* the output path is a directory */
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", good_input(), tu_scratch_dir(), NULL);
    assert_one_line_error(&r, "is a directory");

    /* a path under a regular file */
    const char *file = tu_scratch_path("plainfile");
    FILE *f = fopen(file, "w");
    fclose(f);
    char under[600];
    snprintf(under, sizeof(under), "%s/out.h5", file);
    r = run_mxq("cast", "--format", "mxint8", "--block", "32", good_input(), under, NULL);
    assert_one_line_error(&r, "Not a directory");
    assert_no_temporaries();
}

static void test_error_arguments(void **state)
{
    (void)state;
    run_result r = run_mxq("cast", "--format", "mxint8", "--block", "32", good_input(), NULL);
    assert_one_line_error(&r, "expected IN.h5[:/dataset] OUT.h5");
    r = run_mxq("cast", "--bogus", NULL);
    assert_one_line_error(&r, "unknown option '--bogus'");
    r = run_mxq("cast", "--format", NULL);
    assert_one_line_error(&r, "needs a value");
    r = run_mxq("cast", "--block", "32", good_input(), tu_scratch_path("x.h5"), NULL);
    assert_one_line_error(&r, "--format is required");
}

/* An existing output is replaced only once the new one is complete. */
static void test_failed_cast_keeps_previous_output(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("keep.h5");
    run_result r = run_mxq("cast", "-f", "mxint8", "-b", "32", "--quiet", good_input(), out, NULL);
    assert_int_equal(r.exit_code, 0);
    struct stat before;
    assert_int_equal(stat(out, &before), 0);
    char input[1024];
    snprintf(input, sizeof(input), "%s:/nope", tu_data_path("mx/mx_vectors.h5"));
    r = run_mxq("cast", "-f", "mxint8", "-b", "32", input, out, NULL);
    assert_one_line_error(&r, "no dataset");
    struct stat after;
    assert_int_equal(stat(out, &after), 0);
    assert_int_equal(before.st_ino, after.st_ino);
    assert_int_equal(before.st_size, after.st_size);
    assert_no_temporaries();
}

int main(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cast_reproduces_vectors),
        cmocka_unit_test(test_cast_attributes_and_log),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_error_unknown_format),
        cmocka_unit_test(test_error_bad_block),
        cmocka_unit_test(test_error_missing_file),
        cmocka_unit_test(test_error_not_hdf5),
        cmocka_unit_test(test_error_missing_dataset),
        cmocka_unit_test(test_error_wrong_rank_or_type),
        cmocka_unit_test(test_error_unwritable_output),
        cmocka_unit_test(test_error_arguments),
        cmocka_unit_test(test_failed_cast_keeps_previous_output),
    };
    return cmocka_run_group_tests_name("cli_cast", tests, NULL, NULL);
}
