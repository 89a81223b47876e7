/* mxq quantize --resume: a run that dies midway (kill -9 of one rank) or is
 * stopped (SIGTERM to every rank, as Slurm sends at a time limit) continues
 * with --resume to the same bytes as an uninterrupted run, redoing only
 * the layers it had not recorded; a resume with other inputs or another
 * rank count is refused, naming what differs; a plain rerun into the
 * directory is refused, saying how to go on.
 *
 * The bundled model calibrates on 512 sequences (its 128, four times) as
 * a data-parallel group of 2, so that a round of two layers takes about a
 * second here and a run can be caught between two rounds. */
#include <dirent.h>
#include <hdf5.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "testutil.h"

#define HANG_LIMIT "300"
#define LAYERS 5

/* The end of a run's stderr: cmocka prints nothing of a message longer
 * than its buffer. */
static const char *tail(const char *text)
{
    const size_t n = strlen(text);
    return n > 700 ? text + n - 700 : text;
}

/* The calibration file (512 sequences) and a recipe that takes them all. */
static const char *calib_path, *recipe_path;

static void make_inputs(void)
{
    if (calib_path)
        return;
    calib_path = tu_tiled_calib(4);
    recipe_path = tu_recipe_variant("w4a8-mxint-awq-gptq.yaml", 512, NULL, "resume.yaml");
}

/* The model quantize_argv names (NULL: the bundled stories260K). */
static const char *model_path;

/* MXQ_FAULT for the next quantize_argv ("" for none). */
static char fault_env[128] = "MXQ_FAULT=";

/* argv of `mpirun -n ranks mxq quantize ... --out out [extra] [--store-activations store]`. */
static void quantize_argv(const char **argv, char *ranks_text, int ranks, const char *recipe, const char *out,
                          const char *extra, const char *store)
{
    static const char *bin;
    bin = getenv("MXQ_BIN");
    assert_non_null(bin);
    snprintf(ranks_text, 8, "%d", ranks);
    const char *words[] = {"env", fault_env, "timeout", HANG_LIMIT, "mpirun", "-n", ranks_text, "--oversubscribe", bin, "quantize",
                           "--model", model_path ? model_path : tu_data_path("stories260K"), "--calib", calib_path, "--recipe", recipe,
                           "--out", out, "--group-size", ranks_text, extra, store ? "--store-activations" : NULL,
                           store, NULL};
    memcpy(argv, words, sizeof(words));
}

static tu_run_result quantize_with(int ranks, const char *recipe, const char *out, const char *extra,
                                   const char *store)
{
    const char *argv[26];
    char ranks_text[8];
    tu_run_result r;
    quantize_argv(argv, ranks_text, ranks, recipe, out, extra, store);
    tu_run(argv, &r);
    if (r.exit_code == 124)
        fail_msg("mxq quantize into %s did not finish within %s s: %s", out, HANG_LIMIT, tail(r.err));
    return r;
}

static tu_run_result quantize(int ranks, const char *recipe, const char *out, const char *extra)
{
    return quantize_with(ranks, recipe, out, extra, NULL);
}

static int count_records(const char *out)
{
    char dir[1024];
    snprintf(dir, sizeof(dir), "%s/.mxq-resume", out);
    DIR *d = opendir(dir);
    int n = 0;
    if (!d)
        return 0;
    for (struct dirent *e = readdir(d); e; e = readdir(d))
        n += strncmp(e->d_name, "layer-", 6) == 0;
    closedir(d);
    return n;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The pids (at most max) of the processes named `comm` whose parent is
 * `parent`; returns how many. */
static int children_named(int parent, const char *comm, int *pids, int max)
{
    DIR *d = opendir("/proc");
    int found = 0;
    char name[64];
    snprintf(name, sizeof(name), "(%s)", comm);
    assert_non_null(d);
    for (struct dirent *e = readdir(d); e && found < max; e = readdir(d)) {
        char path[300], line[512];
        int pid = atoi(e->d_name), ppid = 0;
        if (pid <= 0)
            continue;
        snprintf(path, sizeof(path), "/proc/%d/stat", pid);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        /* pid (comm) state ppid ...: comm may hold spaces, so read after its ')' */
        if (fgets(line, sizeof(line), f)) {
            char *close = strrchr(line, ')');
            if (close && sscanf(close + 1, " %*c %d", &ppid) == 1 && ppid == parent && strstr(line, name))
                pids[found++] = pid;
        }
        fclose(f);
    }
    closedir(d);
    return found;
}

/* Start a run, wait until it has recorded its first layers, then send
 * `sig` to its ranks (`ranks` of them: 1 is a rank dying alone; 2 is
 * every rank, as Slurm signals every task at a time limit); the run must
 * end without a checkpoint. Returns what it said. */
static tu_run_result interrupt(const char *recipe, const char *out, const char *store, int sig, int ranks)
{
    const char *argv[26];
    char ranks_text[8];
    tu_run_result r;
    int mpirun = -1, rank[2] = {-1, -1};
    quantize_argv(argv, ranks_text, 2, recipe, out, "--force", store);
    const int pid = tu_start(argv, 100); /* timeout, whose child is mpirun, whose children are the ranks */
    for (int waited = 0; waited < 120000 && count_records(out) == 0; waited += 2)
        sleep_ms(2);
    const int found = children_named(pid, "mpirun", &mpirun, 1) == 1 ? children_named(mpirun, "mxq", rank, 2) : 0;
    if (count_records(out) == 0 || found < ranks)
        fail_msg("no layer recorded in %s, or not %d ranks to stop (%d found)", out, ranks, found);
    for (int i = 0; i < ranks; i++)
        assert_int_equal(kill(rank[i], sig), 0);
    tu_finish(pid, 100, &r);
    if (r.exit_code == 0)
        fail_msg("the run into %s finished before it was interrupted", out);
    char index[1024];
    snprintf(index, sizeof(index), "%s/model.safetensors.index.json", out);
    assert_int_not_equal(access(index, F_OK), 0);
    return r;
}

static void assert_same_file(const char *a, const char *b, const char *name)
{
    if (!tu_same_file(a, b, name))
        fail_msg("%s differs between %s and %s", name, a, b);
}

static void assert_same_checkpoint(const char *a, const char *b)
{
    assert_same_file(a, b, "model-00001-of-00002.safetensors");
    assert_same_file(a, b, "model-00002-of-00002.safetensors");
    assert_same_file(a, b, "model.safetensors.index.json");
    assert_same_file(a, b, "config.json");
    char records[1024];
    snprintf(records, sizeof(records), "%s/.mxq-resume", b);
    if (access(records, F_OK) == 0)
        fail_msg("%s is still there after the checkpoint is complete", records);
}

/* The uninterrupted run every resumed one is compared with. */
static const char *reference(void)
{
    static const char *ref;
    if (ref)
        return ref;
    make_inputs();
    ref = tu_scratch_path("uninterrupted");
    tu_run_result r = quantize(2, recipe_path, ref, "--quiet");
    if (r.exit_code != 0)
        fail_msg("the uninterrupted run failed: %s", tail(r.err));
    return ref;
}

/* Every /layers/<l> of two activation stores holds the same floats. */
static void assert_same_store(const char *a, const char *b)
{
    hid_t fa = H5Fopen(a, H5F_ACC_RDONLY, H5P_DEFAULT), fb = H5Fopen(b, H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(fa >= 0 && fb >= 0);
    for (int l = 0; l < LAYERS; l++) {
        char name[32];
        int ra, rb;
        size_t da[4], db[4];
        snprintf(name, sizeof(name), "layers/%d", l);
        float *xa = tu_h5_read(fa, name, H5T_NATIVE_FLOAT, sizeof(float), &ra, da);
        float *xb = tu_h5_read(fb, name, H5T_NATIVE_FLOAT, sizeof(float), &rb, db);
        assert_int_equal(ra, 3);
        assert_int_equal(rb, 3);
        const size_t n = da[0] * da[1] * da[2];
        assert_int_equal(n, db[0] * db[1] * db[2]);
        if (memcmp(xa, xb, n * sizeof(float)) != 0)
            fail_msg("/%s differs between %s and %s", name, a, b);
        free(xa);
        free(xb);
    }
    H5Fclose(fa);
    H5Fclose(fb);
}

/* Sequential calibration by the group with a store: kill -9 of both ranks
 * after a layer is recorded; --resume reads the next layer's inputs (the
 * quantized layers' outputs) back from the store the killed run left,
 * runs none of the recorded layers again, and ends with the uninterrupted
 * run's checkpoint and store. */
static void test_sequential_kill_then_resume_from_store(void **state)
{
    (void)state;
    make_inputs();
    const char *recipe = tu_recipe_variant("w4a8-mxint-awq-gptq.yaml", 512, "sequential", "sequential.yaml");
    const char *ref = tu_scratch_path("seq-uninterrupted"), *ref_store = tu_scratch_path("seq-uninterrupted.h5");
    tu_run_result r = quantize_with(2, recipe, ref, "--quiet", ref_store);
    if (r.exit_code != 0)
        fail_msg("the uninterrupted sequential run failed: %s", tail(r.err));

    const char *out = tu_scratch_path("seq-killed"), *store = tu_scratch_path("seq-killed.h5");
    r = interrupt(recipe, out, store, SIGKILL, 2);
    const int recorded = count_records(out);
    print_message("# sequential, kill -9 of both ranks after %d of %d layers were recorded\n", recorded, LAYERS);
    assert_true(recorded >= 1 && recorded < LAYERS);
    assert_int_not_equal(access(store, F_OK), 0); /* the store is no store until the run is complete */
    r = quantize_with(2, recipe, out, "--resume", store);
    if (r.exit_code != 0)
        fail_msg("--resume of the sequential run failed: %s", tail(r.err));
    char said[128];
    snprintf(said, sizeof(said), "layer %d's inputs read from the activation store", recorded);
    if (!strstr(r.err, said) || !strstr(r.err, "taken over"))
        fail_msg("the resumed run does not say it read layer %d's inputs from the store it took over: %s", recorded,
                 tail(r.err));
    assert_same_checkpoint(ref, out);
    assert_same_store(ref_store, store);
}

/* The case: a model written by mxq synth (tiny-llama: 2 layers of
 * hidden 256, BF16), calibrated sequentially on 512 sequences so that a
 * layer takes seconds; kill -9 of one rank while the second layer is being
 * calibrated (the first recorded), then --resume: the uninterrupted bytes. */
static void test_synth_model_kill_one_rank_mid_layer(void **state)
{
    (void)state;
    make_inputs();
    const char *model = tu_scratch_path("tiny-llama");
    const char *synth[] = {getenv("MXQ_BIN"), "synth", "--preset", "tiny-llama", "--out", model, "-q", NULL};
    tu_run_result r;
    tu_run(synth, &r);
    assert_int_equal(r.exit_code, 0);
    model_path = model;
    const char *recipe = tu_recipe_variant("w4a8-mxint-awq-gptq.yaml", 512, "sequential", "synth-sequential.yaml");
    const char *ref = tu_scratch_path("synth-uninterrupted");
    r = quantize_with(2, recipe, ref, "--quiet", tu_scratch_path("synth-uninterrupted.h5"));
    if (r.exit_code != 0)
        fail_msg("the uninterrupted run of the synth model failed: %s", tail(r.err));
    const char *out = tu_scratch_path("synth-killed"), *store = tu_scratch_path("synth-killed.h5");
    r = interrupt(recipe, out, store, SIGKILL, 1);
    assert_int_equal(count_records(out), 1);
    r = quantize_with(2, recipe, out, "--resume", store);
    model_path = NULL;
    if (r.exit_code != 0)
        fail_msg("--resume of the synth model's run failed: %s", tail(r.err));
    if (!strstr(r.err, "resuming the run in ") || !strstr(r.err, "1 of 2 layers from its records"))
        fail_msg("the resumed run does not say it took layer 0 from its records: %s", tail(r.err));
    assert_same_checkpoint(ref, out);
}

/* kill -9 of one rank mid-run; --resume redoes only what was not recorded. */
static void test_kill_then_resume(void **state)
{
    (void)state;
    const char *ref = reference(), *out = tu_scratch_path("killed");
    tu_run_result r = interrupt(recipe_path, out, NULL, SIGKILL, 1);
    const int recorded = count_records(out);
    print_message("# kill -9 of rank 1 after %d of %d layers were recorded\n", recorded, LAYERS);
    assert_true(recorded >= 1 && recorded < LAYERS);
    r = quantize(2, recipe_path, out, "--resume");
    if (r.exit_code != 0)
        fail_msg("--resume after kill -9 failed: %s", tail(r.err));
    char said[128];
    snprintf(said, sizeof(said), "%d of %d layers from its records", recorded, LAYERS);
    if (!strstr(r.err, said))
        fail_msg("the resumed run does not say '%s': %s", said, tail(r.err));
    assert_same_checkpoint(ref, out);
}

/* SIGTERM to every rank: they stop at a safe point, say how to resume,
 * and the refusals of a resume that would not give the same bytes come
 * before the resume that does. */
static void test_sigterm_then_resume(void **state)
{
    (void)state;
    const char *ref = reference(), *out = tu_scratch_path("stopped");
    tu_run_result r = interrupt(recipe_path, out, NULL, SIGTERM, 2);
    if (!strstr(r.err, "stopped by SIGTERM") || !strstr(r.err, "with --resume continues the run") ||
        r.exit_code != 75)
        fail_msg("a run stopped by SIGTERM does not say so and how to resume, or exits %d, not 75: %s", r.exit_code,
                 tail(r.err));
    const int recorded = count_records(out);
    print_message("# SIGTERM to the ranks after %d of %d layers were recorded\n", recorded, LAYERS);
    if (recorded < 1 || recorded >= LAYERS)
        fail_msg("%d layers recorded: %s", recorded, tail(r.err));

    r = quantize(2, recipe_path, out, "--quiet");
    if (r.exit_code == 0 || !strstr(r.err, "holds an unfinished run") || !strstr(r.err, "--resume"))
        fail_msg("a plain rerun into an unfinished run's directory: %s", tail(r.err));
    const char *other = tu_scratch_path("other.yaml");
    char *text = tu_read_file(recipe_path, NULL);
    char changed[4096];
    snprintf(changed, sizeof(changed), "%s\n# another recipe\n", text);
    free(text);
    tu_write_file(other, changed, strlen(changed));
    r = quantize(2, other, out, "--resume");
    if (r.exit_code == 0 || !strstr(r.err, "differs in 'recipe.sha256'"))
        fail_msg("--resume with another recipe: %s", tail(r.err));
    r = quantize(3, recipe_path, out, "--resume");
    if (r.exit_code == 0 || !strstr(r.err, "differs in 'ranks'"))
        fail_msg("--resume on 3 ranks: %s", tail(r.err));
    text = tu_read_file(recipe_path, NULL);
    char *mode = strstr(text, "mode: fp");
    assert_non_null(mode);
    snprintf(changed, sizeof(changed), "%.*smode: sequential%s", (int)(mode - text), text, mode + strlen("mode: fp"));
    free(text);
    tu_write_file(other, changed, strlen(changed));
    r = quantize(2, other, out, "--resume");
    if (r.exit_code == 0 || !strstr(r.err, "needs the activation store the run wrote"))
        fail_msg("--resume of a sequential recipe: %s", tail(r.err));
    assert_int_equal(count_records(out), recorded); /* the refusals kept the records */

    r = quantize(2, recipe_path, out, "--resume");
    if (r.exit_code != 0)
        fail_msg("--resume after SIGTERM failed: %s", tail(r.err));
    assert_same_checkpoint(ref, out);
}

/* A run that failed after every layer was recorded (while its shards were
 * put in place) with its store whole: --resume runs nothing again, and
 * commits the store it takes over. */
static void test_every_layer_recorded(void **state)
{
    (void)state;
    const char *ref = reference(), *out = tu_scratch_path("all-recorded"), *store = tu_scratch_path("all-recorded.h5");
    snprintf(fault_env, sizeof(fault_env), "MXQ_FAULT=1:quantize.commit.shards");
    tu_run_result r = quantize_with(2, recipe_path, out, "--quiet", store);
    snprintf(fault_env, sizeof(fault_env), "MXQ_FAULT=");
    assert_int_not_equal(r.exit_code, 0);
    assert_int_equal(count_records(out), LAYERS);
    r = quantize_with(2, recipe_path, out, "--resume", store);
    if (r.exit_code != 0 || !strstr(r.err, "every layer is recorded") || !strstr(r.err, "taken over"))
        fail_msg("--resume with every layer recorded: %s", tail(r.err));
    if (strstr(r.err, "calibration:"))
        fail_msg("--resume with every layer recorded calibrated again: %s", tail(r.err));
    assert_same_checkpoint(ref, out);
    assert_int_equal(access(store, F_OK), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kill_then_resume),
        cmocka_unit_test(test_sigterm_then_resume),
        cmocka_unit_test(test_sequential_kill_then_resume_from_store),
        cmocka_unit_test(test_every_layer_recorded),
        cmocka_unit_test(test_synth_model_kill_one_rank_mid_layer),
    };
    return cmocka_run_group_tests_name("cli_resume", tests, NULL, NULL);
}
