/* safetensors validation: every malformed header is rejected with a message
 * naming the file and the tensor or field; a written file reads back. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "io/tensor_views.h"
#include "mxq/mxq.h"
#include "testutil.h"

/* A file of: 8-byte little-endian header length, header text, data bytes. */
static const char *write_raw(const char *name, uint64_t header_len, const char *header, size_t data_bytes)
{
    static char path[512];
    snprintf(path, sizeof(path), "%s/%s", tu_scratch_dir(), name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    for (int i = 0; i < 8; i++)
        fputc((int)((header_len >> (8 * i)) & 0xFF), f);
    if (header)
        fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < data_bytes; i++)
        fputc(0, f);
    fclose(f);
    return path;
}

static const char *write_file(const char *name, const char *header, size_t data_bytes)
{
    return write_raw(name, strlen(header), header, data_bytes);
}

/* Opening must fail with a message containing every given fragment. */
static void expect_open_error(const char *path, const char *frag1, const char *frag2)
{
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    mxq_st_file *f = NULL;
    mxq_status st = mxq_st_file_open(ctx, path, &f);
    if (st == MXQ_OK)
        fail_msg("opening %s succeeded, expected an error mentioning '%s'", path, frag1);
    assert_null(f);
    const char *msg = mxq_error_message(ctx);
    if (!strstr(msg, path))
        fail_msg("message does not name the file: %s", msg);
    if (frag1 && !strstr(msg, frag1))
        fail_msg("message lacks '%s': %s", frag1, msg);
    if (frag2 && !strstr(msg, frag2))
        fail_msg("message lacks '%s': %s", frag2, msg);
    mxq_ctx_destroy(ctx);
}

static void test_truncated(void **state)
{
    (void)state;
    const char *path = write_raw("short.safetensors", 0, NULL, 0);
    /* cut to 5 bytes */
    FILE *f = fopen(path, "wb");
    fwrite("abcde", 1, 5, f);
    fclose(f);
    expect_open_error(path, "truncated", NULL);
    /* header length claims more than the file has */
    path = write_raw("short2.safetensors", 1000, "{}", 0);
    expect_open_error(path, "truncated", "1000");
    /* data shorter than the tensor */
    path = write_file("short3.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8);
    expect_open_error(path, "'w'", "outside the data area");
}

static void test_header_too_large(void **state)
{
    (void)state;
    const char *path = write_raw("huge.safetensors", 200000000ull, "{}", 0);
    expect_open_error(path, "exceeds", "100000000");
}

static void test_bad_json(void **state)
{
    (void)state;
    expect_open_error(write_file("bad.safetensors", "{\"w\": {\"dtype\": \"F32\",", 0), "not valid JSON", NULL);
    expect_open_error(write_file("arr.safetensors", "[1, 2]", 0), "not a JSON object", NULL);
    expect_open_error(write_file("dup.safetensors",
                                 "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                                 "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                                 8),
                      "not valid JSON", "duplicate");
}

static void test_offsets_out_of_range(void **state)
{
    (void)state;
    expect_open_error(write_file("oob.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 12),
                      "'w'", "outside the data area");
    expect_open_error(write_file("rev.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 12),
                      "'w'", "end before they begin");
    expect_open_error(write_file("neg.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 12),
                      "'w'", "data_offsets");
}

static void test_overlap(void **state)
{
    (void)state;
    expect_open_error(write_file("overlap.safetensors",
                                 "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                                 12),
                      "overlap", "'b'");
}

static void test_dtype_shape_mismatch(void **state)
{
    (void)state;
    expect_open_error(write_file("mismatch.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8),
                      "'w'", "12 bytes");
    expect_open_error(write_file("bf16.safetensors", "{\"w\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,4]}}", 8),
                      "'w'", "BF16");
    expect_open_error(write_file("dtype.safetensors", "{\"w\":{\"dtype\":\"Q4_K\",\"shape\":[1],\"data_offsets\":[0,1]}}", 8),
                      "'w'", "unknown dtype 'Q4_K'");
    expect_open_error(write_file("shape.safetensors", "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 8),
                      "'w'", "shape[0]");
}

static void test_write_and_read_back(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    float w[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
    uint16_t h[3] = {mxq_f32_to_bf16(1.5f), mxq_f32_to_bf16(-2.0f), mxq_f32_to_bf16(3.0e5f)};
    uint8_t u[5] = {1, 2, 3, 4, 5};
    mxq_tensor_write tw[3] = {
        {"weight", MXQ_DT_F32, 2, {2, 3}, w},
        {"half", MXQ_DT_BF16, 1, {3}, h},
        {"bytes", MXQ_DT_U8, 1, {5}, u},
    };
    char path[512];
    snprintf(path, sizeof(path), "%s/rt.safetensors", tu_scratch_dir());
    assert_int_equal(mxq_st_write_file(ctx, path, tw, 3), MXQ_OK);
    mxq_st_file *f;
    assert_int_equal(mxq_st_file_open(ctx, path, &f), MXQ_OK);
    assert_int_equal(mxq_st_file_count(f), 3);
    const mxq_tensor_view *t = mxq_st_file_find(f, "weight");
    assert_non_null(t);
    float back[6];
    int64_t shape[2] = {2, 3};
    assert_int_equal(mxq_tensor_to_f32(ctx, t, 2, shape, back), MXQ_OK);
    assert_memory_equal(back, w, sizeof(w));
    /* a shape mismatch names the tensor and both shapes */
    int64_t wrong[2] = {3, 2};
    assert_int_equal(mxq_tensor_to_f32(ctx, t, 2, wrong, back), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "'weight' has shape [2, 3], expected [3, 2]"));
    mxq_error_clear(ctx);
    t = mxq_st_file_find(f, "half");
    int64_t s3[1] = {3};
    assert_int_equal(mxq_tensor_to_f32(ctx, t, 1, s3, back), MXQ_OK);
    assert_true(back[0] == 1.5f && back[1] == -2.0f);
    t = mxq_st_file_find(f, "bytes");
    assert_int_equal(t->nbytes, 5);
    assert_memory_equal(t->data, u, 5);
    /* data area starts 8-byte aligned */
    assert_int_equal(((uintptr_t)mxq_st_file_find(f, "weight")->data) % 8, 0);
    mxq_st_file_close(f);
    mxq_ctx_destroy(ctx);
}

static void test_half_conversions(void **state)
{
    (void)state;
    assert_true(mxq_f16_to_f32(0x3C00) == 1.0f);
    assert_true(mxq_f16_to_f32(0xC000) == -2.0f);
    assert_true(mxq_f16_to_f32(0x0001) == 0x1p-24f); /* smallest subnormal */
    assert_true(mxq_f16_to_f32(0x7BFF) == 65504.0f);
    assert_true(isinf(mxq_f16_to_f32(0x7C00)));
    assert_true(isnan(mxq_f16_to_f32(0x7E00)));
    assert_true(mxq_bf16_to_f32(0x3F80) == 1.0f);
    /* round to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 */
    assert_int_equal(mxq_f32_to_bf16(1.0f + 0x1p-8f), 0x3F80);
    assert_int_equal(mxq_f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3F81);
}

/* The scan without conversion finds the first NaN or Inf in each float
 * dtype, whichever block it falls in, and names its index; finite values
 * of every magnitude pass; other dtypes are refused. */
static void test_check_float(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    enum { ROWS = 3, COLS = 5000 }; /* 15000 elements: several 4096-element blocks */
    static uint16_t half[ROWS * COLS];
    static uint32_t full[ROWS * COLS];
    const struct {
        mxq_dtype dtype;
        uint32_t bad[2]; /* NaN, Inf */
        uint32_t finite[3]; /* largest, smallest subnormal, negative */
    } kinds[3] = {{MXQ_DT_BF16, {0x7FC1, 0xFF80}, {0x7F7F, 0x0001, 0xC000}},
                  {MXQ_DT_F16, {0x7E00, 0x7C00}, {0x7BFF, 0x0001, 0xC000}},
                  {MXQ_DT_F32, {0x7FC00000u, 0xFF800000u}, {0x7F7FFFFFu, 0x00000001u, 0xC0000000u}}};
    for (int k = 0; k < 3; k++) {
        const int wide = kinds[k].dtype == MXQ_DT_F32;
        for (int i = 0; i < ROWS * COLS; i++) {
            if (wide)
                full[i] = kinds[k].finite[i % 3];
            else
                half[i] = (uint16_t)kinds[k].finite[i % 3];
        }
        mxq_tensor_view t = {"w", kinds[k].dtype, 2, {ROWS, COLS}, ROWS * COLS, ROWS * COLS * (wide ? 4u : 2u),
                             wide ? (const void *)full : (const void *)half, "f.safetensors"};
        assert_int_equal(mxq_tensor_check_float(ctx, &t), MXQ_OK);
        for (int b = 0; b < 2; b++) {
            const int at = 2 * COLS + 4099; /* [2, 4099], in the fourth block */
            if (wide)
                full[at] = kinds[k].bad[b];
            else
                half[at] = (uint16_t)kinds[k].bad[b];
            assert_int_equal(mxq_tensor_check_float(ctx, &t), MXQ_ERR_FORMAT);
            assert_non_null(strstr(mxq_error_message(ctx), "tensor 'w' has a non-finite value"));
            assert_non_null(strstr(mxq_error_message(ctx), "[2, 4099]"));
            mxq_error_clear(ctx);
        }
    }
    mxq_tensor_view ints = {"ids", MXQ_DT_I32, 1, {4}, 4, 16, full, "f.safetensors"};
    assert_int_equal(mxq_tensor_check_float(ctx, &ints), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "expected a floating-point weight"));
    mxq_ctx_destroy(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_truncated),           cmocka_unit_test(test_header_too_large),
        cmocka_unit_test(test_bad_json),            cmocka_unit_test(test_offsets_out_of_range),
        cmocka_unit_test(test_overlap),             cmocka_unit_test(test_dtype_shape_mismatch),
        cmocka_unit_test(test_write_and_read_back), cmocka_unit_test(test_half_conversions),
        cmocka_unit_test(test_check_float),
    };
    return cmocka_run_group_tests_name("safetensors", tests, NULL, NULL);
}
