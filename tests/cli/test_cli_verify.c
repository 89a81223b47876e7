/* mxq verify on a checkpoint mxq quantize wrote (the bundled model, W4A8
 * MXINT RTN, 2 shards): it passes as written, and each corruption is
 * found and named in one error line: a flipped byte in any tensor, a
 * truncated shard, a missing shard, bytes appended to a shard, an invalid
 * element code and a scale byte out of range (with the index's checksum
 * recomputed by sha256sum, so that the content checks must find them), and
 * an unknown format_version. mxq inspect of the same checkpoint gives its
 * recipe, its size and bits per weight as the shards' headers and sizes
 * give them, and one loss line per layer. */
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "mxq/core.h"
#include "testutil.h"

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"

static const char *checkpoint(void)
{
    static const char *dir;
    if (dir)
        return dir;
    dir = tu_scratch_path("verified");
    const char *argv[] = {"timeout", "300", "mpirun", "-n", "2", "--oversubscribe", getenv("MXQ_BIN"), "quantize",
                          "--model", tu_data_path("stories260K"), "--calib", tu_data_path("stories260K/calib.h5"),
                          "--recipe", tu_data_path("../configs/recipes/block32/w4a8-mxint-rtn.yaml"), "--out", dir,
                          "-q", NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (r.exit_code != 0)
        fail_msg("quantize failed: %.600s", r.err);
    return dir;
}

static tu_run_result verify(const char *dir)
{
    const char *argv[] = {getenv("MXQ_BIN"), "verify", dir, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    return r;
}

static int count(const char *text, const char *what)
{
    int n = 0;
    for (const char *p = strstr(text, what); p; p = strstr(p + 1, what))
        n++;
    return n;
}

static void expect_found(const char *what, const char *dir, const char *fragment)
{
    tu_run_result r = verify(dir);
    const char *line = strstr(r.err, "error:");
    print_message("# %s: exit %d: %.*s\n", what, r.exit_code, line ? (int)strcspn(line, "\n") : 0, line ? line : "");
    if (r.exit_code != 1 || count(r.err, "error:") != 1 || !strstr(r.err, fragment))
        fail_msg("%s: expected exit 1 and one error line naming '%s': exit %d, %.600s", what, fragment, r.exit_code,
                 r.err);
}

/* A scratch copy of the checkpoint, to corrupt. */
static const char *copy_of(const char *name)
{
    const char *dir = tu_scratch_path("%s", name);
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s' && cp -r '%s' '%s'", dir, checkpoint(), dir);
    assert_int_equal(system(cmd), 0);
    return dir;
}

/* The index's SHA-256 of `shard` set to what sha256sum says now. */
static void rehash(const char *dir, const char *shard)
{
    char cmd[2048], index[1024];
    snprintf(cmd, sizeof(cmd), "sha256sum '%s/%s'", dir, shard);
    FILE *p = popen(cmd, "r");
    char hex[65] = "";
    assert_non_null(p);
    assert_int_equal(fscanf(p, "%64s", hex), 1);
    pclose(p);
    snprintf(index, sizeof(index), "%s/model.safetensors.index.json", dir);
    json_t *root = json_load_file(index, 0, NULL);
    json_t *entry = json_object_get(json_object_get(json_object_get(root, "metadata"), "mxq_shards"), shard);
    assert_non_null(entry);
    json_object_set_new(entry, "sha256", json_string(hex));
    assert_int_equal(json_dump_file(root, index, JSON_INDENT(2)), 0);
    json_decref(root);
}

static void test_written_checkpoint_passes(void **state)
{
    (void)state;
    tu_run_result r = verify(checkpoint());
    if (r.exit_code != 0 || !strstr(r.out, "OK") || !strstr(r.out, "SHA-256"))
        fail_msg("verify of a fresh checkpoint: exit %d, %s %s", r.exit_code, r.out, r.err);
    /* the checksums are those of an independent tool */
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "cd '%s' && grep -q \"$(sha256sum %s | cut -c1-64)\" model.safetensors.index.json",
             checkpoint(), SHARD1);
    assert_int_equal(system(cmd), 0);
}

/* One byte flipped in the middle of every tensor of both shards, in turn. */
static void test_flipped_byte_in_any_tensor(void **state)
{
    (void)state;
    const char *dir = copy_of("flipped");
    const char *shards[] = {SHARD1, SHARD2};
    int tested = 0;
    for (int s = 0; s < 2; s++) {
        char path[1024];
        size_t n, start;
        snprintf(path, sizeof(path), "%s/%s", dir, shards[s]);
        json_t *header = tu_safetensors_header(path, &start);
        const char *name;
        json_t *entry;
        json_object_foreach(header, name, entry)
        {
            json_t *off = json_object_get(entry, "data_offsets");
            if (!off)
                continue;
            const size_t mid = (size_t)(json_integer_value(json_array_get(off, 1)) -
                                        json_integer_value(json_array_get(off, 0))) / 2;
            char *data = tu_read_file(path, &n);
            unsigned char byte =
                (unsigned char)data[start + (size_t)json_integer_value(json_array_get(off, 0)) + mid] ^ 0x10;
            free(data);
            tu_poke_tensor(dir, shards[s], name, mid, &byte, 1);
            tu_run_result r = verify(dir);
            if (r.exit_code != 1 || !strstr(r.err, "SHA-256") || !strstr(r.err, shards[s]))
                fail_msg("a flipped byte in %s of %s: exit %d, %.400s", name, shards[s], r.exit_code, r.err);
            byte ^= 0x10;
            tu_poke_tensor(dir, shards[s], name, mid, &byte, 1);
            tested++;
        }
        json_decref(header);
    }
    print_message("# a byte flipped in each of the %d tensors: found every time\n", tested);
    assert_true(tested > 40);
    assert_int_equal(verify(dir).exit_code, 0); /* flipped back: whole again */
}

static void test_truncated_missing_and_extended_shards(void **state)
{
    (void)state;
    char cmd[2048];
    const char *dir = copy_of("truncated");
    snprintf(cmd, sizeof(cmd), "truncate -s -100 '%s/%s'", dir, SHARD2);
    assert_int_equal(system(cmd), 0);
    expect_found("a truncated shard", dir, "truncated");
    dir = copy_of("missing");
    snprintf(cmd, sizeof(cmd), "rm '%s/%s'", dir, SHARD1);
    assert_int_equal(system(cmd), 0);
    expect_found("a missing shard", dir, "is missing");
    dir = copy_of("extended");
    snprintf(cmd, sizeof(cmd), "head -c 16 /dev/zero >> '%s/%s'", dir, SHARD1);
    assert_int_equal(system(cmd), 0);
    expect_found("16 bytes after a shard", dir, "bytes appended");
}

/* Content corruptions behind a checksum that matches them. */
static void test_invalid_code_and_scale_bytes(void **state)
{
    (void)state;
    const unsigned char minus8 = 0x88, zero = 0, nan = 255;
    const char *dir = copy_of("bad-code");
    tu_poke_tensor(dir, SHARD1, "model.layers.0.mlp.up_proj.weight_packed", 10, &minus8, 1);
    rehash(dir, SHARD1);
    expect_found("an MXINT4 code -8", dir, "holds code 0x8, which is no mxint4 element");
    dir = copy_of("zero-scale");
    tu_poke_tensor(dir, SHARD1, "model.layers.1.self_attn.o_proj.weight_scale", 3, &zero, 1);
    rehash(dir, SHARD1);
    expect_found("a scale byte 0", dir, "scale byte 0");
    dir = copy_of("nan-scale");
    tu_poke_tensor(dir, SHARD2, "model.layers.4.mlp.down_proj.weight_scale", 7, &nan, 1);
    rehash(dir, SHARD2);
    expect_found("a scale byte 255", dir, "scale byte 255");
}

static void test_unknown_format_version(void **state)
{
    (void)state;
    const char *dir = copy_of("format-2");
    char path[1024];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    json_t *cfg = json_load_file(path, 0, NULL);
    assert_non_null(cfg);
    json_object_set_new(json_object_get(cfg, "quantization_config"), "format_version", json_integer(2));
    assert_int_equal(json_dump_file(cfg, path, JSON_INDENT(2)), 0);
    json_decref(cfg);
    expect_found("format_version 2", dir, "format_version");
    tu_run_result r = verify(tu_scratch_path("no-such-dir"));
    if (r.exit_code != 1 || !strstr(r.err, "not a checkpoint directory"))
        fail_msg("verify of a missing directory: %.400s", r.err);
}

static void expect_line(const char *text, const char *line)
{
    if (!strstr(text, line))
        fail_msg("mxq inspect printed no '%s':\n%s", line, text);
}

/* Bytes of the packed weights and scales in a shard, from its header. */
static size_t mx_bytes(const char *dir, const char *shard)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, shard);
    size_t data_start;
    json_t *header = tu_safetensors_header(path, &data_start);
    const char *name;
    json_t *entry;
    size_t bytes = 0;
    json_object_foreach(header, name, entry)
    {
        if (!strstr(name, ".weight_packed") && !strstr(name, ".weight_scale"))
            continue;
        json_t *off = json_object_get(entry, "data_offsets");
        bytes += (size_t)(json_integer_value(json_array_get(off, 1)) - json_integer_value(json_array_get(off, 0)));
    }
    json_decref(header);
    return bytes;
}

static void test_inspect(void **state)
{
    (void)state;
    const char *dir = checkpoint();
    const char *argv[] = {getenv("MXQ_BIN"), "inspect", dir, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    assert_int_equal(r.exit_code, 0);
    expect_line(r.out, "  weights      mxint4, MX block 32, rounding even\n");
    expect_line(r.out, "  activations  mxint8, MX block 32, rounding even");
    expect_line(r.out, "  algorithms   none (round to nearest)\n");
    expect_line(r.out, "  calibration  128 sequences, fp mode, ");
    expect_line(r.out, "run          mxq " MXQ_VERSION ", 2 ranks, group size 1;");
    /* stories260K: 5 layers of q, o [64, 64], k, v [32, 64], gate, up [172, 64], down [64, 172] */
    const double weights = 5.0 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64);
    char line[256];
    snprintf(line, sizeof(line), "35 quantized, %.2f MB for 227K weights: %.3f bits per weight",
             (double)(mx_bytes(dir, SHARD1) + mx_bytes(dir, SHARD2)) / 1e6,
             8.0 * (double)(mx_bytes(dir, SHARD1) + mx_bytes(dir, SHARD2)) / weights);
    expect_line(r.out, line);
    size_t size1 = 0, size2 = 0;
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, SHARD1);
    free(tu_read_file(path, &size1));
    snprintf(path, sizeof(path), "%s/%s", dir, SHARD2);
    free(tu_read_file(path, &size2));
    snprintf(line, sizeof(line), "storage      2 shards, %.2f MB on disk: ", (double)(size1 + size2) / 1e6);
    expect_line(r.out, line);
    for (int l = 0; l < 5; l++) {
        snprintf(line, sizeof(line), "\n%-6d %-5d ", l, l < 2 ? 0 : 1);
        expect_line(r.out, line);
    }
    expect_line(r.out, "\ntotal        ");

    const char *plain[] = {getenv("MXQ_BIN"), "inspect", tu_data_path("stories260K"), NULL};
    tu_run(plain, &r);
    assert_int_equal(r.exit_code, 0);
    expect_line(r.out, "recipe       none: not a checkpoint mxq wrote");
    /* tied embedding [512, 64], 5 layers of the linears above and 2 norms, the final norm */
    const double params = 512.0 * 64 + weights + 5 * 2 * 64 + 64;
    size_t fp_size = 0;
    free(tu_read_file(tu_data_path("stories260K/model.safetensors"), &fp_size));
    snprintf(line, sizeof(line), "storage      1 shard, %.2f MB on disk: %.3fx FP16 (%.2f MB)", (double)fp_size / 1e6,
             (double)fp_size / (2 * params), 2 * params / 1e6);
    expect_line(r.out, line);
    const char *missing[] = {getenv("MXQ_BIN"), "inspect", tu_scratch_path("no-such-dir"), NULL};
    tu_run(missing, &r);
    assert_int_equal(r.exit_code, 1);
    assert_non_null(strstr(r.err, "no-such-dir/config.json"));
}

/* A recipe that keeps layer 0 unquantized: bits per weight count the
 * quantized linears only; a damaged report is named, not printed. */
static void test_inspect_exclude_and_damaged_report(void **state)
{
    (void)state;
    const char *recipe = tu_edited_copy(tu_data_path("../configs/recipes/block32/w4a8-mxint-rtn.yaml"), "exclude: []",
                                        "exclude: [\"*.layers.0.*\"]", "exclude.yaml");
    const char *dir = tu_scratch_path("excluded");
    const char *q[] = {"mpirun", "-n", "2", "--oversubscribe", getenv("MXQ_BIN"), "quantize", "--model",
                       tu_data_path("stories260K"), "--calib", tu_data_path("stories260K/calib.h5"), "--recipe", recipe,
                       "--out", dir, "-q", NULL};
    tu_run_result r;
    tu_run(q, &r);
    if (r.exit_code != 0)
        fail_msg("quantize with an exclude failed: %.600s", r.err);
    const char *argv[] = {getenv("MXQ_BIN"), "inspect", dir, NULL};
    tu_run(argv, &r);
    assert_int_equal(r.exit_code, 0);
    const double weights = 4.0 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 172 * 64); /* layers 1-4 */
    const size_t bytes = mx_bytes(dir, SHARD1) + mx_bytes(dir, SHARD2);
    char line[256];
    snprintf(line, sizeof(line), "28 quantized, %.2f MB for 181K weights: %.3f bits per weight", (double)bytes / 1e6,
             8.0 * (double)bytes / weights);
    expect_line(r.out, line);
    expect_line(r.out, "  exclude      *.layers.0.*\n");
    expect_line(r.out, "\n0      0       0.0000e+00   0.0000e+00    +0.0%");

    char path[1024];
    snprintf(path, sizeof(path), "%s/mxq_report.json", dir);
    json_t *report = json_load_file(path, 0, NULL);
    assert_non_null(report);
    json_object_set_new(report, "totals", json_integer(3));
    assert_int_equal(json_dump_file(report, path, 0), 0);
    json_decref(report);
    tu_run(argv, &r);
    assert_int_equal(r.exit_code, 1);
    if (!strstr(r.err, "mxq_report.json: 'totals' must be an object"))
        fail_msg("a damaged report was not named: %s", r.err);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_written_checkpoint_passes),
        cmocka_unit_test(test_flipped_byte_in_any_tensor),
        cmocka_unit_test(test_truncated_missing_and_extended_shards),
        cmocka_unit_test(test_invalid_code_and_scale_bytes),
        cmocka_unit_test(test_unknown_format_version),
        cmocka_unit_test(test_inspect),
        cmocka_unit_test(test_inspect_exclude_and_damaged_report),
    };
    return cmocka_run_group_tests_name("cli_verify", tests, NULL, NULL);
}
