/* `mxq eval` end to end under mpirun: perplexity equal to transformers'
 * reference, identical output for 1, 2 and 3 ranks, and for every kind of
 * bad input a clear error, a non-zero exit and no hang. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "mxq/mxq.h"
#include "testutil.h"

#define HANG_LIMIT "120"

/* mpirun -n ranks mxq eval <args...>, under a timeout that turns a hang
 * into exit code 124. */
static tu_run_result run_eval(int ranks, const char *first, ...)
{
    const char *bin = getenv("MXQ_BIN");
    assert_non_null(bin);
    char n[16];
    snprintf(n, sizeof(n), "%d", ranks);
    const char *prefix[] = {"timeout", HANG_LIMIT, "mpirun", "-n", n, "--oversubscribe", bin, "eval", first};
    tu_run_result r;
    va_list ap;
    va_start(ap, first);
    tu_run_prefixed(prefix, sizeof(prefix) / sizeof(prefix[0]) - (first ? 0 : 1), ap, &r);
    va_end(ap);
    if (r.exit_code == 124)
        fail_msg("mxq eval on %d ranks did not finish within %s s (hang); stderr: %s", ranks, HANG_LIMIT, r.err);
    return r;
}

static double reference_attr(const char *group, const char *attr)
{
    hid_t f = H5Fopen(tu_data_path("stories260K/reference.h5"), H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t a = H5Aopen_by_name(f, group, attr, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(a >= 0);
    double v = 0;
    H5Aread(a, H5T_NATIVE_DOUBLE, &v);
    H5Aclose(a);
    H5Fclose(f);
    return v;
}

static double json_number(const char *path, const char *key)
{
    char *text = tu_read_file(path, NULL);
    char pattern[64];
    snprintf(pattern, sizeof(pattern), "\"%s\": ", key);
    char *p = strstr(text, pattern);
    if (!p)
        fail_msg("%s has no key %s", path, key);
    double v = strtod(p + strlen(pattern), NULL);
    free(text);
    return v;
}

static void check_ppl(const char *token_file, const char *group)
{
    char json[512];
    snprintf(json, sizeof(json), "%s/%s.json", tu_scratch_dir(), group + 5);
    tu_run_result r = run_eval(2, "--model", tu_data_path("stories260K"), "--tokens", tu_data_path(token_file), "--json",
                               json, "--quiet", NULL);
    if (r.exit_code != 0)
        fail_msg("mxq eval failed: %s", r.err);
    double ppl = json_number(json, "ppl"), nll = json_number(json, "mean_nll");
    double ref_ppl = reference_attr(group, "ppl"), ref_nll = reference_attr(group, "mean_nll");
    double scored = json_number(json, "tokens_scored"), ref_scored = reference_attr(group, "scored");
    print_message("# %s: ppl %.6f (transformers %.6f, rel diff %.2g), mean NLL %.8f (%.8f)\n", token_file, ppl, ref_ppl,
                  fabs(ppl - ref_ppl) / ref_ppl, nll, ref_nll);
    assert_true(fabs(ppl - ref_ppl) <= 1e-4 * ref_ppl);
    assert_true(scored == ref_scored);
    assert_true(json_number(json, "tokens_per_s") > 0);
    assert_true(json_number(json, "seconds") > 0);
}

static void test_ppl_eval_matches_transformers(void **state)
{
    (void)state;
    check_ppl("stories260K/eval.h5", "/ppl/eval");
}

/* The calibration file too (its 128 sequences; WikiText-2, 3161 sequences
 * and 17 s here, is checked by scripts/reference_check.sh instead). */
static void test_ppl_calib_matches_transformers(void **state)
{
    (void)state;
    check_ppl("stories260K/calib.h5", "/ppl/calib");
}

/* The printed line's perplexity and NLL, and the JSON mean_nll to 17 digits,
 * are the same for 1, 2 and 3 ranks. */
static void test_same_result_any_rank_count(void **state)
{
    (void)state;
    char first_line[3][256];
    char *first_json = NULL;
    for (int ranks = 1; ranks <= 3; ranks++) {
        char json[512];
        snprintf(json, sizeof(json), "%s/ranks%d.json", tu_scratch_dir(), ranks);
        tu_run_result r = run_eval(ranks, "--model", tu_data_path("stories260K"), "--tokens",
                                   tu_data_path("stories260K/eval.h5"), "--limit", "50", "--batch", "4", "--json", json,
                                   "--quiet", NULL);
        if (r.exit_code != 0)
            fail_msg("mxq eval on %d ranks failed: %s", ranks, r.err);
        /* "perplexity X  mean_nll Y  tokens_scored Z ..." up to "ranks" */
        char *cut = strstr(r.out, "  ranks");
        assert_non_null(cut);
        snprintf(first_line[ranks - 1], sizeof(first_line[0]), "%.*s", (int)(cut - r.out), r.out);
        char *text = tu_read_file(json, NULL);
        char *nll = strstr(text, "\"mean_nll\"");
        assert_non_null(nll);
        nll[strcspn(nll, ",")] = '\0';
        if (ranks == 1)
            first_json = strdup(nll);
        else
            assert_string_equal(nll, first_json);
        free(text);
    }
    print_message("# %s (1, 2 and 3 ranks)\n", first_line[0]);
    assert_string_equal(first_line[0], first_line[1]);
    assert_string_equal(first_line[0], first_line[2]);
    free(first_json);
}

/* Fake quantization: W8A8 MXINT costs almost nothing; W2 costs a lot. */
static void test_fake_quant_sanity(void **state)
{
    (void)state;
    tu_run_result base = run_eval(1, "--model", tu_data_path("stories260K"), "--tokens",
                                  tu_data_path("stories260K/eval.h5"), "--limit", "40", "-q", NULL);
    tu_run_result w8 = run_eval(1, "--model", tu_data_path("stories260K"), "--tokens", tu_data_path("stories260K/eval.h5"),
                                "--limit", "40", "--weights", "mxint8", "--acts", "mxint8", "--block", "32", "-q", NULL);
    tu_run_result w2 = run_eval(1, "--model", tu_data_path("stories260K"), "--tokens", tu_data_path("stories260K/eval.h5"),
                                "--limit", "40", "--weights", "mxint2", "--block", "32", "-q", NULL);
    assert_int_equal(base.exit_code, 0);
    assert_int_equal(w8.exit_code, 0);
    assert_int_equal(w2.exit_code, 0);
    double p0 = strtod(base.out + strlen("perplexity "), NULL);
    double p8 = strtod(w8.out + strlen("perplexity "), NULL);
    double p2 = strtod(w2.out + strlen("perplexity "), NULL);
    print_message("# ppl FP %.4f, W8A8 mxint8 %.4f, W2 mxint2 %.4f\n", p0, p8, p2);
    assert_true(fabs(p8 - p0) / p0 < 0.01);
    assert_true(p2 > 1.5 * p0);
}

/* ---- bad input ----------------------------------------------------------- */

static char *model_header(size_t *header_len, char **file_data, size_t *file_size)
{
    char *data = tu_read_file(tu_data_path("stories260K/model.safetensors"), file_size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = n << 8 | (unsigned char)data[i];
    char *header = malloc(n + 1);
    memcpy(header, data + 8, n);
    header[n] = '\0';
    *header_len = n;
    *file_data = data;
    return header;
}

/* A scratch model dir: config.json with `cfg_from` replaced by `cfg_to`, and
 * model.safetensors whose header has `hdr_from` replaced by `hdr_to` (the
 * header length is rewritten to match). */
static const char *variant(const char *name, const char *cfg_from, const char *cfg_to, const char *hdr_from,
                           const char *hdr_to)
{
    static char dir[512];
    snprintf(dir, sizeof(dir), "%s/%s", tu_scratch_dir(), name);
    mkdir(dir, 0755);
    char path[1024];

    char *cfg = tu_read_file(tu_data_path("stories260K/config.json"), NULL);
    char out[8192];
    if (cfg_from) {
        char *at = strstr(cfg, cfg_from);
        if (!at)
            fail_msg("config.json has no '%s'", cfg_from);
        snprintf(out, sizeof(out), "%.*s%s%s", (int)(at - cfg), cfg, cfg_to, at + strlen(cfg_from));
    } else {
        snprintf(out, sizeof(out), "%s", cfg);
    }
    snprintf(path, sizeof(path), "%s/config.json", dir);
    tu_write_file(path, out, strlen(out));
    free(cfg);

    size_t hlen, fsize;
    char *data;
    char *header = model_header(&hlen, &data, &fsize);
    char *new_header = malloc(hlen + 4096);
    if (hdr_from) {
        char *at = strstr(header, hdr_from);
        if (!at)
            fail_msg("header has no '%s'", hdr_from);
        sprintf(new_header, "%.*s%s%s", (int)(at - header), header, hdr_to, at + strlen(hdr_from));
    } else {
        strcpy(new_header, header);
    }
    size_t nlen = strlen(new_header);
    size_t body = fsize - 8 - hlen;
    char *file = malloc(8 + nlen + body);
    for (int i = 0; i < 8; i++)
        file[i] = (char)((nlen >> (8 * i)) & 0xFF);
    memcpy(file + 8, new_header, nlen);
    memcpy(file + 8 + nlen, data + 8 + hlen, body);
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    tu_write_file(path, file, 8 + nlen + body);
    free(file);
    free(new_header);
    free(header);
    free(data);
    return dir;
}

/* Expect failure naming every fragment, once. On 2 ranks: the validation
 * itself is unit-tested (test_safetensors, test_config_synth), and that
 * every rank stops whichever fails is the fault-injection test's (cli_faults);
 * here the point is the message a user sees. */
static void expect_eval_error(const char *model_dir, const char *tokens, const char *frag1, const char *frag2)
{
    tu_run_result r = run_eval(2, "--model", model_dir, "--tokens", tokens ? tokens : tu_data_path("stories260K/eval.h5"),
                               "--limit", "8", NULL);
    if (r.exit_code == 0)
        fail_msg("expected failure, got success: %s", r.out);
    if (frag1 && !strstr(r.err, frag1))
        fail_msg("stderr lacks '%s': %s", frag1, r.err);
    if (frag2 && !strstr(r.err, frag2))
        fail_msg("stderr lacks '%s': %s", frag2, r.err);
    /* one explanation, not one per rank */
    const char *first = strstr(r.err, "mxq eval: error:");
    assert_non_null(first);
    if (strstr(first + 1, "mxq eval: error:"))
        fail_msg("the same error was printed more than once: %s", r.err);
}

static void test_error_truncated_model(void **state)
{
    (void)state;
    const char *dir = variant("truncated", NULL, NULL, NULL, NULL);
    char path[1024];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    assert_int_equal(truncate(path, 500000), 0);
    expect_eval_error(dir, NULL, "model.safetensors", "outside the data area");
}

static void test_error_header_too_big(void **state)
{
    (void)state;
    const char *dir = variant("bighdr", NULL, NULL, NULL, NULL);
    char path[1024];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    size_t size;
    char *data = tu_read_file(path, &size);
    uint64_t big = 150000000ull;
    for (int i = 0; i < 8; i++)
        data[i] = (char)((big >> (8 * i)) & 0xFF);
    tu_write_file(path, data, size);
    free(data);
    expect_eval_error(dir, NULL, "model.safetensors", "exceeds the 100000000-byte limit");
}

static void test_error_bad_json_header(void **state)
{
    (void)state;
    const char *dir = variant("badjson", NULL, NULL, "\"dtype\":\"F32\",\"shape\":[512,64]", "\"dtype\":\"F32\",,\"shape\":[512,64]");
    expect_eval_error(dir, NULL, "model.safetensors", "not valid JSON");
}

static void test_error_offsets_out_of_range(void **state)
{
    (void)state;
    const char *dir = variant("oob", NULL, NULL, "\"data_offsets\":[0,131072]", "\"data_offsets\":[0,99999999]");
    expect_eval_error(dir, NULL, "'model.embed_tokens.weight'", "outside the data area");
}

static void test_error_overlapping_tensors(void **state)
{
    (void)state;
    /* the first layer norm moved onto the embedding's bytes */
    const char *dir = variant("overlap", NULL, NULL, "\"data_offsets\":[131072,131328]", "\"data_offsets\":[1024,1280]");
    expect_eval_error(dir, NULL, "overlap", "model.layers.0.input_layernorm.weight");
}

static void test_error_dtype_shape_mismatch(void **state)
{
    (void)state;
    const char *dir = variant("dtype", NULL, NULL, "{\"dtype\":\"F32\",\"shape\":[512,64]", "{\"dtype\":\"BF16\",\"shape\":[512,64]");
    expect_eval_error(dir, NULL, "'model.embed_tokens.weight' is BF16", "65536 bytes");
    /* shapes disagree with config.json */
    dir = variant("shape", "\"intermediate_size\": 172", "\"intermediate_size\": 170", NULL, NULL);
    expect_eval_error(dir, NULL, "mlp.gate_proj.weight' has shape [172, 64], expected [170, 64]", NULL);
}

static void test_error_missing_tensor(void **state)
{
    (void)state;
    /* config asks for a 6th layer the checkpoint does not have */
    const char *dir = variant("missing", "\"num_hidden_layers\": 5", "\"num_hidden_layers\": 6", NULL, NULL);
    expect_eval_error(dir, NULL, "model.layers.5.input_layernorm.weight", "missing");
}

static void test_error_index_missing_shard(void **state)
{
    (void)state;
    const char *dir = variant("sharded", NULL, NULL, NULL, NULL);
    char path[1024];
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    const char *index = "{\"metadata\": {}, \"weight_map\": {\"model.embed_tokens.weight\": \"model.safetensors\", "
                        "\"model.norm.weight\": \"model-00002-of-00002.safetensors\"}}";
    tu_write_file(path, index, strlen(index));
    expect_eval_error(dir, NULL, "model-00002-of-00002.safetensors", "model.norm.weight");
}

static void test_error_config_missing_key(void **state)
{
    (void)state;
    const char *dir = variant("nokey", "\"hidden_size\": 64,", "", NULL, NULL);
    expect_eval_error(dir, NULL, "config.json", "missing required key 'hidden_size'");
}

static void test_error_unsupported_arch(void **state)
{
    (void)state;
    const char *dir = variant("arch", "\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"", NULL, NULL);
    expect_eval_error(dir, NULL, "config.json", "unsupported architecture 'gpt2'");
    dir = variant("rope", "\"rope_theta\": 10000.0,", "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0},",
                  NULL, NULL);
    expect_eval_error(dir, NULL, "config.json", "rope_type 'yarn' is not supported");
}

static const char *token_file(const char *name, hid_t type, int rank, const hsize_t *dims, const void *data)
{
    static char path[512];
    snprintf(path, sizeof(path), "%s/%s", tu_scratch_dir(), name);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    tu_h5_write(f, "/tokens", type, type, rank, dims, data);
    H5Fclose(f);
    return path;
}

static void test_error_token_ids_out_of_range(void **state)
{
    (void)state;
    int32_t ids[2 * 16];
    for (int i = 0; i < 32; i++)
        ids[i] = i % 7 + 1;
    ids[16 + 5] = 512; /* vocab is 512 */
    hsize_t dims[2] = {2, 16};
    const char *path = token_file("bad_ids.h5", H5T_NATIVE_INT32, 2, dims, ids);
    expect_eval_error(tu_data_path("stories260K"), path, "bad_ids.h5", "id 512 at sequence 1, position 5");
}

static void test_error_tokens_wrong_type_or_rank(void **state)
{
    (void)state;
    float f[2 * 16] = {0};
    hsize_t dims[2] = {2, 16};
    expect_eval_error(tu_data_path("stories260K"), token_file("float_tokens.h5", H5T_NATIVE_FLOAT, 2, dims, f),
                      "float_tokens.h5", "must be int32, but it is a float");
    int32_t ids[32] = {0};
    hsize_t d1[1] = {32};
    expect_eval_error(tu_data_path("stories260K"), token_file("flat_tokens.h5", H5T_NATIVE_INT32, 1, d1, ids),
                      "flat_tokens.h5", "must be 2-D");
    expect_eval_error(tu_data_path("stories260K"), "/nonexistent/tokens.h5", "/nonexistent/tokens.h5",
                      "No such file");
}

static void test_error_too_many_ranks(void **state)
{
    (void)state;
    tu_run_result r = run_eval(6, "--model", tu_data_path("stories260K"), "--tokens", tu_data_path("stories260K/eval.h5"),
                               "--limit", "8", NULL);
    assert_int_not_equal(r.exit_code, 0);
    assert_non_null(strstr(r.err, "6 ranks but the model has only 5 decoder layers"));
}

int main(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ppl_eval_matches_transformers),
        cmocka_unit_test(test_ppl_calib_matches_transformers),
        cmocka_unit_test(test_same_result_any_rank_count),
        cmocka_unit_test(test_fake_quant_sanity),
        cmocka_unit_test(test_error_truncated_model),
        cmocka_unit_test(test_error_header_too_big),
        cmocka_unit_test(test_error_bad_json_header),
        cmocka_unit_test(test_error_offsets_out_of_range),
        cmocka_unit_test(test_error_overlapping_tensors),
        cmocka_unit_test(test_error_dtype_shape_mismatch),
        cmocka_unit_test(test_error_missing_tensor),
        cmocka_unit_test(test_error_index_missing_shard),
        cmocka_unit_test(test_error_config_missing_key),
        cmocka_unit_test(test_error_unsupported_arch),
        cmocka_unit_test(test_error_token_ids_out_of_range),
        cmocka_unit_test(test_error_tokens_wrong_type_or_rank),
        cmocka_unit_test(test_error_too_many_ranks),
    };
    return cmocka_run_group_tests_name("cli_eval", tests, NULL, NULL);
}
