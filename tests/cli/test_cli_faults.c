/* Whatever rank fails wherever, every rank stops. A first run of each job
 * lists every step it passes (MXQ_FAULT=list: every agreement point and
 * every place inside a pipeline where one rank can fail while the others
 * wait); then, for each step, the job runs again with one rank told to fail
 * there (MXQ_FAULT=RANK:STEP): on 2 ranks every rank in turn, on 3 ranks one
 * rank per step, rotating over the steps. Each such run must end
 * within 10 s with every rank's exit status non-zero, print exactly one
 * error line, naming the rank and the step, and leave no index (quantize)
 * or JSON report (eval), no temporary file and not even the output
 * directory it made behind, unless it recorded layers: then it leaves those
 * records alone (and a group's activation store), and --resume ends the
 * job with the bytes of an uninterrupted run. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "testutil.h"

#define MAX_STEPS 64
#define MAX_ARGS 40

typedef struct {
    char name[96];
    int reached_by[4]; /* ranks that reach it */
    int n_ranks;
} step_info;

typedef enum {
    JOB_EVAL,
    JOB_QUANTIZE_FP,
    JOB_QUANTIZE_SEQ,
    JOB_QUANTIZE_GROUP,
    JOB_QUANTIZE_GRID,
    JOB_QUANTIZE_SEQ_GROUP,
    JOB_QUANTIZE_STORE,
    JOB_QUANTIZE_SPREAD
} job_kind;


/* Small but complete jobs: several micro-batches, so a failure midway
 * through a pipeline leaves messages in flight. Sequential ones search AWQ
 * scales too, which its group exchanges. */
static const char *recipe(int sequential)
{
    const char *path = tu_scratch_path("faults-%s.yaml", sequential ? "seq" : "fp");
    char text[512];
    snprintf(text, sizeof(text),
             "weights: {format: mxint4, block: 32}\nactivations: {format: mxint8, block: 32}\n"
             "algorithms:\n%s  - gptq: {block: 64, microblock: 32}\ncalibration: {samples: 6, mode: %s}\n",
             sequential ? "  - awq: {grid: 4, clip: false}\n" : "", sequential ? "sequential" : "fp");
    tu_write_file(path, text, strlen(text));
    return path;
}

/* The group with spread statistics: AWQ with clipping (every kind of
 * request to the ranks holding the Hessians) and GPTQ on the grid, on the
 * tiny-llama synth model (inputs of 256 and 512: whole batches of 64). */
static const char *spread_recipe(void)
{
    const char *path = tu_scratch_path("faults-spread.yaml");
    const char *text = "weights: {format: mxint4, block: 32}\nactivations: {format: mxint8, block: 32}\n"
                       "algorithms:\n  - awq: {grid: 4, clip: true, clip_grid: 4}\n"
                       "  - gptq: {block: 64, microblock: 32}\ncalibration: {samples: 6, mode: fp}\n";
    tu_write_file(path, text, strlen(text));
    return path;
}

static const char *tiny_model(void)
{
    static const char *dir;
    if (dir)
        return dir;
    dir = tu_scratch_path("faults-tiny-llama");
    const char *argv[] = {getenv("MXQ_BIN"), "synth", "--preset", "tiny-llama", "--out", dir, "--force", "-q", NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (r.exit_code != 0)
        fail_msg("mxq synth --preset tiny-llama failed: %s", r.err);
    return dir;
}

/* argv of: timeout 10 mpirun -n R -x MXQ_FAULT=fault sh -c 'mxq "$@"; echo rank-exit' sh <job>.
 * Every rank reports its own exit status, and mpirun lets each rank end on
 * its own instead of killing the others at the first failure. */
static void job_argv_with(const char **argv, job_kind kind, int ranks, const char *fault, const char *out,
                          const char *extra)
{
    char *n = malloc(16), *fault_env = malloc(160); /* live as long as the test */
    snprintf(n, 16, "%d", ranks);
    snprintf(fault_env, 160, "MXQ_FAULT=%s", fault);
    const char *model = kind == JOB_QUANTIZE_SPREAD ? tiny_model() : tu_data_path("stories260K");
    size_t k = 0;
    const char *head[] = {"timeout", "10", "mpirun", "-n", n, "--oversubscribe", "--mca",
                          "orte_abort_on_non_zero_status", "0", "-x", fault_env, "sh", "-c",
                          "\"$0\" \"$@\"; echo \"rank-exit $OMPI_COMM_WORLD_RANK $?\" >&2", getenv("MXQ_BIN")};
    for (size_t i = 0; i < sizeof(head) / sizeof(head[0]); i++)
        argv[k++] = head[i];
    if (kind == JOB_EVAL) {
        const char *rest[] = {"eval", "--model", model, "--tokens", tu_data_path("stories260K/eval.h5"), "--limit", "6",
                              "--batch", "2", "--weights", "mxint8", "--acts", "mxint8", "--json", out, "-q"};
        for (size_t i = 0; i < sizeof(rest) / sizeof(rest[0]); i++)
            argv[k++] = rest[i];
    } else {
        const char *rec = kind == JOB_QUANTIZE_SPREAD ? spread_recipe()
                                                      : recipe(kind == JOB_QUANTIZE_SEQ || kind == JOB_QUANTIZE_SEQ_GROUP);
        const char *rest[] = {"quantize", "--model", model, "--calib", tu_data_path("stories260K/calib.h5"),
                              "--recipe", rec, "--batch", "2", "--out", out, "-q"};
        for (size_t i = 0; i < sizeof(rest) / sizeof(rest[0]); i++)
            argv[k++] = rest[i];
        if (extra) /* --force, --resume */
            argv[k++] = extra;
        if (kind == JOB_QUANTIZE_STORE) { /* the group, with its activation store in the output directory */
            char *store = malloc(strlen(out) + 16); /* lives as long as the test */
            sprintf(store, "%s/acts.h5", out);
            argv[k++] = "--store-activations";
            argv[k++] = store;
        }
        if (kind == JOB_QUANTIZE_GROUP || kind == JOB_QUANTIZE_GRID || kind == JOB_QUANTIZE_SEQ_GROUP ||
            kind == JOB_QUANTIZE_SPREAD) {
            /* one data-parallel group of all ranks */
            argv[k++] = "--group-size";
            argv[k++] = n;
        }
        if (kind == JOB_QUANTIZE_GRID || kind == JOB_QUANTIZE_SPREAD) { /* GPTQ of the 64-input linears on the grid */
            argv[k++] = "--grid-min-inputs";
            argv[k++] = "1";
        }
    }
    argv[k] = NULL;
}

static void job_argv(const char **argv, job_kind kind, int ranks, const char *fault, const char *out)
{
    job_argv_with(argv, kind, ranks, fault, out, NULL);
}

static void add_step(step_info *steps, int *n, const char *name, int rank)
{
    int i = 0;
    while (i < *n && strcmp(steps[i].name, name) != 0)
        i++;
    if (i == *n) {
        assert_true(*n < MAX_STEPS);
        memset(&steps[i], 0, sizeof(steps[i]));
        snprintf(steps[i].name, sizeof(steps[i].name), "%s", name);
        (*n)++;
    }
    for (int r = 0; r < steps[i].n_ranks; r++)
        if (steps[i].reached_by[r] == rank)
            return;
    steps[i].reached_by[steps[i].n_ranks++] = rank;
}

/* The steps of a successful run, in the order first reached. */
static int list_steps(job_kind kind, int ranks, step_info *steps)
{
    const char *argv[MAX_ARGS];
    tu_run_result r;
    const char *out = tu_scratch_path("faults-list-%d-%d%s", kind, ranks, kind == JOB_EVAL ? ".json" : "");
    char cmd[700];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", out); /* listed before, for another walk */
    const char *rm[] = {"sh", "-c", cmd, NULL};
    tu_run(rm, &r);
    job_argv(argv, kind, ranks, "list", out);
    tu_run(argv, &r);
    if (r.exit_code != 0 || strstr(r.err, "error:"))
        fail_msg("the listing run failed: %s", r.err);
    int n = 0;
    for (const char *p = strstr(r.err, "mxq fault-point: "); p; p = strstr(p + 1, "mxq fault-point: ")) {
        int rank;
        char name[96];
        if (sscanf(p, "mxq fault-point: rank %d step %95s", &rank, name) == 2)
            add_step(steps, &n, name, rank);
    }
    return n;
}

static int count(const char *text, const char *what)
{
    int n = 0;
    for (const char *p = strstr(text, what); p; p = strstr(p + 1, what))
        n++;
    return n;
}

/* What a failed quantize run may leave in the directory it made: nothing
 * (the directory goes), or, once a layer is recorded, the records to
 * resume from (.mxq-resume: job.json and whole layer records) and the
 * activation store's temporary (acts.h5, the group's). Returns 1 if it
 * left records. */
static int check_resumable_leftovers(const char *out, const char *step)
{
    char cmd[1400];
    snprintf(cmd, sizeof(cmd),
             "cd '%s' && ls -A | grep -v -x -e .mxq-resume -e '[.]acts[.]h5[.]tmp-[0-9-]*'; "
             "ls -A .mxq-resume | grep -v -x -e job.json -e 'layer-[0-9]*[.]safetensors'; "
             "ls .mxq-resume | grep -q '^layer-' || echo 'no layer record'",
             out);
    const char *argv[] = {"sh", "-c", cmd, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (r.out[0])
        fail_msg("failing at '%s' left %s behind with: %s", step, out, r.out);
    return 1;
}

/* A failed run leaves no temporary file, and a quantize run not even the
 * directory it made (also when it failed halfway through its commit),
 * unless it recorded layers to resume from. Returns 1 if it did. */
static int check_no_leftovers(const char *out, job_kind kind, const char *step)
{
    char cmd[1200];
    const char *slash = strrchr(out, '/');
    if (kind != JOB_EVAL && access(out, F_OK) == 0)
        return check_resumable_leftovers(out, step);
    if (kind == JOB_EVAL)
        snprintf(cmd, sizeof(cmd), "ls -a '%.*s' | grep -F '.%s.tmp-'", (int)(slash - out), out, slash + 1);
    else
        snprintf(cmd, sizeof(cmd), "ls -a '%s' 2>/dev/null | grep -F '.tmp-'", out);
    const char *argv[] = {"sh", "-c", cmd, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (r.out[0])
        fail_msg("failing at '%s' left temporary files behind: %s", step, r.out);
    return 0;
}

/* Each rank printed "rank-exit R STATUS" with a non-zero status. */
static void every_rank_failed(const tu_run_result *r, int ranks, int victim, const char *step)
{
    char exit_line[32];
    for (int rank = 0; rank < ranks; rank++) {
        snprintf(exit_line, sizeof(exit_line), "rank-exit %d ", rank);
        const char *p = strstr(r->err, exit_line);
        if (!p || atoi(p + strlen(exit_line)) == 0)
            fail_msg("rank %d failing at '%s' on %d ranks: rank %d %s: %s", victim, step, ranks, rank,
                     p ? "exited with status 0" : "did not exit by itself", r->err);
    }
}

static int check_fault_run(const tu_run_result *r, int ranks, int victim, const char *step, const char *out,
                           job_kind kind)
{
    char expect[256], tag[32], leftover[600];
    if (r->exit_code == 124)
        fail_msg("rank %d failing at '%s' on %d ranks: not every rank stopped within 10 s: %s", victim, step, ranks,
                 r->err);
    every_rank_failed(r, ranks, victim, step);
    snprintf(expect, sizeof(expect), "injected fault on rank %d at step '%.95s'", victim, step);
    snprintf(tag, sizeof(tag), "[rank %d] ", victim);
    if (count(r->err, "error:") != 1 || !strstr(r->err, expect) || !strstr(r->err, tag))
        fail_msg("rank %d failing at '%s' on %d ranks: expected one error line naming the rank and step: %s", victim,
                 step, ranks, r->err);
    snprintf(leftover, sizeof(leftover), kind == JOB_EVAL ? "%s" : "%s/model.safetensors.index.json", out);
    if (access(leftover, F_OK) == 0)
        fail_msg("rank %d failing at '%s' on %d ranks: %s was written", victim, step, ranks, leftover);
    return check_no_leftovers(out, kind, step);
}

static void assert_same_file(const char *a, const char *b, const char *name, const char *step)
{
    if (!tu_same_file(a, b, name))
        fail_msg("failing at '%s', then --resume: %s/%s differs from the uninterrupted run's", step, b, name);
}

/* Every run that failed after recording layers goes on with --resume, to
 * the bytes of the uninterrupted (listing) run. */
static int resume_each(job_kind kind, int ranks, const char *const *outs, const int *recorded, const char *const *steps,
                       int n)
{
    const char *(*argv_store)[MAX_ARGS] = calloc((size_t)n + 1, sizeof(*argv_store));
    const char **argvs[MAX_STEPS * 4] = {NULL};
    int which[MAX_STEPS * 4], m = 0;
    for (int i = 0; i < n; i++)
        if (recorded[i]) {
            job_argv_with(argv_store[m], kind, ranks, "", outs[i], "--resume");
            argvs[m] = argv_store[m];
            which[m++] = i;
        }
    tu_run_result *results = calloc((size_t)m + 1, sizeof(*results));
    tu_run_all((const char *const *const *)argvs, (size_t)m, 3, results);
    const char *reference = tu_scratch_path("faults-list-%d-%d", kind, ranks);
    for (int j = 0; j < m; j++) {
        const int i = which[j];
        char shard[64];
        if (results[j].exit_code != 0 || strstr(results[j].err, "error:"))
            fail_msg("failing at '%s', then --resume: %s", steps[i], results[j].err);
        for (int r = 0; r < ranks; r++) {
            snprintf(shard, sizeof(shard), "model-%05d-of-%05d.safetensors", r + 1, ranks);
            assert_same_file(reference, outs[i], shard, steps[i]);
        }
        assert_same_file(reference, outs[i], "model.safetensors.index.json", steps[i]);
    }
    free(results);
    free(argv_store);
    return m;
}

/* Every step of the job on `ranks` ranks, a few runs at a time. With
 * `every_rank`, each rank that reaches a step fails there in turn;
 * otherwise one rank per step, rotating. */
static void walk(job_kind kind, int ranks, int every_rank, const char *label)
{
    step_info steps[MAX_STEPS];
    int n_steps = list_steps(kind, ranks, steps), n = 0;
    assert_true(n_steps >= 4);
    const char *(*argv_store)[MAX_ARGS] = calloc(MAX_STEPS * 4, sizeof(*argv_store));
    const char **argvs[MAX_STEPS * 4], *outs[MAX_STEPS * 4];
    char faults[MAX_STEPS * 4][128];
    int victims[MAX_STEPS * 4], step_of[MAX_STEPS * 4];
    for (int i = 0; i < n_steps; i++)
        for (int k = 0; k < steps[i].n_ranks; k++) {
            if (!every_rank && k != i % steps[i].n_ranks)
                continue;
            victims[n] = steps[i].reached_by[k];
            step_of[n] = i;
            snprintf(faults[n], sizeof(faults[n]), "%d:%.95s", victims[n], steps[i].name);
            outs[n] = tu_scratch_path("faults-%d-%d-%d%s", kind, ranks, n, kind == JOB_EVAL ? ".json" : "");
            job_argv(argv_store[n], kind, ranks, faults[n], outs[n]);
            argvs[n] = argv_store[n];
            n++;
        }
    tu_run_result *results = calloc((size_t)n, sizeof(*results));
    tu_run_all((const char *const *const *)argvs, (size_t)n, 3, results);
    /* the step names once each: cmocka cuts a message of some 4 KB, and
     * with it the TAP line's end */
    char names[2048] = "";
    int recorded[MAX_STEPS * 4];
    const char *step_names[MAX_STEPS * 4];
    for (int i = 0; i < n; i++) {
        step_names[i] = steps[step_of[i]].name;
        recorded[i] = check_fault_run(&results[i], ranks, victims[i], steps[step_of[i]].name, outs[i], kind);
        size_t used = strlen(names);
        if (i == 0 || step_of[i] != step_of[i - 1])
            snprintf(names + used, sizeof(names) - used, "%s%.95s", i ? " " : "", steps[step_of[i]].name);
    }
    const int resumed = kind == JOB_EVAL ? 0 : resume_each(kind, ranks, outs, recorded, step_names, n);
    print_message("# %s on %d ranks: %d steps, %d runs (%s); every rank stopped, one message; %d left layer records "
                  "and --resume gave the uninterrupted run's bytes: %s\n",
                  label, ranks, n_steps, n, every_rank ? "every rank at every step" : "one rank per step, rotating",
                  resumed, names);
    free(results);
    free(argv_store);
}

static void sh(const char *cmd)
{
    const char *argv[] = {"sh", "-c", cmd, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (r.exit_code != 0)
        fail_msg("'%s' failed: %s", cmd, r.err);
}

/* A --force run over an earlier checkpoint that fails before its commit
 * leaves that checkpoint exactly as it was; one that fails during the commit
 * leaves no index and no temporary (never a mix of the two runs). */
static void check_force_run(const tu_run_result *r, int ranks, int victim, const char *step, const char *out,
                            const char *earlier)
{
    char cmd[1200], index[600];
    const int committing = strncmp(step, "quantize.commit", 15) == 0;
    if (r->exit_code == 124 || count(r->err, "error:") != 1)
        fail_msg("--force run failing at '%s': expected one error within 10 s: exit %d, %s", step, r->exit_code,
                 r->err);
    every_rank_failed(r, ranks, victim, step);
    /* prints any temporary, and before the commit any difference (but the
     * records a --resume would go on from) */
    if (committing)
        snprintf(cmd, sizeof(cmd), "ls -a '%s' | grep -F '.tmp-'", out);
    else
        snprintf(cmd, sizeof(cmd), "ls -a '%s' | grep -F '.tmp-'; diff -r -x .mxq-resume '%s' '%s'", out, earlier,
                 out);
    const char *argv[] = {"sh", "-c", cmd, NULL};
    tu_run_result d;
    tu_run(argv, &d);
    if (d.out[0])
        fail_msg("--force run failing at '%s' %s: %s", step,
                 committing ? "left temporaries" : "changed the earlier checkpoint", d.out);
    snprintf(index, sizeof(index), "%s/model.safetensors.index.json", out);
    if (committing && access(index, F_OK) == 0)
        fail_msg("--force run failing at '%s' left an index: a mix of two runs would look complete", step);
}

/* quantize --force over an earlier checkpoint, failing at every step once. */
static void walk_force(int ranks)
{
    step_info steps[MAX_STEPS];
    int n_steps = list_steps(JOB_QUANTIZE_FP, ranks, steps);
    assert_true(n_steps >= 4 && n_steps <= MAX_STEPS);
    const char *earlier = tu_scratch_path("faults-force-earlier");
    const char *argv0[MAX_ARGS];
    job_argv(argv0, JOB_QUANTIZE_FP, ranks, "", earlier);
    tu_run_result r0;
    tu_run(argv0, &r0);
    assert_int_equal(r0.exit_code, 0);
    const char *(*argv_store)[MAX_ARGS] = calloc(MAX_STEPS, sizeof(*argv_store));
    const char **argvs[MAX_STEPS], *outs[MAX_STEPS];
    char faults[MAX_STEPS][128], cmd[1200];
    int victims[MAX_STEPS];
    for (int i = 0; i < n_steps; i++) {
        victims[i] = steps[i].reached_by[i % steps[i].n_ranks];
        snprintf(faults[i], sizeof(faults[i]), "%d:%.95s", victims[i], steps[i].name);
        outs[i] = tu_scratch_path("faults-force-%d", i);
        snprintf(cmd, sizeof(cmd), "rm -rf '%s' && cp -a '%s' '%s'", outs[i], earlier, outs[i]);
        sh(cmd);
        job_argv_with(argv_store[i], JOB_QUANTIZE_FP, ranks, faults[i], outs[i], "--force");
        argvs[i] = argv_store[i];
    }
    tu_run_result *results = calloc(MAX_STEPS, sizeof(*results));
    tu_run_all((const char *const *const *)argvs, (size_t)n_steps, 3, results);
    for (int i = 0; i < n_steps; i++)
        check_force_run(&results[i], ranks, victims[i], steps[i].name, outs[i], earlier);
    print_message("# quantize --force over an earlier checkpoint on %d ranks: %d steps; before the commit it stays "
                  "as it was, during it no index is left\n",
                  ranks, n_steps);
    free(results);
    free(argv_store);
}

static void test_eval_every_step(void **state)
{
    (void)state;
    walk(JOB_EVAL, 2, 1, "eval");
    walk(JOB_EVAL, 3, 0, "eval");
}

static void test_quantize_fp_every_step(void **state)
{
    (void)state;
    walk(JOB_QUANTIZE_FP, 2, 1, "quantize (fp)");
    walk(JOB_QUANTIZE_FP, 3, 0, "quantize (fp)");
}

static void test_quantize_group_every_step(void **state)
{
    (void)state;
    walk(JOB_QUANTIZE_GROUP, 2, 1, "quantize (data-parallel group)");
    walk(JOB_QUANTIZE_GROUP, 3, 0, "quantize (data-parallel group)");
}

/* The same group with GPTQ on the grid: its own agreement points
 * (gptq.grid.*) and those between the owners' phases. */
static void test_quantize_grid_every_step(void **state)
{
    (void)state;
    walk(JOB_QUANTIZE_GRID, 2, 1, "quantize (group, GPTQ on the grid)");
    walk(JOB_QUANTIZE_GRID, 3, 0, "quantize (group, GPTQ on the grid)");
}

/* Statistics spread over the group: the exchanges of activations (a rank
 * failing before one joins it with its failure) and the owner's requests
 * served by the others (spread.*). */
static void test_quantize_spread_every_step(void **state)
{
    (void)state;
    walk(JOB_QUANTIZE_SPREAD, 2, 1, "quantize (group, spread statistics)");
    walk(JOB_QUANTIZE_SPREAD, 3, 0, "quantize (group, spread statistics)");
}

static void test_quantize_force_every_step(void **state)
{
    (void)state;
    walk_force(2);
}

static void test_quantize_sequential_every_step(void **state)
{
    (void)state;
    walk(JOB_QUANTIZE_SEQ, 2, 1, "quantize (sequential)");
    walk(JOB_QUANTIZE_SEQ, 3, 0, "quantize (sequential)");
}

/* A failure anywhere leaves no store either (it is committed just before
 * the index), so the output directory goes as a whole. */
static void test_quantize_store_every_step(void **state)
{
    (void)state;
    walk(JOB_QUANTIZE_STORE, 2, 1, "quantize (group, --store-activations)");
}

static void test_quantize_sequential_group_every_step(void **state)
{
    (void)state;
    walk(JOB_QUANTIZE_SEQ_GROUP, 2, 1, "quantize (sequential, data-parallel group)");
    walk(JOB_QUANTIZE_SEQ_GROUP, 3, 0, "quantize (sequential, data-parallel group)");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eval_every_step),
        cmocka_unit_test(test_quantize_fp_every_step),
        cmocka_unit_test(test_quantize_group_every_step),
        cmocka_unit_test(test_quantize_grid_every_step),
        cmocka_unit_test(test_quantize_spread_every_step),
        cmocka_unit_test(test_quantize_force_every_step),
        cmocka_unit_test(test_quantize_sequential_every_step),
        cmocka_unit_test(test_quantize_sequential_group_every_step),
        cmocka_unit_test(test_quantize_store_every_step),
    };
    return cmocka_run_group_tests_name("cli_faults", tests, NULL, NULL);
}
