/* The Slurm job scripts in jobs/ against a real Slurm: a private
 * single-node slurmctld + slurmd + munged on localhost, started and stopped
 * by tests/slurm/local_slurm.sh (by PID). Each job runs on 2 tasks.
 *
 * - quantize.sbatch writes the checkpoint an mpirun run writes, byte for
 *   byte, and mxq verify passes it; its log echoes the command and version;
 * - eval.sbatch, with srun and with mpirun as the launcher, gives the
 *   perplexity mxq eval gives;
 * - paper-table.sbatch tabulates FP and two recipes, and a second
 *   submission redoes nothing;
 * - a quantize job with a one-minute time limit is signalled midway
 *   (--signal=B:USR1), stops mxq, requeues itself and resumes, as often as
 *   it takes, and ends with the uninterrupted run's bytes.
 *
 * Where Slurm or munge is not installed the tests are skipped with a
 * message, except under CI (CI set), where that is a failure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "mxq/core.h"
#include "testutil.h"

static char cluster_dir[64];
static int slurm_missing;

static const char *source_root(void) { return tu_data_path(".."); }

static const char *job_script(const char *name)
{
    static char path[512];
    snprintf(path, sizeof(path), "%s/jobs/%s", source_root(), name);
    return path;
}

static const char *tail(const char *text)
{
    const size_t n = strlen(text);
    return n > 700 ? text + n - 700 : text;
}

static tu_run_result run(const char *const *argv)
{
    tu_run_result r;
    tu_run(argv, &r);
    return r;
}

static int group_setup(void **state)
{
    (void)state;
    const char *which[] = {"sh", "-c", "command -v munged && command -v slurmctld && command -v slurmd && command -v sbatch",
                           NULL};
    if (run(which).exit_code != 0) {
        slurm_missing = 1;
        if (getenv("CI")) {
            fprintf(stderr, "Slurm (slurm-wlm) or munge is not installed, and CI is set: the Slurm test must run in CI\n");
            return -1;
        }
        return 0;
    }
    snprintf(cluster_dir, sizeof(cluster_dir), "/tmp/mxq-slurm-XXXXXX");
    assert_non_null(mkdtemp(cluster_dir));
    char start[512];
    snprintf(start, sizeof(start), "%s/tests/slurm/local_slurm.sh", source_root());
    const char *argv[] = {"bash", start, "start", cluster_dir, NULL};
    tu_run_result r = run(argv);
    if (r.exit_code != 0) {
        fprintf(stderr, "could not start the local Slurm: %s\n", tail(r.err));
        return -1;
    }
    char conf[128];
    snprintf(conf, sizeof(conf), "%s/slurm.conf", cluster_dir);
    setenv("SLURM_CONF", conf, 1);
    setenv("MXQ_ROOT", source_root(), 1);
    setenv("MXQ", getenv("MXQ_BIN"), 1);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    if (!cluster_dir[0])
        return 0;
    char stop[512];
    snprintf(stop, sizeof(stop), "%s/tests/slurm/local_slurm.sh", source_root());
    const char *argv[] = {"bash", stop, "stop", cluster_dir, NULL};
    tu_run_result r = run(argv);
    const char *rm[] = {"rm", "-rf", cluster_dir, NULL};
    run(rm);
    return r.exit_code == 0 ? 0 : -1;
}

/* Each test sets the jobs' MXQ_* inputs; none leaks into the next, even
 * when a test fails. */
static int unset_job_env(void **state)
{
    (void)state;
    const char *vars[] = {"MXQ_MODEL", "MXQ_CALIB", "MXQ_RECIPE", "MXQ_OUT", "MXQ_TOKENS", "MXQ_ARGS", "MXQ_LAUNCHER",
                          "MXQ_RECIPES", "MXQ_EVAL_ARGS", "MXQ_QUANT_ARGS", "MXQ_RESUME"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++)
        unsetenv(vars[i]);
    return 0;
}

static void need_slurm(void)
{
    if (slurm_missing) {
        print_message("# SKIP: Slurm (Debian slurm-wlm) or munge is not installed; scripts/test.sh installs them\n");
        skip();
    }
}

/* sbatch --wait of a job script with 2 tasks; its log goes to `log`. */
static tu_run_result sbatch_wait(const char *script, const char *log, const char *arg)
{
    char output[600];
    snprintf(output, sizeof(output), "--output=%s", log);
    const char *argv[] = {"timeout", "600", "sbatch", "--wait", "--ntasks=2", "--cpus-per-task=1", output,
                          job_script(script), arg, NULL};
    tu_run_result r = run(argv);
    if (r.exit_code != 0) {
        char *text = tu_read_file(log, NULL);
        fail_msg("sbatch %s failed (%d): %s\nlog: %s", script, r.exit_code, tail(r.err), text ? tail(text) : "(none)");
    }
    return r;
}

static void expect_in_log(const char *log, const char *fragment)
{
    char *text = tu_read_file(log, NULL);
    assert_non_null(text);
    if (!strstr(text, fragment))
        fail_msg("'%s' is not in the job log %s: %s", fragment, log, tail(text));
    free(text);
}

/* The "perplexity X" word of a job log or of mxq eval's output. */
static void perplexity_of(const char *text, char *out, size_t size)
{
    const char *p = strstr(text, "perplexity ");
    if (!p)
        fail_msg("no perplexity in: %s", tail(text));
    p += strlen("perplexity ");
    snprintf(out, size, "%.*s", (int)strcspn(p, " \n"), p);
}

static void expect_same_checkpoint(const char *a, const char *b)
{
    const char *names[] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                           "model.safetensors.index.json", "config.json"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!tu_same_file(a, b, names[i]))
            fail_msg("%s differs between %s and %s", names[i], a, b);
}

/* mpirun -n 2 mxq quantize, as a pipeline or (group 1) as a group of 2. */
static tu_run_result mpirun_quantize(const char *calib, const char *recipe, const char *out, int group)
{
    const char *argv[] = {"mpirun", "-n", "2", getenv("MXQ_BIN"), "quantize", "-q", "--model",
                          tu_data_path("stories260K"), "--calib", calib, "--recipe", recipe, "--out", out,
                          group ? "--group-size" : NULL, "2", NULL};
    tu_run_result r = run(argv);
    if (r.exit_code != 0)
        fail_msg("the mpirun quantize into %s failed: %s", out, tail(r.err));
    return r;
}

static const char *recipe_32 = "block32/w4a8-mxint-awq-gptq.yaml";

/* quantize.sbatch, then eval.sbatch of what it wrote, launched by srun and by mpirun. */
static void test_quantize_and_eval_jobs(void **state)
{
    (void)state;
    need_slurm();
    const char *out = tu_scratch_path("job-quantized"), *log = tu_scratch_path("quantize.log");
    char recipe[512];
    snprintf(recipe, sizeof(recipe), "%s/configs/recipes/%s", source_root(), recipe_32);
    setenv("MXQ_MODEL", tu_data_path("stories260K"), 1);
    setenv("MXQ_CALIB", tu_data_path("stories260K/calib.h5"), 1);
    setenv("MXQ_RECIPE", recipe, 1);
    setenv("MXQ_OUT", out, 1);
    sbatch_wait("quantize.sbatch", log, "-q");
    expect_in_log(log, "mxq-job: command: srun --mpi=pmix ");
    expect_in_log(log, "mxq-job: mxq " MXQ_VERSION " at ");
    const char *verify[] = {getenv("MXQ_BIN"), "verify", out, NULL};
    tu_run_result r = run(verify);
    if (r.exit_code != 0)
        fail_msg("mxq verify of the job's checkpoint failed: %s", tail(r.err));
    const char *ref = tu_scratch_path("mpirun-quantized");
    mpirun_quantize(tu_data_path("stories260K/calib.h5"), recipe, ref, 0);
    expect_same_checkpoint(ref, out);

    const char *eval[] = {getenv("MXQ_BIN"), "eval", "-q", "--model", out, "--tokens",
                          tu_data_path("stories260K/eval.h5"), NULL};
    r = run(eval);
    assert_int_equal(r.exit_code, 0);
    char expected[64], got[64];
    perplexity_of(r.out, expected, sizeof(expected));
    setenv("MXQ_MODEL", out, 1);
    setenv("MXQ_TOKENS", tu_data_path("stories260K/eval.h5"), 1);
    const char *launchers[] = {"srun", "mpirun"};
    for (int i = 0; i < 2; i++) {
        setenv("MXQ_LAUNCHER", launchers[i], 1);
        const char *eval_log = tu_scratch_path("eval-%s.log", launchers[i]);
        sbatch_wait("eval.sbatch", eval_log, "-q");
        char *text = tu_read_file(eval_log, NULL);
        perplexity_of(text, got, sizeof(got));
        free(text);
        print_message("# eval.sbatch (%s): perplexity %s; mxq eval: %s\n", launchers[i], got, expected);
        assert_string_equal(got, expected);
        expect_in_log(eval_log, i == 0 ? "mxq-job: command: srun --mpi=pmix " : "mxq-job: command: mpirun -n 2 ");
    }
}

/* paper-table.sbatch: FP and two recipes; the table's cells are what mxq
 * eval gives; a second submission finds everything done. */
static void test_paper_table_job(void **state)
{
    (void)state;
    need_slurm();
    const char *root = tu_scratch_path("table");
    char recipes[1100];
    snprintf(recipes, sizeof(recipes), "%s/configs/recipes/block32/w4a8-mxint-rtn.yaml %s/configs/recipes/%s",
             source_root(), source_root(), recipe_32);
    setenv("MXQ_MODEL", tu_data_path("stories260K"), 1);
    setenv("MXQ_CALIB", tu_data_path("stories260K/calib.h5"), 1);
    setenv("MXQ_TOKENS", tu_data_path("stories260K/eval.h5"), 1);
    setenv("MXQ_OUT", root, 1);
    setenv("MXQ_RECIPES", recipes, 1);
    setenv("MXQ_EVAL_ARGS", "--limit 64", 1);
    setenv("MXQ_QUANT_ARGS", "-q", 1);
    sbatch_wait("paper-table.sbatch", tu_scratch_path("table.log"), NULL);
    char *table = tu_read_file(tu_scratch_path("table/table.md"), NULL);
    assert_non_null(table);
    print_message("# %s", table);
    const char *cells[][2] = {{"fp", NULL}, {"w4a8-mxint-rtn", "table/w4a8-mxint-rtn"},
                              {"w4a8-mxint-awq-gptq", "table/w4a8-mxint-awq-gptq"}};
    for (int i = 0; i < 3; i++) {
        const char *model = cells[i][1] ? tu_scratch_path("%s", cells[i][1]) : tu_data_path("stories260K");
        const char *eval[] = {getenv("MXQ_BIN"), "eval", "-q", "--limit", "64", "--model", model, "--tokens",
                              tu_data_path("stories260K/eval.h5"), NULL};
        tu_run_result r = run(eval);
        assert_int_equal(r.exit_code, 0);
        char ppl[64], row[256];
        perplexity_of(r.out, ppl, sizeof(ppl));
        snprintf(row, sizeof(row), "| %s | %s |", cells[i][0], ppl);
        if (!strstr(table, row))
            fail_msg("the table has no row '%s': %s", row, table);
    }
    sbatch_wait("paper-table.sbatch", tu_scratch_path("table-again.log"), NULL);
    expect_in_log(tu_scratch_path("table-again.log"), "mxq-job: w4a8-mxint-awq-gptq: quantized by an earlier run");
    expect_in_log(tu_scratch_path("table-again.log"), "mxq-job: w4a8-mxint-awq-gptq: evaluated by an earlier run");
    char *again = tu_read_file(tu_scratch_path("table/table.md"), NULL);
    assert_string_equal(again, table);
    free(again);
    free(table);
}

/* "Key=value" of `scontrol show job -o ID`, into out ("" if absent). */
static void job_field(const char *show, const char *key, char *out, size_t size)
{
    char pattern[64];
    snprintf(pattern, sizeof(pattern), " %s=", key);
    const char *p = strstr(show, pattern);
    out[0] = '\0';
    if (p) {
        p += strlen(pattern);
        snprintf(out, size, "%.*s", (int)strcspn(p, " \n"), p);
    }
}

/* Wait for job `id` to end, letting each requeue start early: Slurm holds a
 * requeued job for two minutes (Reason=BeginTime), which the test cuts short
 * as an operator would, but not at once: the node refuses ("Job credential
 * revoked") a job started within the second its requeue revoked the old
 * credential, so the hold is lifted on the sixth poll, about 5 s after it
 * was first seen. Returns the number of restarts. */
static int wait_for_job_with_requeues(const char *id, const char *log)
{
    const time_t give_up = time(NULL) + 900;
    char state[64] = "", reason[128], restarts[32];
    int seen_ended = 0, held = 0;
    while (time(NULL) < give_up) {
        const char *show[] = {"scontrol", "show", "job", "-o", id, NULL};
        tu_run_result r = run(show);
        assert_int_equal(r.exit_code, 0);
        job_field(r.out, "JobState", state, sizeof(state));
        job_field(r.out, "Reason", reason, sizeof(reason));
        job_field(r.out, "Restarts", restarts, sizeof(restarts));
        if (strcmp(state, "COMPLETED") == 0)
            return atoi(restarts);
        const char *waiting[] = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED"};
        int still = 0;
        for (size_t i = 0; i < sizeof(waiting) / sizeof(waiting[0]); i++)
            still |= strcmp(state, waiting[i]) == 0;
        /* A job that requeues itself is killed by the requeue and can show
         * as ended (FAILED) for a moment before it is pending again: an end
         * counts once it has lasted 10 s. */
        seen_ended = still ? 0 : seen_ended + 1;
        if (seen_ended > 10) {
            char *text = tu_read_file(log, NULL), grep[1024];
            /* what the controller says of the job, for a failure in CI */
            snprintf(grep, sizeof(grep), "grep -E 'JobId=%s|job_complete' %s/slurmctld.log | tail -20 >&2", id,
                     cluster_dir);
            if (system(grep) != 0)
                fprintf(stderr, "(no slurmctld.log lines for job %s)\n", id);
            fail_msg("job %s ended %s (%s): %s", id, state, reason, text ? tail(text) : "");
        }
        held = strcmp(state, "PENDING") == 0 && strcmp(reason, "BeginTime") == 0 ? held + 1 : 0;
        if (held > 5) {
            char job[64];
            snprintf(job, sizeof(job), "JobId=%s", id);
            const char *now[] = {"scontrol", "update", job, "StartTime=now", NULL};
            run(now);
        }
        sleep(1);
    }
    fail_msg("job %s did not end in 15 minutes (state %s)", id, state);
    return -1;
}

/* A time limit of two minutes on a run of about 85 s here (8192 calibration
 * sequences, sequential, a group of 2 with a store, a finer AWQ grid):
 * Slurm's warning signal (USR1 60 s before the limit; Slurm checks every
 * 30 s, so it comes 30 to 60 s after the start, while a layer takes about
 * 16 s) reaches the batch script midway; mxq stops at a safe point, the job
 * requeues itself, and each requeued run resumes from the layers recorded so
 * far and the store. (A warning 10 to 40 s in, with 12 s layers, could come
 * before a run had recorded anything, again and again.) The uninterrupted
 * reference runs without a store (same bytes, less disk). */
static void test_time_limit_requeue_resume(void **state)
{
    (void)state;
    need_slurm();
    /* The job must outlast the warning (60 s at the latest): on a machine
     * that runs the reference in under 60 s, twice the sequences. (With
     * 16384 sequences a self-requeued job ended FAILED twice in three runs
     * while the hold was lifted at once; with the wait below, two runs of
     * 16384 passed, 9 requeues in all.) */
    const char *calib = NULL, *recipe = NULL, *ref = NULL;
    int copies = 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        copies = 64 << attempt;
        char name[64], samples_name[64];
        snprintf(name, sizeof(name), "limit-%d.yaml", copies);
        snprintf(samples_name, sizeof(samples_name), "limit-%d-0.yaml", copies);
        calib = tu_tiled_calib(copies);
        recipe = tu_edited_copy(tu_recipe_variant("w4a8-mxint-awq-gptq.yaml", 128 * copies, "sequential", samples_name),
                                "grid: 20, clip: true, clip_grid: 20", "grid: 80, clip: true, clip_grid: 60", name);
        ref = tu_scratch_path("limit-uninterrupted-%d", copies);
        const time_t t0 = time(NULL);
        mpirun_quantize(calib, recipe, ref, 1);
        const long took = (long)(time(NULL) - t0);
        print_message("# the uninterrupted run of %d sequences took %ld s\n", 128 * copies, took);
        if (took >= 60)
            break;
    }
    /* the store: 5 layers x sequences x 256 tokens x 64 floats */
    const double store_bytes = 5.0 * 128 * copies * 256 * 64 * 4;
    struct statvfs fs;
    assert_int_equal(statvfs(tu_scratch_dir(), &fs), 0);
    if ((double)fs.f_bavail * fs.f_frsize < store_bytes + 1e9)
        fail_msg("%s has %.1f GB free; this test's activation store needs %.1f GB, and 1 GB to spare", tu_scratch_dir(),
                 (double)fs.f_bavail * fs.f_frsize / 1e9, store_bytes / 1e9);

    const char *out = tu_scratch_path("limit-job"), *log = tu_scratch_path("limit.log");
    char args[700], output[600];
    snprintf(args, sizeof(args), "--group-size 2 --store-activations %s", tu_scratch_path("limit-job.h5"));
    setenv("MXQ_MODEL", tu_data_path("stories260K"), 1);
    setenv("MXQ_CALIB", calib, 1);
    setenv("MXQ_RECIPE", recipe, 1);
    setenv("MXQ_OUT", out, 1);
    setenv("MXQ_ARGS", args, 1);
    snprintf(output, sizeof(output), "--output=%s", log);
    const char *submit[] = {"sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", "--time=2",
                            "--signal=B:USR1@60", output, job_script("quantize.sbatch"), NULL};
    tu_run_result r = run(submit);
    if (r.exit_code != 0)
        fail_msg("sbatch failed: %s", tail(r.err));
    char id[32];
    snprintf(id, sizeof(id), "%.*s", (int)strcspn(r.out, ";\n"), r.out);
    const time_t t1 = time(NULL);
    const int restarts = wait_for_job_with_requeues(id, log);
    print_message("# job %s: %d requeues, %ld s in all\n", id, restarts, (long)(time(NULL) - t1));
    assert_true(restarts >= 1);
    expect_in_log(log, "mxq-job: SIGUSR1 at ");
    expect_in_log(log, "mxq-job: scontrol requeue ");
    /* a requeued run's echoed command ends with --resume */
    char *echoed = tu_read_file(log, NULL);
    int resumed_command = 0;
    for (const char *p = strstr(echoed, "mxq-job: command: "); p; p = strstr(p + 1, "mxq-job: command: "))
        resumed_command |= strncmp(p + strcspn(p, "\n") - strlen(" --resume"), " --resume", strlen(" --resume")) == 0;
    free(echoed);
    assert_true(resumed_command);
    expect_in_log(log, "resuming the run in ");
    /* Some requeued run resumed from at least one recorded layer. */
    char *log_text = tu_read_file(log, NULL);
    int most = 0;
    for (const char *p = strstr(log_text, "resuming the run in "); p; p = strstr(p + 1, "resuming the run in ")) {
        const char *of = strstr(p, ": ");
        assert_non_null(of);
        print_message("# resumed: %.*s\n", (int)strcspn(of + 2, "\n"), of + 2);
        most = atoi(of + 2) > most ? atoi(of + 2) : most;
    }
    free(log_text);
    assert_true(most >= 1);
    expect_same_checkpoint(ref, out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_quantize_and_eval_jobs, unset_job_env, unset_job_env),
        cmocka_unit_test_setup_teardown(test_paper_table_job, unset_job_env, unset_job_env),
        cmocka_unit_test_setup_teardown(test_time_limit_requeue_resume, unset_job_env, unset_job_env),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
