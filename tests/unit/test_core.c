/* The context: fault-injection specs are parsed strictly (a typo must not
 * turn the fault walk into a walk that injects nothing), a fault fires once
 * on the named rank at the named step, and error context goes in front of
 * the cause, which survives a long chain. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/check.h"
#include "io/sha256.h"
#include "mxq/mxq.h"

static void test_fault_specs(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    const char *good[] = {NULL, "", "list", "0:eval.setup", "*:quantize.load", "12:a"};
    const char *bad[] = {"x", "1:", ":a", "1x:a", "-1:a", "*x:a", "**:a", " 1:a", "+1:a"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        assert_int_equal(mxq_ctx_set_fault(ctx, good[i]), 0);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (mxq_ctx_set_fault(ctx, bad[i]) != -1)
            fail_msg("MXQ_FAULT '%s' accepted", bad[i]);
    mxq_ctx_destroy(ctx);
}

static void test_fault_fires_once_on_its_rank(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    mxq_ctx_set_rank(ctx, 1, 3);
    assert_int_equal(mxq_ctx_set_fault(ctx, "2:step.b"), 0);
    assert_int_equal(mxq_fault_point(ctx, "step.b"), MXQ_OK); /* rank 1 is not rank 2 */
    assert_int_equal(mxq_ctx_set_fault(ctx, "1:step.b"), 0);
    assert_int_equal(mxq_fault_point(ctx, "step.a"), MXQ_OK);
    assert_int_not_equal(mxq_fault_point(ctx, "step.b"), MXQ_OK);
    assert_non_null(strstr(mxq_error_message(ctx), "rank 1 at step 'step.b'"));
    mxq_error_clear(ctx);
    assert_int_equal(mxq_fault_point(ctx, "step.b"), MXQ_OK); /* once only */
    mxq_ctx_destroy(ctx);
}

static void test_context_goes_in_front_of_the_cause(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    mxq_error_set(ctx, MXQ_ERR_IO, __FILE__, __LINE__, "the cause");
    mxq_error_context(ctx, "step");
    mxq_error_context(ctx, "layer %d", 3);
    assert_string_equal(mxq_error_message(ctx), "layer 3: step: the cause");
    /* a cause with a 4000-character path keeps its reason and gains context */
    char path[4001];
    memset(path, 'p', sizeof(path) - 1);
    path[sizeof(path) - 1] = '\0';
    mxq_error_clear(ctx);
    mxq_error_set(ctx, MXQ_ERR_IO, __FILE__, __LINE__, "cannot open '%s' for '%s': No such file", path, path);
    mxq_error_context(ctx, "reading '%s'", path);
    const char *msg = mxq_error_message(ctx);
    assert_true(strncmp(msg, "reading 'ppp", 12) == 0);
    assert_non_null(strstr(msg, "': No such file"));
    mxq_ctx_destroy(ctx);
}

/* FIPS 180-4's examples (and the long one of its test vectors), fed in
 * pieces of every size so that block boundaries fall everywhere. */
static void sha256_of(const char *text, size_t len, size_t piece, size_t repeat, char hex[65])
{
    mxq_sha256 s;
    mxq_sha256_init(&s);
    for (size_t r = 0; r < repeat; r++)
        for (size_t off = 0; off < len; off += piece)
            mxq_sha256_update(&s, text + off, len - off < piece ? len - off : piece);
    mxq_sha256_hex(&s, hex);
}

static void test_sha256_vectors(void **state)
{
    (void)state;
    static const char *two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    char hex[65];
    for (size_t piece = 1; piece <= 64; piece++) {
        sha256_of("", 0, piece, 1, hex);
        assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        sha256_of("abc", 3, piece, 1, hex);
        assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        sha256_of(two_blocks, strlen(two_blocks), piece, 1, hex);
        assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    }
    sha256_of("aaaaaaaaaa", 10, 7, 100000, hex); /* one million 'a' */
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_fault_specs),
        cmocka_unit_test(test_fault_fires_once_on_its_rank),
        cmocka_unit_test(test_context_goes_in_front_of_the_cause),
    };
    return cmocka_run_group_tests_name("core", tests, NULL, NULL);
}
