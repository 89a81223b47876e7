/* mxq against a careless or hostile user: outputs that would destroy an
 * input, a device or someone else's files; inputs that would block forever
 * or blow up memory; non-finite values; outputs that can only be found
 * unwritable after the work; and the messages all of these give. Every
 * case runs the mxq binary (MXQ_BIN), so the same cases can be pointed at
 * an older build. Each refusal must come within 30 s, with a non-zero exit
 * and exactly one error line naming the file, tensor or key, and must leave
 * the inputs and every unrelated file as they were. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cmocka.h>

#include "testutil.h"

/* ---- running mxq ------------------------------------------------------------- */

/* timeout 30 [mpirun -n ranks] mxq <args...>; ranks 0 = no mpirun. */
static tu_run_result run_mxq(int ranks, const char *first, ...)
{
    const char *bin = getenv("MXQ_BIN");
    assert_non_null(bin);
    char n[16];
    snprintf(n, sizeof(n), "%d", ranks);
    const char *mpi[] = {"timeout", "30", "mpirun", "-n", n, "--oversubscribe", bin, first};
    const char *plain[] = {"timeout", "30", bin, first};
    tu_run_result r;
    va_list ap;
    va_start(ap, first);
    if (ranks > 0)
        tu_run_prefixed(mpi, sizeof(mpi) / sizeof(mpi[0]), ap, &r);
    else
        tu_run_prefixed(plain, sizeof(plain) / sizeof(plain[0]), ap, &r);
    va_end(ap);
    return r;
}

static void run_with(const char *const *prefix, size_t n, tu_run_result *r, ...)
{
    va_list ap;
    va_start(ap, r);
    tu_run_prefixed(prefix, n, ap, r);
    va_end(ap);
}

static int count(const char *text, const char *what)
{
    int n = 0;
    for (const char *p = strstr(text, what); p; p = strstr(p + 1, what))
        n++;
    return n;
}

/* Refused: non-zero exit within the time limit, one error line holding
 * every fragment (NULL = none). */
static void expect_refused(const char *what, const tu_run_result *r, const char *frag1, const char *frag2)
{
    const char *line = strstr(r->err, "error:");
    print_message("# %s: exit %d: %.*s\n", what, r->exit_code, line ? (int)strcspn(line, "\n") : 0, line ? line : "");
    if (r->exit_code == 124)
        fail_msg("%s: no answer within 30 s", what);
    if (r->exit_code == 0)
        fail_msg("%s: accepted (exit 0); stdout: %.400s", what, r->out);
    if (count(r->err, "error:") != 1)
        fail_msg("%s: expected exactly one error line, got: %s", what, r->err);
    if (frag1 && !strstr(r->err, frag1))
        fail_msg("%s: the message lacks '%s': %s", what, frag1, r->err);
    if (frag2 && !strstr(r->err, frag2))
        fail_msg("%s: the message lacks '%s': %s", what, frag2, r->err);
}

/* ---- files --------------------------------------------------------------------- */


/* What a file is: type, device and content hash; "absent" if missing. */
static void fingerprint(const char *path, char *out, size_t size)
{
    struct stat st;
    if (lstat(path, &st) != 0) {
        snprintf(out, size, "absent");
        return;
    }
    uint64_t h = 1469598103934665603ull;
    if (S_ISREG(st.st_mode)) {
        size_t n;
        char *data = tu_read_file(path, &n);
        for (size_t i = 0; i < n; i++)
            h = (h ^ (unsigned char)data[i]) * 1099511628211ull;
        free(data);
    }
    snprintf(out, size, "mode %o rdev %lu size %lld hash %016llx", (unsigned)st.st_mode, (unsigned long)st.st_rdev,
             (long long)st.st_size, (unsigned long long)h);
}

typedef struct {
    const char *paths[16];
    char prints[16][128];
    int n;
} snapshot;

static void snap(snapshot *s, const char *const *paths)
{
    s->n = 0;
    for (; paths[s->n]; s->n++) {
        s->paths[s->n] = paths[s->n];
        fingerprint(paths[s->n], s->prints[s->n], sizeof(s->prints[0]));
    }
}

static void expect_untouched(const char *what, const snapshot *s)
{
    for (int i = 0; i < s->n; i++) {
        char now[128];
        fingerprint(s->paths[i], now, sizeof(now));
        if (strcmp(now, s->prints[i]) != 0)
            fail_msg("%s: '%s' was changed (%s -> %s)", what, s->paths[i], s->prints[i], now);
    }
}

static void copy_file(const char *from, const char *to)
{
    size_t n;
    char *data = tu_read_file(from, &n);
    tu_write_file(to, data, n);
    free(data);
}

/* A scratch copy of the bundled model; `config_edit` replaces the value of
 * one config.json key (NULL: unchanged). */
static const char *model_copy(const char *name, const char *key, json_t *value)
{
    const char *dir = tu_scratch_path("%s", name);
    char to[1024];
    mkdir(dir, 0755);
    snprintf(to, sizeof(to), "%s/model.safetensors", dir);
    copy_file(tu_data_path("stories260K/model.safetensors"), to);
    json_t *cfg = json_load_file(tu_data_path("stories260K/config.json"), 0, NULL);
    assert_non_null(cfg);
    if (key)
        json_object_set_new(cfg, key, value);
    snprintf(to, sizeof(to), "%s/config.json", dir);
    assert_int_equal(json_dump_file(cfg, to, JSON_INDENT(2)), 0);
    json_decref(cfg);
    return dir;
}

static void poke_weight(const char *dir, const char *tensor, size_t index, float value)
{
    tu_poke_tensor(dir, "model.safetensors", tensor, index * sizeof(float), &value, sizeof(value));
}

static const char *recipe(const char *name)
{
    char rel[256];
    snprintf(rel, sizeof(rel), "../configs/recipes/block32/%s.yaml", name);
    return tu_data_path(rel);
}

static const char *h5_matrix(const char *name, const char *dataset, hid_t type, size_t rows, size_t cols,
                             const void *data)
{
    const char *path = tu_scratch_path("%s", name);
    hid_t f = access(path, F_OK) == 0 ? H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT)
                                      : H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[2] = {rows, cols};
    tu_h5_write(f, dataset, type, type, 2, dims, data);
    H5Fclose(f);
    return path;
}

/* A 2-D float32 /input for cast, and a /W + /X for quantize-linear. */
static const char *cast_input(const char *name)
{
    unlink(tu_scratch_path("%s", name));
    float x[8 * 64];
    tu_rng rng = {5};
    for (size_t i = 0; i < 8 * 64; i++)
        x[i] = (float)tu_rng_normal(&rng);
    return h5_matrix(name, "/input", H5T_NATIVE_FLOAT, 8, 64, x);
}

enum { LINEAR_GOOD, LINEAR_NAN_IN_H, LINEAR_ASYMMETRIC_H };

static const char *linear_input(const char *name, int defect)
{
    unlink(tu_scratch_path("%s", name));
    float w[16 * 64];
    double h[64 * 64];
    tu_rng rng = {9};
    for (size_t i = 0; i < 16 * 64; i++)
        w[i] = (float)(0.05 * tu_rng_normal(&rng));
    for (size_t i = 0; i < 64; i++)
        for (size_t j = 0; j < 64; j++)
            h[i * 64 + j] = i == j ? 2.0 : 0.1;
    if (defect == LINEAR_NAN_IN_H)
        h[5 * 64 + 7] = NAN;
    if (defect == LINEAR_ASYMMETRIC_H)
        h[9 * 64 + 3] = 0.2;
    h5_matrix(name, "/W", H5T_NATIVE_FLOAT, 16, 64, w);
    return h5_matrix(name, "/H", H5T_NATIVE_DOUBLE, 64, 64, h);
}

/* ---- data loss -------------------------------------------------------------------- */

static void test_cast_onto_its_input(void **state)
{
    (void)state;
    const char *in = cast_input("self.h5");
    const char *keep[] = {in, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(0, "cast", "--format", "mxint4", "--block", "32", in, in, NULL);
    expect_refused("cast X.h5 X.h5", &r, "self.h5", "input");
    expect_untouched("cast X.h5 X.h5", &s);
}

static void test_quantize_linear_onto_its_input(void **state)
{
    (void)state;
    const char *in = linear_input("lin-self.h5", LINEAR_GOOD);
    const char *keep[] = {in, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(0, "quantize-linear", "--recipe", recipe("w4a8-mxint-gptq"), in, in, NULL);
    expect_refused("quantize-linear X.h5 X.h5", &r, "lin-self.h5", "input");
    expect_untouched("quantize-linear X.h5 X.h5", &s);
}

static void test_eval_json_onto_the_token_file(void **state)
{
    (void)state;
    const char *tokens = tu_scratch_path("tokens-copy.h5");
    copy_file(tu_data_path("stories260K/eval.h5"), tokens);
    const char *keep[] = {tokens, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens", tokens, "--limit", "2",
                              "--json", tokens, NULL);
    expect_refused("eval --json <token file>", &r, "tokens-copy.h5", "token file");
    expect_untouched("eval --json <token file>", &s);
}

static void test_eval_json_onto_the_model_config(void **state)
{
    (void)state;
    const char *model = model_copy("json-model", NULL, NULL);
    char cfg[1024];
    snprintf(cfg, sizeof(cfg), "%s/config.json", model);
    const char *keep[] = {cfg, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(2, "eval", "--model", model, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit",
                              "2", "--json", cfg, NULL);
    expect_refused("eval --json <config.json>", &r, "config.json", "input model");
    expect_untouched("eval --json <config.json>", &s);
}

/* A user's file at an output path is never replaced, whatever its kind;
 * what mxq wrote there itself is (it carries mxq_version). */
static void test_outputs_onto_a_users_file(void **state)
{
    (void)state;
    const char *in = cast_input("users-in.h5");
    const char *h5 = tu_scratch_path("users.h5"), *json = tu_scratch_path("users.json");
    copy_file(tu_data_path("stories260K/eval.h5"), h5); /* an HDF5 file mxq did not write */
    tu_write_file(json, "{\"ppl\": 1}", 10);
    const char *keep[] = {h5, json, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(0, "cast", "--format", "mxint4", "--block", "32", in, h5, NULL);
    expect_refused("cast onto a user's HDF5 file", &r, "users.h5", "mxq did not write it");
    r = run_mxq(0, "quantize-linear", "--recipe", recipe("w4a8-mxint-gptq"), linear_input("users-lin.h5", LINEAR_GOOD),
                h5, NULL);
    expect_refused("quantize-linear onto a user's HDF5 file", &r, "users.h5", "mxq did not write it");
    r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens", tu_data_path("stories260K/eval.h5"),
                "--limit", "2", "--json", json, NULL);
    expect_refused("eval --json onto a user's file", &r, "users.json", "mxq did not write it");
    r = run_mxq(0, "export", "--to", "gguf", tu_data_path("stories260K"), json, NULL);
    expect_refused("export onto a user's file", &r, "users.json", "mxq did not write it");
    r = run_mxq(0, "quantize", "--model", tu_data_path("stories260K"), "--calib", tu_data_path("stories260K/calib.h5"),
                "--recipe", recipe("w4a8-mxint-rtn"), "--out", tu_scratch_path("users-plan-out"), "--dry-run", "--json",
                json, NULL);
    expect_refused("quantize --dry-run --json onto a user's file", &r, "users.json", "mxq did not write it");
    expect_untouched("outputs onto a user's file", &s);
    /* mxq's own files are replaced: twice to each path */
    const char *own_h5 = tu_scratch_path("own.h5"), *own_json = tu_scratch_path("own.json");
    unlink(own_h5), unlink(own_json);
    for (int i = 0; i < 2; i++) {
        r = run_mxq(0, "cast", "--format", "mxint4", "--block", "32", in, own_h5, NULL);
        if (r.exit_code != 0)
            fail_msg("cast onto its own output (run %d): %s", i + 1, r.err);
        r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens",
                    tu_data_path("stories260K/eval.h5"), "--limit", "2", "--json", own_json, NULL);
        if (r.exit_code != 0)
            fail_msg("eval --json onto its own output (run %d): %s", i + 1, r.err);
    }
}

/* Devices are never replaced (as root, rename(2) would happily do it). As
 * root the test uses its own node of the same device, so that a build with
 * this bug cannot take the machine's /dev/null with it. */
static void cast_onto_device(const char *system_device, unsigned minor)
{
    const char *device = system_device;
    const char *own = tu_scratch_path("dev-%u", minor);
    unlink(own);
    if (geteuid() == 0 && mknod(own, S_IFCHR | 0666, makedev(1, minor)) == 0)
        device = own;
    const char *in = cast_input("dev-in.h5");
    const char *keep[] = {device, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(0, "cast", "--format", "mxint4", "--block", "32", in, device, NULL);
    expect_refused(system_device, &r, device, "character device");
    expect_untouched(device, &s);
}

static void test_cast_onto_dev_null(void **state)
{
    (void)state;
    cast_onto_device("/dev/null", 3);
}

static void test_cast_onto_dev_full(void **state)
{
    (void)state;
    cast_onto_device("/dev/full", 7);
}

/* The output names the input through a hard link, a symbolic link, "..". */
static void cast_onto_alias(int kind)
{
    const char *in = cast_input("alias-in.h5");
    const char *out = tu_scratch_path("alias-%d.h5", kind), *sub = tu_scratch_path("alias-sub");
    char dotdot[1024];
    unlink(out);
    mkdir(sub, 0755);
    if (kind == 0)
        assert_int_equal(link(in, out), 0);
    if (kind == 1)
        assert_int_equal(symlink(in, out), 0);
    snprintf(dotdot, sizeof(dotdot), "%s/../alias-in.h5", sub);
    if (kind == 2)
        out = dotdot;
    const char *keep[] = {in, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(0, "cast", "--format", "mxint4", "--block", "32", in, out, NULL);
    expect_refused(out, &r, out, kind == 1 ? "symbolic link" : "input");
    expect_untouched(out, &s);
}

static void test_cast_onto_a_hard_link_of_the_input(void **state)
{
    (void)state;
    cast_onto_alias(0);
}

static void test_cast_onto_a_symlink_to_the_input(void **state)
{
    (void)state;
    cast_onto_alias(1);
}

static void test_cast_onto_the_input_through_dotdot(void **state)
{
    (void)state;
    cast_onto_alias(2);
}

/* A second run into a directory a run is writing into is refused, and its
 * temporaries are not taken for a killed run's. */
static void test_second_run_into_a_busy_directory(void **state)
{
    (void)state;
    const char *dir = tu_scratch_path("busy-out");
    char temp[1024];
    mkdir(dir, 0755);
    snprintf(temp, sizeof(temp), "%s/.model-00001-of-00002.safetensors.tmp-4242-0", dir);
    tu_write_file(temp, "x", 1);
    const char *keep[] = {temp, NULL};
    snapshot s;
    snap(&s, keep);
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    assert_true(fd >= 0);
    assert_int_equal(flock(fd, LOCK_EX), 0); /* as the running job holds it */
    tu_run_result r = run_mxq(2, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                              tu_data_path("stories260K/calib.h5"), "--recipe", recipe("w4a8-mxint-rtn"), "--out", dir,
                              "--force", "-q", NULL);
    close(fd);
    expect_refused("quantize --force into a directory another run is writing", &r, "busy-out", "another mxq run");
    expect_untouched("the running job's temporary", &s);
}

static void test_force_keeps_another_model(void **state)
{
    (void)state;
    const char *other = model_copy("another-model", NULL, NULL);
    char cfg[1024], weights[1024];
    snprintf(cfg, sizeof(cfg), "%s/config.json", other);
    snprintf(weights, sizeof(weights), "%s/model.safetensors", other);
    const char *keep[] = {cfg, weights, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(2, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                              tu_data_path("stories260K/calib.h5"), "--recipe", recipe("w4a8-mxint-rtn"), "--out", other,
                              "--force", "-q", NULL);
    expect_refused("quantize --force into another model's directory", &r, "config.json", "not written by mxq");
    expect_untouched("quantize --force into another model's directory", &s);
}

/* A killed run's hidden temporary shard goes with --force; a user's file stays. */
static void test_force_removes_a_killed_runs_temporaries(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("force-out");
    const char *args_model = tu_data_path("stories260K"), *calib = tu_data_path("stories260K/calib.h5");
    tu_run_result r = run_mxq(2, "quantize", "--model", args_model, "--calib", calib, "--recipe",
                              recipe("w4a8-mxint-rtn"), "--out", out, "-q", NULL);
    assert_int_equal(r.exit_code, 0);
    char stale[1024], notes[1024];
    snprintf(stale, sizeof(stale), "%s/.model-00001-of-00002.safetensors.tmp-4242", out);
    snprintf(notes, sizeof(notes), "%s/notes.txt", out);
    tu_write_file(stale, "half a shard", 12);
    tu_write_file(notes, "mine\n", 5);
    const char *keep[] = {notes, NULL};
    snapshot s;
    snap(&s, keep);
    r = run_mxq(2, "quantize", "--model", args_model, "--calib", calib, "--recipe", recipe("w4a8-mxint-rtn"), "--out",
                out, "--force", "-q", NULL);
    if (r.exit_code != 0)
        fail_msg("quantize --force failed: %s", r.err);
    if (access(stale, F_OK) == 0)
        fail_msg("the killed run's temporary %s survived --force", stale);
    expect_untouched("quantize --force", &s);
    print_message("# --force removed the stale temporary shard and kept notes.txt\n");
}

/* --force replaces an earlier checkpoint only once the new one is complete:
 * a run that fails (here on a NaN weight, found while loading) leaves the
 * earlier checkpoint whole. */
static void test_failed_force_keeps_the_earlier_checkpoint(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("force-keeps");
    const char *model = model_copy("force-keeps-nan", NULL, NULL);
    poke_weight(model, "model.layers.3.mlp.down_proj.weight", 100, NAN);
    tu_run_result r = run_mxq(2, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                              tu_data_path("stories260K/calib.h5"), "--recipe", recipe("w4a8-mxint-rtn"), "--out", out,
                              "-q", NULL);
    assert_int_equal(r.exit_code, 0);
    const char *names[] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json",
                           "model.safetensors.index.json", "mxq_report.json", ".mxq-output.json"};
    const char *keep[7];
    for (int i = 0; i < 6; i++) {
        char *p = malloc(1024);
        snprintf(p, 1024, "%s/%s", out, names[i]);
        keep[i] = p;
    }
    keep[6] = NULL;
    snapshot s;
    snap(&s, keep);
    r = run_mxq(2, "quantize", "--model", model, "--calib", tu_data_path("stories260K/calib.h5"), "--recipe",
                recipe("w4a8-mxint-rtn"), "--out", out, "--force", "-q", NULL);
    expect_refused("quantize --force from a model with a NaN weight", &r, "model.layers.3.mlp.down_proj.weight",
                   "non-finite");
    expect_untouched("quantize --force from a model with a NaN weight", &s);
}

/* A refused run touches nothing: not the record and temporaries of another
 * (perhaps running) job in that directory. */
static void test_refused_run_leaves_foreign_files(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("foreign-out");
    char record[1024], temp[1024];
    mkdir(out, 0755);
    snprintf(record, sizeof(record), "%s/.mxq-output.json", out);
    snprintf(temp, sizeof(temp), "%s/.model-00001-of-00002.safetensors.tmp-99999", out);
    tu_write_file(record, "{\"files\": [\"model-00001-of-00002.safetensors\"]}", 47);
    tu_write_file(temp, "in progress", 11);
    const char *keep[] = {record, temp, NULL};
    snapshot s;
    snap(&s, keep);
    tu_run_result r = run_mxq(2, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                              tu_data_path("stories260K/calib.h5"), "--recipe", recipe("w4a8-mxint-rtn"), "--out", out,
                              NULL);
    expect_refused("quantize into a directory another run is using", &r, "foreign-out", "not empty");
    expect_untouched("quantize into a directory another run is using", &s);
}

/* ---- hangs ------------------------------------------------------------------------ */

static const char *fifo(const char *path)
{
    unlink(path);
    assert_int_equal(mkfifo(path, 0644), 0);
    return path;
}

/* A model directory with one real file and a FIFO in place of the other. */
static void fifo_in_model_dir(const char *dir_name, const char *real_file, const char *fifo_file)
{
    const char *dir = tu_scratch_path("%s", dir_name);
    char path[1024], source[1024];
    mkdir(dir, 0755);
    snprintf(path, sizeof(path), "%s/%s", dir, real_file);
    snprintf(source, sizeof(source), "stories260K/%s", real_file);
    copy_file(tu_data_path(source), path);
    snprintf(path, sizeof(path), "%s/%s", dir, fifo_file);
    fifo(path);
    tu_run_result r = run_mxq(2, "eval", "--model", dir, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit",
                              "2", NULL);
    char what[256];
    snprintf(what, sizeof(what), "FIFO as %s", fifo_file);
    expect_refused(what, &r, fifo_file, "FIFO");
}

static void test_fifo_as_model_weights(void **state)
{
    (void)state;
    fifo_in_model_dir("fifo-weights", "config.json", "model.safetensors");
}

static void test_fifo_as_config(void **state)
{
    (void)state;
    fifo_in_model_dir("fifo-config", "model.safetensors", "config.json");
}

static void test_fifo_as_token_file(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens",
                              fifo(tu_scratch_path("fifo-tokens.h5")), "--limit", "2", NULL);
    expect_refused("FIFO as the token file", &r, "fifo-tokens.h5", "FIFO");
}

static void test_fifo_as_recipe(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(2, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                              tu_data_path("stories260K/calib.h5"), "--recipe", fifo(tu_scratch_path("fifo-recipe.yaml")),
                              "--out", tu_scratch_path("fifo-out"), NULL);
    expect_refused("FIFO as the recipe", &r, "fifo-recipe.yaml", "FIFO");
}

/* A token file whose /tokens lives elsewhere: its data in a FIFO (external
 * storage), or the dataset behind an external link to one. */
static const char *tokens_pointing_at_fifo(const char *name, int as_link)
{
    const char *path = tu_scratch_path("%s", name), *pipe = fifo(tu_scratch_path("%s.fifo", name));
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(f >= 0);
    if (as_link) {
        assert_true(H5Lcreate_external(pipe, "/tokens", f, "/tokens", H5P_DEFAULT, H5P_DEFAULT) >= 0);
    } else {
        hsize_t dims[2] = {4, 16};
        hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE), space = H5Screate_simple(2, dims, NULL);
        assert_true(H5Pset_external(dcpl, pipe, 0, 4 * 16 * 4) >= 0);
        hid_t d = H5Dcreate2(f, "/tokens", H5T_STD_I32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        assert_true(d >= 0);
        H5Dclose(d);
        H5Sclose(space);
        H5Pclose(dcpl);
    }
    H5Fclose(f);
    return path;
}

static void test_token_data_stored_in_a_fifo(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens",
                              tokens_pointing_at_fifo("ext-tokens.h5", 0), "--limit", "2", NULL);
    expect_refused("/tokens stored externally in a FIFO", &r, "ext-tokens.h5", "outside the file");
}

static void test_token_external_link_to_a_fifo(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens",
                              tokens_pointing_at_fifo("elink-tokens.h5", 1), "--limit", "2", NULL);
    expect_refused("/tokens an external link to a FIFO", &r, "elink-tokens.h5", "external link");
}

/* A file whose 2-D `dataset` declares [rows, cols] but holds no data
 * (chunks never written): small on disk, huge if believed. */
static const char *declared_only(const char *name, const char *dataset, hid_t type, hsize_t rows, hsize_t cols)
{
    const char *path = tu_scratch_path("%s", name);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(f >= 0);
    hsize_t dims[2] = {rows, cols}, chunk[2] = {1, cols};
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE), space = H5Screate_simple(2, dims, NULL);
    assert_true(H5Pset_chunk(dcpl, 2, chunk) >= 0);
    hid_t d = H5Dcreate2(f, dataset, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    assert_true(d >= 0);
    H5Dclose(d);
    H5Sclose(space);
    H5Pclose(dcpl);
    H5Fclose(f);
    return path;
}

/* A token file that declares 2^19 sequences longer than the model's context
 * (chunks never written, so the file is small): refused from its shape,
 * before 8 GB per rank are allocated and filled. */
static void test_token_sequences_longer_than_the_context(void **state)
{
    (void)state;
    const char *path = declared_only("long-tokens.h5", "/tokens", H5T_STD_I32LE, 1u << 19, 4096);
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens", path, NULL);
    expect_refused("2^19 sequences of 4096 tokens", &r, "long-tokens.h5", "max_position_embeddings");
}

/* A token file that declares 2^22 sequences within the context (4 GiB of
 * ids) but holds none of them (found by tests/fuzz/fuzz_tokens): refused
 * from its stored size, before the 4 GiB are allocated and filled. */
static void test_token_file_declaring_unwritten_sequences(void **state)
{
    (void)state;
    const char *path = declared_only("unwritten-tokens.h5", "/tokens", H5T_STD_I32LE, 1u << 22, 256);
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens", path, NULL);
    expect_refused("2^22 unwritten sequences", &r, "unwritten-tokens.h5", "only 0 of the 4194304 chunks");
}

/* A gzip-compressed token file of 64 sequences of which only the first 8
 * (one chunk) were written: refused, not scored with token 0 for the rest. */
static void test_token_file_partly_written(void **state)
{
    (void)state;
    const char *path = tu_scratch_path("partial-tokens.h5");
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t dims[2] = {64, 256}, chunk[2] = {8, 256}, start[2] = {0, 0};
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE), space = H5Screate_simple(2, dims, NULL);
    assert_true(H5Pset_chunk(dcpl, 2, chunk) >= 0 && H5Pset_deflate(dcpl, 6) >= 0);
    hid_t d = H5Dcreate2(f, "/tokens", H5T_STD_I32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    int32_t ids[8 * 256];
    for (int i = 0; i < 8 * 256; i++)
        ids[i] = 1 + i % 500;
    hid_t mem = H5Screate_simple(2, chunk, NULL);
    assert_true(H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, chunk, NULL) >= 0);
    assert_true(H5Dwrite(d, H5T_NATIVE_INT32, mem, space, H5P_DEFAULT, ids) >= 0);
    H5Sclose(mem);
    H5Dclose(d);
    H5Sclose(space);
    H5Pclose(dcpl);
    H5Fclose(f);
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens", path, NULL);
    expect_refused("8 of 64 sequences written", &r, "partial-tokens.h5", "only 1 of the 8 chunks");
}

/* cast of a dataset that declares 2^40 rows (never written): refused from
 * its shape, before 512 TiB are asked for. */
static void test_cast_input_declaring_huge_rows(void **state)
{
    (void)state;
    const char *path = declared_only("huge-rows.h5", "/input", H5T_IEEE_F32LE, (hsize_t)1 << 40, 128);
    tu_run_result r = run_mxq(0, "cast", "--format", "mxint4", "--block", "32", path, tu_scratch_path("huge-rows-out.h5"),
                              NULL);
    expect_refused("cast of a dataset declaring 2^40 rows", &r, "huge-rows.h5", "at most");
}

static void test_huge_layer_count(void **state)
{
    (void)state;
    const char *model = model_copy("huge-layers", "num_hidden_layers", json_integer(1073741824));
    tu_run_result r = run_mxq(2, "eval", "--model", model, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit",
                              "2", NULL);
    expect_refused("num_hidden_layers 1073741824", &r, "config.json", "num_hidden_layers");
}

/* ---- non-finite values ----------------------------------------------------------- */

static void expect_quantize_refused(const char *what, const char *model, const char *recipe_name, const char *frag1,
                                    const char *frag2)
{
    const char *out = tu_scratch_path("nonfinite-%s", recipe_name);
    tu_run_result r = run_mxq(2, "quantize", "--model", model, "--calib", tu_data_path("stories260K/calib.h5"),
                              "--recipe", recipe(recipe_name), "--out", out, "-q", NULL);
    expect_refused(what, &r, frag1, frag2);
    char index[1024];
    snprintf(index, sizeof(index), "%s/model.safetensors.index.json", out);
    if (access(index, F_OK) == 0)
        fail_msg("%s: a checkpoint was written", what);
}

static const char *nan_model(void)
{
    const char *model = model_copy("nan-weight", NULL, NULL);
    poke_weight(model, "model.layers.2.mlp.up_proj.weight", 100, NAN);
    return model;
}

static const char *inf_model(void)
{
    const char *model = model_copy("inf-weight", NULL, NULL);
    poke_weight(model, "model.layers.1.self_attn.q_proj.weight", 7, INFINITY);
    return model;
}

static void test_nan_weight_rtn(void **state)
{
    (void)state;
    expect_quantize_refused("NaN weight, RTN", nan_model(), "w4a8-mxint-rtn", "model.layers.2.mlp.up_proj.weight",
                            "[1, 36]");
}

static void test_inf_weight_smoothquant(void **state)
{
    (void)state;
    expect_quantize_refused("Inf weight, SmoothQuant", inf_model(), "w4a8-mxint-sq",
                            "model.layers.1.self_attn.q_proj.weight", "inf");
}

static void test_nan_weight_awq_names_the_tensor(void **state)
{
    (void)state;
    expect_quantize_refused("NaN weight, AWQ+GPTQ", nan_model(), "w4a8-mxint-awq-gptq",
                            "model.layers.2.mlp.up_proj.weight", "non-finite");
}

static void test_inf_weight_gptq_names_the_tensor(void **state)
{
    (void)state;
    expect_quantize_refused("Inf weight, GPTQ", inf_model(), "w4a8-mxint-gptq", "model.layers.1.self_attn.q_proj.weight",
                            "non-finite");
}

/* Layers loaded lazily (a data-parallel group; eval of a checkpoint) are
 * scanned when the model loads: a NaN in layer 2 stops the job before
 * layer 0 is worked on. */
static void test_nan_weight_lazy_layers(void **state)
{
    (void)state;
    const char *model = nan_model();
    const char *out = tu_scratch_path("nonfinite-group");
    tu_run_result r = run_mxq(2, "quantize", "--model", model, "--calib", tu_data_path("stories260K/calib.h5"),
                              "--recipe", recipe("w4a8-mxint-awq-gptq"), "--out", out, "--group-size", "2", NULL);
    expect_refused("NaN weight, data-parallel group", &r, "model.layers.2.mlp.up_proj.weight", "[1, 36]");
    assert_null(strstr(r.err, "layer 0 (1/"));
    assert_false(access(out, F_OK) == 0);
    r = run_mxq(2, "eval", "--model", model, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit", "2", NULL);
    expect_refused("NaN weight, eval", &r, "model.layers.2.mlp.up_proj.weight", "[1, 36]");
    /* the final norm is only copied into the checkpoint: refused all the same */
    const char *norm = model_copy("nan-final-norm", NULL, NULL);
    poke_weight(norm, "model.norm.weight", 3, -INFINITY);
    for (int group = 1; group <= 2; group++) {
        r = run_mxq(2, "quantize", "--model", norm, "--calib", tu_data_path("stories260K/calib.h5"), "--recipe",
                    recipe("w4a8-mxint-awq-gptq"), "--out", out, "--group-size", group == 1 ? "1" : "2", NULL);
        expect_refused("-Inf final norm", &r, "model.norm.weight", "[3]");
        assert_null(strstr(r.err, "layer 0 (1/"));
    }
}

static const char *nan_embedding_model(void)
{
    const char *model = model_copy("nan-embedding", NULL, NULL);
    poke_weight(model, "model.embed_tokens.weight", 5, NAN);
    return model;
}

static void test_nan_embedding_quantize(void **state)
{
    (void)state;
    expect_quantize_refused("NaN embedding, AWQ+GPTQ", nan_embedding_model(), "w4a8-mxint-awq-gptq",
                            "model.embed_tokens.weight", "non-finite");
}

static void test_nan_embedding_eval(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(2, "eval", "--model", nan_embedding_model(), "--tokens",
                              tu_data_path("stories260K/eval.h5"), "--limit", "2", NULL);
    expect_refused("NaN embedding, eval", &r, "model.embed_tokens.weight", "non-finite");
}

/* Finite weights whose activations overflow: the NLL is not a number. */
/* A checkpoint whose E8M0 scale byte is 0xFF (NaN): refused at load,
 * naming the tensor, instead of a NaN perplexity. */
static void test_nan_scale_in_a_checkpoint(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("nan-scale");
    tu_run_result r = run_mxq(1, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                              tu_data_path("stories260K/calib.h5"), "--recipe", recipe("w4a8-mxint-rtn"), "--out", out,
                              "-q", NULL);
    assert_int_equal(r.exit_code, 0);
    const unsigned char nan_scale = 0xFF;
    tu_poke_tensor(out, "model-00001-of-00001.safetensors", "model.layers.2.mlp.up_proj.weight_scale", 5, &nan_scale, 1);
    r = run_mxq(2, "eval", "--model", out, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit", "2", NULL);
    expect_refused("a NaN scale byte in a checkpoint", &r, "model.layers.2.mlp.up_proj.weight", "scale byte 255");
}

/* Corruptions that decode to finite values: an invalid element code and a
 * scale byte mxq never writes; eval names them instead of a perplexity. */
static void test_invalid_codes_in_a_checkpoint(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("bad-codes");
    tu_run_result r = run_mxq(1, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                              tu_data_path("stories260K/calib.h5"), "--recipe", recipe("w4a8-mxint-rtn"), "--out", out,
                              "-q", NULL);
    assert_int_equal(r.exit_code, 0);
    const char *shard = "model-00001-of-00001.safetensors", *packed = "model.layers.1.self_attn.k_proj.weight_packed";
    const unsigned char minus8 = 0x88, zero_scale = 0;
    char backup[1024];
    snprintf(backup, sizeof(backup), "cp '%s/%s' '%s/%s.orig'", out, shard, out, shard);
    assert_int_equal(system(backup), 0);
    tu_poke_tensor(out, shard, packed, 3, &minus8, 1);
    r = run_mxq(2, "eval", "--model", out, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit", "2", NULL);
    expect_refused("an MXINT4 code -8 in a checkpoint", &r, packed, "code 0x8, which is no mxint4 element");
    snprintf(backup, sizeof(backup), "cp '%s/%s.orig' '%s/%s'", out, shard, out, shard);
    assert_int_equal(system(backup), 0);
    tu_poke_tensor(out, shard, "model.layers.1.self_attn.k_proj.weight_scale", 0, &zero_scale, 1);
    r = run_mxq(2, "eval", "--model", out, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit", "2", NULL);
    expect_refused("a scale byte 0 in a checkpoint", &r, "k_proj.weight_scale", "scale byte 0");
}

static void test_eval_nonfinite_result(void **state)
{
    (void)state;
    const char *model = model_copy("overflow", NULL, NULL);
    for (size_t i = 0; i < 64; i++)
        poke_weight(model, "model.embed_tokens.weight", 64 + i, 3e38f); /* token 1 (BOS) */
    tu_run_result r = run_mxq(2, "eval", "--model", model, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit",
                              "4", NULL);
    expect_refused("eval with overflowing activations", &r, "sequence 0", "non-finite");
    if (strstr(r.out, "perplexity"))
        fail_msg("a perplexity was printed: %s", r.out);
}

static void test_quantize_linear_nan_hessian(void **state)
{
    (void)state;
    const char *in = linear_input("lin-nan-h.h5", LINEAR_NAN_IN_H);
    tu_run_result r = run_mxq(0, "quantize-linear", "--recipe", recipe("w4a8-mxint-gptq"), in, tu_scratch_path("lin-nan-out.h5"),
                              NULL);
    expect_refused("quantize-linear with a NaN in /H", &r, "/H", "[5, 7]");
    assert_false(access(tu_scratch_path("lin-nan-out.h5"), F_OK) == 0);
}

static void test_quantize_linear_asymmetric_hessian(void **state)
{
    (void)state;
    const char *in = linear_input("lin-asym-h.h5", LINEAR_ASYMMETRIC_H);
    tu_run_result r = run_mxq(0, "quantize-linear", "--recipe", recipe("w4a8-mxint-gptq"), in,
                              tu_scratch_path("lin-asym-out.h5"), NULL);
    expect_refused("quantize-linear with an asymmetric /H", &r, "not symmetric", "[9, 3]");
}

static void test_quantize_linear_both_x_and_h(void **state)
{
    (void)state;
    const char *in = linear_input("lin-x-and-h.h5", LINEAR_GOOD);
    float x[4 * 64] = {0};
    h5_matrix("lin-x-and-h.h5", "/X", H5T_NATIVE_FLOAT, 4, 64, x);
    tu_run_result r = run_mxq(0, "quantize-linear", "--recipe", recipe("w4a8-mxint-gptq"), in,
                              tu_scratch_path("lin-x-and-h-out.h5"), NULL);
    expect_refused("quantize-linear with both /X and /H", &r, "lin-x-and-h.h5", "both /X and /H");
}

/* ---- failures found only after the work --------------------------------------------- */

/* A directory this process cannot write into: read-only for a user; for
 * root, immutable (chattr +i) or a read-only tmpfs. Returns how. */
static const char *unwritable_dir(const char *dir, char *undo, size_t size)
{
    mkdir(dir, 0755);
    char cmd[1200];
    if (geteuid() != 0) {
        chmod(dir, 0555);
        snprintf(undo, size, "chmod 755 '%s'", dir);
        return "read-only";
    }
    snprintf(cmd, sizeof(cmd), "chattr +i '%s' 2>/dev/null", dir);
    if (system(cmd) == 0) {
        snprintf(undo, size, "chattr -i '%s'", dir);
        return "immutable";
    }
    snprintf(cmd, sizeof(cmd), "mount -t tmpfs -o ro,size=64k tmpfs '%s' 2>/dev/null", dir);
    if (system(cmd) == 0) {
        snprintf(undo, size, "umount '%s'", dir);
        return "read-only tmpfs";
    }
    fail_msg("cannot make an unwritable directory here (root, but neither chattr +i nor a tmpfs mount works)");
    return NULL;
}

/* Run `mxq <args>` (ranks 2) against an unwritable directory `dir`. */
static tu_run_result run_unwritable(const char *dir, int quantize, const char *json)
{
    char undo[1200];
    const char *how = unwritable_dir(dir, undo, sizeof(undo));
    tu_run_result r = quantize ? run_mxq(2, "quantize", "--model", tu_data_path("stories260K"), "--calib",
                                         tu_data_path("stories260K/calib.h5"), "--recipe",
                                         recipe("w4a8-mxint-awq-gptq"), "--out", dir, NULL)
                               : run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens",
                                         tu_data_path("stories260K/eval.h5"), "--json", json, NULL);
    assert_int_equal(system(undo), 0);
    print_message("# (the directory was made %s)\n", how);
    return r;
}

static void test_unwritable_out_dir_found_first(void **state)
{
    (void)state;
    const char *dir = tu_scratch_path("unwritable-out");
    tu_run_result r = run_unwritable(dir, 1, NULL);
    expect_refused("quantize --out <unwritable directory>", &r, "unwritable-out", NULL);
    if (strstr(r.err, "calibration:") || strstr(r.err, "layer 0"))
        fail_msg("the directory was found unwritable only after calibrating: %s", r.err);
}

static void test_unwritable_json_found_first(void **state)
{
    (void)state;
    const char *dir = tu_scratch_path("unwritable-json");
    char json[1200];
    snprintf(json, sizeof(json), "%s/eval.json", dir);
    tu_run_result r = run_unwritable(dir, 0, json);
    expect_refused("eval --json <file in an unwritable directory>", &r, "eval.json", NULL);
    if (strstr(r.err, "sequences through rank 0"))
        fail_msg("--json was found unwritable only after evaluating: %s", r.err);
}

/* ---- messages ----------------------------------------------------------------------- */

/* Runs `mxq <argv>` with its output on a full file system: a small tmpfs
 * when mounting works (root), else a file-size limit (EFBIG). */
static tu_run_result run_out_of_space(const char *dir, const char *mxq_args)
{
    char cmd[4096];
    mkdir(dir, 0755);
    snprintf(cmd, sizeof(cmd), "mount -t tmpfs -o size=64k tmpfs '%s' 2>/dev/null", dir);
    int mounted = geteuid() == 0 && system(cmd) == 0;
    snprintf(cmd, sizeof(cmd), "%s%s %s", mounted ? "" : "trap '' XFSZ; ulimit -f 64; ", getenv("MXQ_BIN"), mxq_args);
    const char *argv[] = {"timeout", "30", "sh", "-c", cmd, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (mounted) {
        snprintf(cmd, sizeof(cmd), "umount '%s'", dir);
        assert_int_equal(system(cmd), 0);
    }
    return r;
}

static void expect_disk_full(const char *what, const tu_run_result *r, const char *output)
{
    expect_refused(what, r, output, NULL);
    if (!strstr(r->err, "No space left on device") && !strstr(r->err, "File too large"))
        fail_msg("%s: the message lacks the system's reason: %s", what, r->err);
    if (strstr(r->err, ".tmp-") || strstr(r->err, "time =") || strstr(r->err, "errno ="))
        fail_msg("%s: the message names a temporary file or dumps HDF5's stack: %s", what, r->err);
}

static void test_disk_full_cast(void **state)
{
    (void)state;
    float *x = calloc(512 * 512, sizeof(float));
    for (size_t i = 0; i < 512 * 512; i++)
        x[i] = (float)(i % 97) - 48.0f;
    const char *in = h5_matrix("big-in.h5", "/input", H5T_NATIVE_FLOAT, 512, 512, x);
    free(x);
    const char *dir = tu_scratch_path("full-cast");
    char args[2048];
    snprintf(args, sizeof(args), "cast --format mxint4 --block 32 '%s' '%s/out.h5'", in, dir);
    tu_run_result r = run_out_of_space(dir, args);
    expect_disk_full("cast onto a full disk", &r, "out.h5");
}

static void test_disk_full_quantize(void **state)
{
    (void)state;
    const char *dir = tu_scratch_path("full-quantize");
    char args[2048];
    snprintf(args, sizeof(args), "quantize --model '%s' --calib '%s' --recipe '%s' --out '%s/q' -q",
             tu_data_path("stories260K"), tu_data_path("stories260K/calib.h5"), recipe("w8a8-mxint-rtn"), dir);
    tu_run_result r = run_out_of_space(dir, args);
    /* the first write to fail: a layer's record for --resume, or the shard */
    expect_disk_full("quantize onto a full disk", &r,
                     strstr(r.err, ".mxq-resume/layer-") ? ".safetensors" : "model-00001-of-00001.safetensors");
}

static tu_run_result linear_with_recipe_bytes(const char *name, const void *data, size_t size)
{
    const char *path = tu_scratch_path("%s", name);
    tu_write_file(path, data, size);
    return run_mxq(0, "quantize-linear", "--recipe", path, linear_input("lin-recipe.h5", LINEAR_GOOD),
                   tu_scratch_path("lin-recipe-out.h5"), NULL);
}

static tu_run_result linear_with_recipe(const char *name, const char *text)
{
    return linear_with_recipe_bytes(name, text, strlen(text));
}

static void test_empty_recipe(void **state)
{
    (void)state;
    tu_run_result r = linear_with_recipe("empty.yaml", "");
    expect_refused("an empty recipe", &r, "empty.yaml", "empty");
    if (strstr(r.err, "fy_"))
        fail_msg("libfyaml's internals in the message: %s", r.err);
}

/* A recipe saved as UTF-16 (as some editors do) is not read as empty. */
static void test_utf16_recipe(void **state)
{
    (void)state;
    const char *utf8 = "weights: {format: mxint4, block: 32}\n";
    unsigned char utf16[128] = {0xff, 0xfe};
    size_t n = 2;
    for (const char *c = utf8; *c; c++, n += 2)
        utf16[n] = (unsigned char)*c, utf16[n + 1] = 0;
    tu_run_result r = linear_with_recipe_bytes("utf16.yaml", utf16, n);
    expect_refused("a UTF-16 recipe", &r, "utf16.yaml", "not a text file");
}

static void test_yaml_error_location(void **state)
{
    (void)state;
    tu_run_result r = linear_with_recipe("broken.yaml", "weights: {format: mxint4\n");
    expect_refused("a YAML syntax error", &r, "broken.yaml:2:", "not valid YAML");
    if (strstr(r.err, "<memory"))
        fail_msg("the location is not the file: %s", r.err);
}

static void test_second_yaml_document(void **state)
{
    (void)state;
    tu_run_result r = linear_with_recipe("two-docs.yaml", "weights: {format: mxint4}\n---\nweights: {format: mxint8}\n");
    expect_refused("a second YAML document", &r, "two-docs.yaml", "more than one YAML document");
}

static tu_run_result eval_with_config(const char *name, const char *key, long long value)
{
    return run_mxq(2, "eval", "--model", model_copy(name, key, json_integer(value)), "--tokens",
                   tu_data_path("stories260K/eval.h5"), "--limit", "2", NULL);
}

static void test_too_large_value_gives_the_range(void **state)
{
    (void)state;
    tu_run_result r = eval_with_config("big-value", "num_attention_heads", 99999);
    expect_refused("a value that is too large", &r, "num_attention_heads", "..");
    if (strstr(r.err, "expected >="))
        fail_msg("the message gives only a lower bound: %s", r.err);
}

static void test_huge_intermediate_size(void **state)
{
    (void)state;
    tu_run_result r = eval_with_config("huge-ffn", "intermediate_size", 1073741824);
    expect_refused("intermediate_size 1073741824", &r, "intermediate_size", NULL);
    if (strstr(r.err, "out of memory"))
        fail_msg("an allocation was tried: %s", r.err);
}

static void test_intermediate_size_mismatch(void **state)
{
    (void)state;
    tu_run_result r = eval_with_config("ffn-mismatch", "intermediate_size", 1000);
    expect_refused("intermediate_size 1000 against a 172-wide checkpoint", &r, "mlp.gate_proj.weight", "[1000, 64]");
}

static void test_config_with_fewer_layers(void **state)
{
    (void)state;
    tu_run_result r = eval_with_config("fewer-layers", "num_hidden_layers", 3);
    expect_refused("a config with fewer layers than the checkpoint", &r, "model.layers.3", "num_hidden_layers = 3");
}

/* Sizes at the edge of what a config may say: every total is a positive
 * number; beyond it the config is refused, naming the key. */
static void test_dry_run_totals(void **state)
{
    (void)state;
    const char *dir = tu_scratch_path("plan-only");
    char path[1024];
    mkdir(dir, 0755);
    json_t *cfg = json_load_file(tu_data_path("stories260K/config.json"), 0, NULL);
    json_object_set_new(cfg, "hidden_size", json_integer(1 << 20));
    json_object_set_new(cfg, "intermediate_size", json_integer(1 << 20));
    json_object_set_new(cfg, "num_attention_heads", json_integer(4096));
    json_object_set_new(cfg, "num_key_value_heads", json_integer(4096));
    json_object_set_new(cfg, "vocab_size", json_integer(1 << 24));
    snprintf(path, sizeof(path), "%s/config.json", dir);
    json_dump_file(cfg, path, 0);
    /* the data-parallel group's plan (what such a model gets) prints finite totals too */
    tu_run_result r = run_mxq(2, "quantize", "--model", dir, "--calib", tu_data_path("stories260K/calib.h5"),
                              "--recipe", recipe("w4a8-mxint-gptq"), "--dry-run", NULL);
    if (r.exit_code != 0 || !strstr(r.out, "one data-parallel group") || strstr(r.out, "inf") || strstr(r.out, "nan"))
        fail_msg("dry run of a huge config: %s%s", r.out, r.err);
    r = run_mxq(2, "quantize", "--model", dir, "--calib", tu_data_path("stories260K/calib.h5"), "--recipe",
                recipe("w4a8-mxint-gptq"), "--dry-run", "--group-size", "1", NULL);
    if (r.exit_code != 0)
        fail_msg("dry run of a huge config failed: %s", r.err);
    const char *row = strstr(r.out, "\n0 ");
    assert_non_null(row);
    /* rank 0's row ends with weights, stats, work, quantize and peak RSS MB */
    char line[512];
    snprintf(line, sizeof(line), "%.*s", (int)strcspn(row + 1, "\n"), row + 1);
    double cols[5];
    char *end = line + strlen(line);
    for (int i = 4; i >= 0; i--) {
        while (end > line && end[-1] == ' ')
            end--;
        *end = '\0';
        char *start = strrchr(line, ' ');
        assert_non_null(start);
        cols[i] = strtod(start + 1, NULL);
        end = start;
    }
    /* weights of rank 0: its layers (7 linears of 2^40 weights) and the embedding, in MB */
    for (int i = 0; i < 5; i++)
        if (!(cols[i] > 0) || !isfinite(cols[i]))
            fail_msg("a total is not a positive number: %s", row);
    assert_true(cols[0] > 7.0 * 1099511627776.0 * 4 / 1048576.0);
    /* the peak: the sum and 32 MB of libraries, or while loading at most 1.5 x the weights */
    double sum = cols[0] + cols[1] + cols[2] + cols[3] + 32.0, loading = 1.5 * cols[0] + 32.0;
    assert_true(cols[4] >= sum - 1e-6 * cols[4] - 0.5 && cols[4] <= fmax(sum, loading) + 1e-6 * cols[4] + 0.5);
    json_object_set_new(cfg, "hidden_size", json_integer(1073741824));
    json_dump_file(cfg, path, 0);
    json_decref(cfg);
    r = run_mxq(2, "quantize", "--model", dir, "--calib", tu_data_path("stories260K/calib.h5"), "--recipe",
                recipe("w4a8-mxint-gptq"), "--dry-run", NULL);
    expect_refused("dry run with hidden_size 2^30", &r, "hidden_size", NULL);
}

static void test_command_line_error_printed_once(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(3, "eval", "--bogus", NULL);
    expect_refused("an unknown option under mpirun -n 3", &r, "--bogus", NULL);
}

static void test_eval_block_without_formats(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(2, "eval", "--model", tu_data_path("stories260K"), "--tokens",
                              tu_data_path("stories260K/eval.h5"), "--block", "64", NULL);
    expect_refused("eval --block without --weights", &r, "--block", "--weights");
}

/* A command that runs as one process refuses to run N times side by side on
 * the same output, once; help and version under a launcher print once. */
static void test_one_process_command_under_mpirun(void **state)
{
    (void)state;
    const char *out = tu_scratch_path("synth-under-mpirun");
    tu_run_result r = run_mxq(2, "synth", "--preset", "llama-2-7b", "--layers", "1", "--out", out, NULL);
    expect_refused("synth under mpirun -n 2", &r, "one process", NULL);
    struct stat st;
    if (lstat(out, &st) == 0)
        fail_msg("synth under mpirun -n 2 left %s behind", out);
}

static void test_help_and_version_printed_once(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(3, "--version", NULL);
    assert_int_equal(r.exit_code, 0);
    assert_int_equal(count(r.out, "mxq "), 1);
    r = run_mxq(2, "eval", "--help", NULL);
    assert_int_equal(r.exit_code, 0);
    assert_int_equal(count(r.out, "Usage:"), 1);
}

/* Results on stdout that cannot be written are an error, not a success. */
static void test_results_onto_a_full_stdout(void **state)
{
    (void)state;
    const char *prefix[] = {"timeout", "30", "sh", "-c", "exec \"$@\" > /dev/full", "sh", getenv("MXQ_BIN"), "eval"};
    tu_run_result r;
    run_with(prefix, sizeof(prefix) / sizeof(prefix[0]), &r, "--model", tu_data_path("stories260K"), "--tokens",
             tu_data_path("stories260K/eval.h5"), "--limit", "2", NULL);
    expect_refused("eval with stdout on /dev/full", &r, "standard output", "No space left");
}

/* The example in `mxq quantize --help` runs as printed. */
static void test_help_example_exists(void **state)
{
    (void)state;
    tu_run_result r = run_mxq(0, "quantize", "--help", NULL);
    assert_int_equal(r.exit_code, 0);
    const char *at = strstr(r.out, "--recipe configs/");
    assert_non_null(at);
    char rel[512];
    assert_int_equal(sscanf(at + strlen("--recipe "), "%511s", rel), 1);
    char path[1024];
    snprintf(path, sizeof(path), "%s/../%s", tu_data_dir(), rel);
    if (access(path, R_OK) != 0)
        fail_msg("the help's example recipe %s does not exist", rel);
}

/* A clone of the repository is self-contained: no file points outside it. */
static void test_repository_points_nowhere_outside(void **state)
{
    (void)state;
    char cmd[2048];
    snprintf(cmd, sizeof(cmd),
             "cd '%s/..' && grep -rIl --exclude-dir=build --exclude-dir=.git --exclude-dir=out -e '\\.\\./shared' "
             "-e 'shared/DESIGN' . | grep -v test_cli_hostile.c",
             tu_data_dir());
    const char *argv[] = {"sh", "-c", cmd, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (r.out[0])
        fail_msg("these files point outside the repository: %s", r.out);
    snprintf(cmd, sizeof(cmd), "%s/../docs/design.md", tu_data_dir());
    assert_true(access(cmd, R_OK) == 0);
}

int main(void)
{
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_process_command_under_mpirun),
        cmocka_unit_test(test_help_and_version_printed_once),
        cmocka_unit_test(test_results_onto_a_full_stdout),
        cmocka_unit_test(test_cast_onto_its_input),
        cmocka_unit_test(test_quantize_linear_onto_its_input),
        cmocka_unit_test(test_eval_json_onto_the_token_file),
        cmocka_unit_test(test_eval_json_onto_the_model_config),
        cmocka_unit_test(test_outputs_onto_a_users_file),
        cmocka_unit_test(test_cast_onto_dev_null),
        cmocka_unit_test(test_cast_onto_dev_full),
        cmocka_unit_test(test_cast_onto_a_hard_link_of_the_input),
        cmocka_unit_test(test_cast_onto_a_symlink_to_the_input),
        cmocka_unit_test(test_cast_onto_the_input_through_dotdot),
        cmocka_unit_test(test_second_run_into_a_busy_directory),
        cmocka_unit_test(test_force_keeps_another_model),
        cmocka_unit_test(test_force_removes_a_killed_runs_temporaries),
        cmocka_unit_test(test_refused_run_leaves_foreign_files),
        cmocka_unit_test(test_failed_force_keeps_the_earlier_checkpoint),
        cmocka_unit_test(test_fifo_as_model_weights),
        cmocka_unit_test(test_fifo_as_config),
        cmocka_unit_test(test_fifo_as_token_file),
        cmocka_unit_test(test_fifo_as_recipe),
        cmocka_unit_test(test_token_data_stored_in_a_fifo),
        cmocka_unit_test(test_token_external_link_to_a_fifo),
        cmocka_unit_test(test_token_sequences_longer_than_the_context),
        cmocka_unit_test(test_token_file_declaring_unwritten_sequences),
        cmocka_unit_test(test_token_file_partly_written),
        cmocka_unit_test(test_cast_input_declaring_huge_rows),
        cmocka_unit_test(test_huge_layer_count),
        cmocka_unit_test(test_nan_weight_rtn),
        cmocka_unit_test(test_nan_weight_lazy_layers),
        cmocka_unit_test(test_inf_weight_smoothquant),
        cmocka_unit_test(test_nan_weight_awq_names_the_tensor),
        cmocka_unit_test(test_inf_weight_gptq_names_the_tensor),
        cmocka_unit_test(test_nan_embedding_quantize),
        cmocka_unit_test(test_nan_embedding_eval),
        cmocka_unit_test(test_nan_scale_in_a_checkpoint),
        cmocka_unit_test(test_invalid_codes_in_a_checkpoint),
        cmocka_unit_test(test_eval_nonfinite_result),
        cmocka_unit_test(test_quantize_linear_nan_hessian),
        cmocka_unit_test(test_quantize_linear_asymmetric_hessian),
        cmocka_unit_test(test_quantize_linear_both_x_and_h),
        cmocka_unit_test(test_unwritable_out_dir_found_first),
        cmocka_unit_test(test_unwritable_json_found_first),
        cmocka_unit_test(test_disk_full_cast),
        cmocka_unit_test(test_disk_full_quantize),
        cmocka_unit_test(test_empty_recipe),
        cmocka_unit_test(test_utf16_recipe),
        cmocka_unit_test(test_yaml_error_location),
        cmocka_unit_test(test_second_yaml_document),
        cmocka_unit_test(test_too_large_value_gives_the_range),
        cmocka_unit_test(test_huge_intermediate_size),
        cmocka_unit_test(test_intermediate_size_mismatch),
        cmocka_unit_test(test_config_with_fewer_layers),
        cmocka_unit_test(test_dry_run_totals),
        cmocka_unit_test(test_command_line_error_printed_once),
        cmocka_unit_test(test_eval_block_without_formats),
        cmocka_unit_test(test_help_example_exists),
        cmocka_unit_test(test_repository_points_nowhere_outside),
    };
    return cmocka_run_group_tests_name("cli_hostile", tests, NULL, NULL);
}
