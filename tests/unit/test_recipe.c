/* Recipes: every shipped file parses; defaults fill what is left out; each
 * kind of mistake is an error naming the file, the line and the choices. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mxq/mxq.h"
#include "testutil.h"

/* Every .yaml of a shipped recipe folder parses, with the block size the
 * folder promises; returns how many there were. */
static int check_recipe_dir(const char *sub, int block)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s/../configs/recipes%s", tu_data_dir(), sub);
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *e;
    int parsed = 0;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len < 5 || strcmp(e->d_name + len - 5, ".yaml") != 0)
            continue;
        char path[8192];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        mxq_recipe r;
        if (mxq_recipe_load(ctx, path, &r) != MXQ_OK)
            fail_msg("%s", mxq_error_message(ctx));
        assert_true(r.has_weights && r.has_acts);
        assert_int_equal(r.weights.block, block);
        if (strstr(e->d_name, "-rtn"))
            assert_int_equal(r.n_steps, 0);
        if (strstr(e->d_name, "gptq"))
            assert_int_equal(r.steps[r.n_steps - 1].kind, MXQ_ALGO_GPTQ);
        mxq_recipe_free(&r);
        parsed++;
    }
    closedir(d);
    mxq_ctx_destroy(ctx);
    return parsed;
}

static void test_shipped_recipes_parse(void **state)
{
    (void)state;
    int paper = check_recipe_dir("", 128), block32 = check_recipe_dir("/block32", 32);
    print_message("# %d recipes at block 128, %d at block 32\n", paper, block32);
    /* Table 1's six rows for each of five weight/activation settings */
    assert_int_equal(paper, 30);
    assert_int_equal(block32, paper);
}

static void test_defaults(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_recipe r;
    const char *text = "weights: {format: mxfp4_e2m1}\n"
                       "algorithms:\n"
                       "  - awq: {}\n"
                       "  - gptq:\n";
    if (mxq_recipe_parse_string(ctx, text, "defaults.yaml", &r) != MXQ_OK)
        fail_msg("%s", mxq_error_message(ctx));
    assert_int_equal(r.weights.block, 32);
    assert_int_equal(r.weights.rounding, MXQ_ROUND_EVEN);
    assert_int_equal(r.has_acts, 0);
    assert_int_equal(r.calib_samples, 128);
    assert_int_equal(r.calib_mode, MXQ_CALIB_FP);
    assert_int_equal(r.n_steps, 2);
    assert_int_equal(r.steps[0].awq.grid, 20);
    assert_int_equal(r.steps[0].awq.clip, 1);
    assert_true(r.steps[0].awq.max_shrink == 0.5);
    assert_int_equal(r.steps[0].awq.sample_rows, 128);
    assert_int_equal(r.steps[1].gptq.microblock, 128);
    assert_true(r.steps[1].gptq.damp == 0.01);
    mxq_recipe_free(&r);

    text = "weights: {format: mxint4}\nalgorithms:\n  - awq: {sample_rows: 0}\n";
    assert_int_equal(mxq_recipe_parse_string(ctx, text, "rows.yaml", &r), MXQ_OK);
    assert_int_equal(r.steps[0].awq.sample_rows, 0); /* 0: every row */
    mxq_recipe_free(&r);
    text = "weights: {format: mxint4}\nalgorithms:\n  - awq: {sample_rows: 5}\n";
    assert_int_equal(mxq_recipe_parse_string(ctx, text, "rows.yaml", &r), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "rows.yaml:3: 'sample_rows' must be 0 (every row) or at least 32"));

    text = "weights: {format: mxint8, block: 64, rounding: nearest}\nactivations: none\nalgorithms: []\n"
           "calibration: {samples: 16, mode: sequential}\nexclude: ['*.mlp.down_proj', 'model.layers.0.*']\n";
    assert_int_equal(mxq_recipe_parse_string(ctx, text, "x.yaml", &r), MXQ_OK);
    assert_int_equal(r.weights.rounding, MXQ_ROUND_NEAREST);
    assert_int_equal(r.calib_mode, MXQ_CALIB_SEQUENTIAL);
    assert_int_equal(r.calib_samples, 16);
    assert_true(mxq_recipe_excludes(&r, "model.layers.3.mlp.down_proj"));
    assert_true(mxq_recipe_excludes(&r, "model.layers.0.self_attn.q_proj"));
    assert_false(mxq_recipe_excludes(&r, "model.layers.1.self_attn.q_proj"));
    mxq_recipe_free(&r);
    mxq_ctx_destroy(ctx);
}

/* An alias is its anchor's value (an anchor named like a format must not
 * be read as that format). */
static void test_aliases_take_the_anchored_value(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_recipe r;
    const char *text = "activations: {format: &mxint4 mxint8, block: &b32 64}\n"
                       "weights: {format: *mxint4, block: *b32}\n";
    if (mxq_recipe_parse_string(ctx, text, "alias.yaml", &r) != MXQ_OK)
        fail_msg("%s", mxq_error_message(ctx));
    assert_string_equal(r.weights.format->name, "mxint8");
    assert_int_equal(r.weights.block, 64);
    mxq_recipe_free(&r);
    mxq_ctx_destroy(ctx);
}

static void expect_error(const char *text, const char *fragment)
{
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_recipe r;
    if (mxq_recipe_parse_string(ctx, text, "bad.yaml", &r) == MXQ_OK)
        fail_msg("accepted a bad recipe; expected '%s'", fragment);
    if (!strstr(mxq_error_message(ctx), fragment))
        fail_msg("expected '%s' in: %s", fragment, mxq_error_message(ctx));
    mxq_ctx_destroy(ctx);
}

static void test_errors_with_lines(void **state)
{
    (void)state;
    expect_error("weights: {format: mxint4, blok: 32}\n", "bad.yaml:1: unknown key 'blok' in weights (valid: format block rounding)");
    expect_error("weights: {format: mxint5}\n", "bad.yaml:1: unknown format 'mxint5' in weights (valid: none mxint8");
    expect_error("weights: {format: mxint4}\nalgorithms:\n  - gptqq: {}\n", "bad.yaml:3: unknown algorithm 'gptqq'");
    expect_error("weights: {format: mxint4}\nalgorithms:\n  - gptq: {damp: 0.01, order: true}\n",
                 "bad.yaml:3: unknown key 'order' in gptq (valid: block microblock damp act_order)");
    expect_error("weights: {format: mxint4, block: 32}\nalgorithms:\n  - gptq: {microblock: 48}\n",
                 "bad.yaml:3: gptq.microblock 48 must be 1 or a multiple of the weight MX block 32");
    expect_error("weights: {format: mxint4}\nalgorithms:\n  - gptq: {}\n  - awq: {}\n", "bad.yaml:3: gptq must be the last algorithm");
    expect_error("weights: {format: mxint4}\nalgorithms:\n  - smoothquant: {}\n  - awq: {}\n", "cannot be combined");
    expect_error("weights: {format: mxint4}\nalgorithms:\n  - awq: {grid: many}\n", "bad.yaml:3: 'grid' must be an integer");
    expect_error("weights: {format: mxint4}\nalgorithms:\n  - awq: {clip: maybe}\n", "'clip' must be true or false");
    expect_error("weights: {format: mxint4}\n\n\nalgorithms:\n  - awq: {}\n  - awq: {}\n", "bad.yaml:6: algorithm 'awq' appears twice");
    expect_error("weights: none\nalgorithms:\n  - gptq: {}\n", "algorithms need a weight format");
    expect_error("weights: {format: mxint4}\ncalibration: {samples: 0}\n", "'samples' must be an integer in 1..");
    expect_error("weights: {format: mxint4}\ncalibration: {mode: fast}\n", "bad.yaml:2: unknown calibration mode 'fast'");
    expect_error("weights: {format: mxint4}\nactivation: {format: mxint8}\n",
                 "bad.yaml:2: unknown key 'activation' in the recipe (valid: weights activations algorithms calibration exclude)");
    expect_error("activations: {format: mxint8}\n", "needs a 'weights' entry");
    expect_error("weights: {format: mxint4\n", "not valid YAML");
    expect_error("weights: {block: 32}\n", "weights needs a 'format'");
    expect_error("weights: {format: mxint4, block: 5000}\n", "'block' must be an integer in 1..4096");
}

/* Inputs found by tests/fuzz/fuzz_recipe that hung or crashed libfyaml
 * 0.7.12: invalid UTF-8 and tabs are refused before it sees them. */
static void test_fuzz_findings(void **state)
{
    (void)state;
    char hang[140] = "%";
    memset(hang + 1, 0xff, 130);
    expect_error(hang, "bad.yaml: line 1, column 2 (byte 2): not valid UTF-8");
    expect_error("? - - - \t\tgrid:\t-", "bad.yaml: line 1, column 9: a tab");
    expect_error("weights: {format: mxint4}\n  \tblock: 32\n", "bad.yaml: line 2, column 3: a tab");
    expect_error("weights: {format: mxint4} # \xc0\xaf overlong\n", "line 1, column 29 (byte 29): not valid UTF-8");
    expect_error("weights: {format: mxint4}\n# \xc3\xa9 \xed\xa0\x80 surrogate\n", "line 2, column 5 (byte 32): not valid UTF-8");
    expect_error("weights: {format: mxint4}\n# \xc3\xa9 \xc3\xbc\tx\n", "bad.yaml: line 2, column 6: a tab");
    /* nested aliases ("billion laughs"): 9 levels of 9 would expand to 9^9 nodes */
    char bomb[2048] = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n";
    for (int l = 1; l <= 9; l++) {
        char line[160];
        snprintf(line, sizeof(line), "a%d: &a%d [*a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d]\n", l, l, l - 1,
                 l - 1, l - 1, l - 1, l - 1, l - 1, l - 1, l - 1, l - 1);
        strcat(bomb, line);
    }
    expect_error(bomb, "with its aliases expanded the recipe has more than 10000 YAML nodes");
    expect_error("weights: &w [*w]\n", "more than 10000 YAML nodes");
    /* valid UTF-8 is still welcome, in comments and in exclude patterns */
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_recipe r;
    assert_int_equal(mxq_recipe_parse_string(ctx, "# r\xc3\xa9sum\xc3\xa9 \xf0\x9f\x98\x80\nweights: {format: mxint4}\n"
                                                  "exclude: [\"caf\xc3\xa9.*\"]\n",
                                             "ok.yaml", &r),
                     MXQ_OK);
    mxq_recipe_free(&r);
    mxq_ctx_destroy(ctx);
}

static void test_missing_file(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_recipe r;
    assert_int_equal(mxq_recipe_load(ctx, "/nonexistent/r.yaml", &r), MXQ_ERR_IO);
    assert_non_null(strstr(mxq_error_message(ctx), "/nonexistent/r.yaml"));
    mxq_ctx_destroy(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shipped_recipes_parse),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_aliases_take_the_anchored_value),
        cmocka_unit_test(test_errors_with_lines),
        cmocka_unit_test(test_fuzz_findings),
        cmocka_unit_test(test_missing_file),
    };
    return cmocka_run_group_tests_name("recipe", tests, NULL, NULL);
}
