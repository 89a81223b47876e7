/* One llama-2-7b-shaped decoder layer (from mxq synth, BF16) through the
 * recipes RTN, GPTQ, AWQ+GPTQ and SQ+GPTQ (W4A8 MXINT, block 128), phase by
 * phase, against the FLOP floor measured in the same run.
 *
 *   bench_layer [--tokens 4096] [--seq-len 512] [--repeats 3] [--threads 1]
 *               [--recipes DIR] [--only NAME-PART] [--model DIR] [--keep-model]
 *               [--verbose]
 *
 * Phases: load (the layer from safetensors, converted to float32),
 * calibration forward, statistics (Gram products and |x| sums), scale
 * search (AWQ / SmoothQuant, with folding), clip (AWQ), GPTQ (or RTN),
 * pack + write (MX packing, the bytes written and fsync'ed), and the
 * report's losses. Each phase's FLOPs are shown with their time at the
 * sgemm peak, measured in the same run. The floor is the issue's:
 *   (forward + Gram flops) / sgemm peak + GPTQ flops / dgemm peak
 * with GPTQ flops those of mxq's algorithm: n^3/3 + m n^2 + m n b2 per
 * linear. Medians over the runs; total / floor is the figure of merit. */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench_util.h"
#include "mxq/mxq.h"
#include "mxq/synth.h"

void openblas_set_num_threads(int);

enum { PH_LOAD, PH_FORWARD, PH_STATS, PH_SCALES, PH_CLIP, PH_GPTQ, PH_PACK, PH_LOSS, PH_COUNT };
static const char *phase_names[PH_COUNT] = {"load",  "forward", "statistics", "scale search",
                                            "clip",  "gptq",    "pack+write", "report losses"};

typedef struct {
    int tokens, seq_len, repeats, threads;
    const char *recipes_dir, *model_dir, *only;
    char scratch[512];   /* mkdtemp directory of this run: the output file, the synthesized model */
    char tmp_model[600]; /* <scratch>/model when synthesized */
    double speak, dpeak;
    int floor_only; /* --floor-only: the whole model's floor, no runs */
} bench_opts;

typedef struct {
    mxq_layer_stats *stats;
    double seconds;
} observer_state;

static mxq_status observe(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                          int features)
{
    (void)layer;
    (void)features;
    observer_state *o = user;
    double t0 = mxq_time_now();
    mxq_status st = mxq_input_stats_add(ctx, &o->stats->input[input], x, tokens);
    o->seconds += mxq_time_now() - t0;
    return st;
}

/* Random token ids, the same every run. */
static int32_t *make_tokens(int n, int vocab)
{
    int32_t *ids = malloc((size_t)n * sizeof(int32_t));
    uint64_t s = 0x2545F4914F6CDD1Dull;
    for (int i = 0; ids && i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ids[i] = (int32_t)(1 + s % (uint64_t)(vocab - 1));
    }
    return ids;
}

/* Calibration forward with the statistics observer: t[PH_FORWARD], t[PH_STATS]. */
static mxq_status calibrate(mxq_ctx *ctx, const bench_opts *o, const mxq_model *m, mxq_layer_stats *stats, double *t)
{
    mxq_status status = MXQ_OK;
    const int S = o->seq_len, n_seqs = o->tokens / o->seq_len, batch = n_seqs < 8 ? n_seqs : 8;
    int32_t *ids = make_tokens(n_seqs * S, m->cfg.vocab);
    float *x = malloc((size_t)batch * S * m->cfg.hidden * sizeof(float));
    mxq_workspace *ws = NULL;
    observer_state os = {stats, 0.0};
    mxq_observer obs = {observe, &os};
    if (!ids || !x) {
        fprintf(stderr, "bench_layer: out of memory for the calibration batch\n");
        status = MXQ_ERR_NOMEM;
        goto fail;
    }
    if ((status = mxq_workspace_create(ctx, &m->cfg, batch, S, &ws)) != MXQ_OK)
        goto fail;
    double t0 = mxq_time_now();
    for (int s0 = 0; s0 < n_seqs && status == MXQ_OK; s0 += batch) {
        int n = n_seqs - s0 < batch ? n_seqs - s0 : batch;
        status = mxq_model_embed(ctx, m, ids + (size_t)s0 * S, n, S, x);
        if (status == MXQ_OK)
            status = mxq_model_run_layers_observed(ctx, m, 0, 1, x, n, S, NULL, &obs, ws);
    }
    double t1 = mxq_time_now();
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        mxq_input_stats_finish(&stats->input[i]);
    t[PH_STATS] += os.seconds + (mxq_time_now() - t1);
    t[PH_FORWARD] += (t1 - t0) - os.seconds;
fail:
    mxq_workspace_free(ws);
    free(ids);
    free(x);
    return status;
}

/* The packed weights and scales, written and fsync'ed: t[PH_PACK]. */
static int write_packed(const bench_opts *o, const mxq_recipe *r, const mxq_model_config *cfg,
                        const mxq_layer_result *res, double *t)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/out.bin", o->scratch);
    double t0 = mxq_time_now();
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644), ok = fd >= 0;
    for (int li = 0; ok && li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        size_t pb = (size_t)out * mxq_mx_packed_row_bytes(r->weights.format, (size_t)in);
        size_t sb = (size_t)out * mxq_mx_blocks_per_row((size_t)in, r->weights.block);
        if (res->linear[li].quantized)
            ok = write(fd, res->linear[li].packed, pb) == (ssize_t)pb &&
                 write(fd, res->linear[li].scales, sb) == (ssize_t)sb;
    }
    ok = ok && fsync(fd) == 0;
    if (fd >= 0)
        close(fd);
    unlink(path);
    t[PH_PACK] += mxq_time_now() - t0;
    return ok ? 0 : -1;
}

/* FLOPs per phase for one run of recipe r on cfg with T tokens. */
static void phase_flops(const mxq_model_config *cfg, const mxq_recipe *r, const bench_opts *o, double *f)
{
    const double T = o->tokens, S = o->seq_len, d = cfg->hidden;
    const mxq_algo_step *awq = NULL, *gptq = NULL;
    for (int k = 0; k < r->n_steps; k++) {
        awq = r->steps[k].kind == MXQ_ALGO_AWQ ? &r->steps[k] : awq;
        gptq = r->steps[k].kind == MXQ_ALGO_GPTQ ? &r->steps[k] : gptq;
    }
    memset(f, 0, PH_COUNT * sizeof(double));
    f[PH_FORWARD] = 2.0 * d * (S + 1.0) * T; /* causal attention: QK^T and PV */
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        double feat = mxq_input_features(cfg, (mxq_input_id)i);
        f[PH_STATS] += feat * (feat + 1.0) * T;
    }
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        double m = out, n = in, B = r->weights.block;
        f[PH_FORWARD] += 2.0 * m * n * T;
        /* RTN and final loss, ssymm each, on every (out / 256)-th row from 512 rows up */
        double loss_rows = out < 512 ? m : floor(m / floor(m / 256.0));
        f[PH_LOSS] += 4.0 * loss_rows * n * n;
        if (gptq)
            f[PH_GPTQ] += n * n * n / 3.0 + m * n * n + m * n * gptq->gptq.microblock;
        if (awq && awq->awq.clip && li != MXQ_LIN_Q && li != MXQ_LIN_K)
            f[PH_CLIP] += (int)(awq->awq.max_shrink * awq->awq.clip_grid + 1e-9) * 2.0 * m * n * B;
        if (awq) {
            int sr = awq->awq.sample_rows;
            double rows = sr <= 0 || out < 2 * sr ? m : floor(m / floor(m / sr));
            f[PH_SCALES] += awq->awq.grid * 2.0 * rows * n * n;
        }
    }
}

/* One run of one recipe; phase seconds added to t. */
static int run_once(mxq_ctx *ctx, const bench_opts *o, const mxq_recipe *r, double *t)
{
    mxq_model_config cfg;
    mxq_model *m = NULL;
    mxq_layer_stats stats = {0};
    mxq_layer_result res = {0};
    int rc = -1;
    double t0 = mxq_time_now();
    mxq_model_part part = {0, 1, 1, 0};
    if (mxq_config_load(ctx, o->model_dir, &cfg) != MXQ_OK || mxq_model_load(ctx, o->model_dir, &cfg, &part, &m) != MXQ_OK)
        goto fail;
    t[PH_LOAD] += mxq_time_now() - t0;
    if (mxq_layer_stats_init(ctx, &cfg, &stats) != MXQ_OK || calibrate(ctx, o, m, &stats, t) != MXQ_OK ||
        mxq_quantize_layer(ctx, r, &cfg, 0, &m->layers[0], &stats, &res) != MXQ_OK)
        goto fail;
    t[PH_SCALES] += res.seconds_scales;
    t[PH_CLIP] += res.seconds_clip;
    t[PH_GPTQ] += res.seconds_gptq;
    t[PH_PACK] += res.seconds_pack;
    t[PH_LOSS] += res.seconds_loss;
    if (write_packed(o, r, &cfg, &res, t) != 0) {
        fprintf(stderr, "bench_layer: cannot write the packed weights under %s\n", o->scratch);
        goto fail;
    }
    rc = 0;
fail:
    if (rc != 0 && mxq_error_code(ctx) != MXQ_OK)
        mxq_error_print(ctx, stderr, "bench_layer");
    mxq_layer_result_free(&res);
    mxq_layer_stats_free(&stats);
    mxq_model_free(m);
    return rc;
}

static void print_recipe(const char *name, const bench_opts *o, double runs[][PH_COUNT], const double *flops)
{
    double med[PH_COUNT], total = 0, totals[32];
    for (int r = 0; r < o->repeats; r++) {
        totals[r] = 0;
        for (int p = 0; p < PH_COUNT; p++)
            totals[r] += runs[r][p];
    }
    printf("\n## %s\n\n| phase | median s | GFLOP | at peak s | x peak |\n|---|---:|---:|---:|---:|\n", name);
    for (int p = 0; p < PH_COUNT; p++) {
        double v[32];
        for (int r = 0; r < o->repeats; r++)
            v[r] = runs[r][p];
        med[p] = bench_median(v, o->repeats);
        total += med[p];
        double peak_t = flops[p] / 1e9 / o->speak;
        if (flops[p] > 0)
            printf("| %s | %.2f | %.0f | %.2f | %.2f |\n", phase_names[p], med[p], flops[p] / 1e9, peak_t,
                   med[p] / peak_t);
        else
            printf("| %s | %.2f | | | |\n", phase_names[p], med[p]);
    }
    double floor_s = (flops[PH_FORWARD] + flops[PH_STATS]) / 1e9 / o->speak + flops[PH_GPTQ] / 1e9 / o->dpeak;
    double tmed = bench_median(totals, o->repeats);
    printf("\ntotal %.2f s (median of run totals %.2f s); floor %.2f s; **total / floor = %.2f**; "
           "scale search + clip = %.2f s vs GPTQ %.2f s\n",
           total, tmed, floor_s, tmed / floor_s, med[PH_SCALES] + med[PH_CLIP], med[PH_GPTQ]);
    fflush(stdout);
}

/* The floor of every layer of the model, one layer's flops times the
 * layer count (the embedding and the write are not counted). */
static void print_model_floor(const char *name, const bench_opts *o, const mxq_model_config *cfg, const double *flops)
{
    const double sgemm_flops = flops[PH_FORWARD] + flops[PH_STATS];
    const double layer_floor = sgemm_flops / 1e9 / o->speak + flops[PH_GPTQ] / 1e9 / o->dpeak;
    printf("floor %s: %d layers x %.2f s = %.1f s (per layer: forward + statistics %.0f GFLOP at sgemm %.1f GFLOP/s, "
           "GPTQ %.0f GFLOP at dgemm %.1f GFLOP/s)\n",
           name, cfg->n_layers, layer_floor, cfg->n_layers * layer_floor, sgemm_flops / 1e9, o->speak,
           flops[PH_GPTQ] / 1e9, o->dpeak);
    fflush(stdout);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: bench_layer [--tokens 4096] [--seq-len 512] [--repeats 3] [--threads 1]\n"
               "                   [--recipes configs/recipes] [--only NAME-PART] [--model DIR]\n"
               "                   [--keep-model] [--verbose] [--floor-only]\n"
               "Without --model, synthesizes a one-layer llama-2-7b (BF16, ~0.9 GB) in a fresh directory\n"
               "under $TMPDIR (default /tmp), removed at the end unless --keep-model.\n"
               "--floor-only (with --model): no runs; the floor of all the model's layers at the peaks\n"
               "of --threads threads, for timing a whole `mxq quantize` run (bench/bench_7b.sh).\n");
}

static int parse_args(int argc, char **argv, bench_opts *o)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--keep-model") == 0 || strcmp(a, "--verbose") == 0)
            continue;
        if (strcmp(a, "--floor-only") == 0) {
            o->floor_only = 1;
            continue;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 1;
        }
        if (strncmp(a, "--", 2) != 0 || !v) {
            fprintf(stderr, "bench_layer: %s\n", v ? "options start with --" : "an option needs a value");
            usage(stderr);
            return -1;
        }
        i++;
        if (strcmp(a, "--tokens") == 0)
            o->tokens = atoi(v);
        else if (strcmp(a, "--seq-len") == 0)
            o->seq_len = atoi(v);
        else if (strcmp(a, "--repeats") == 0)
            o->repeats = atoi(v);
        else if (strcmp(a, "--threads") == 0)
            o->threads = atoi(v);
        else if (strcmp(a, "--recipes") == 0)
            o->recipes_dir = v;
        else if (strcmp(a, "--model") == 0)
            o->model_dir = v;
        else if (strcmp(a, "--only") == 0)
            o->only = v;
        else {
            fprintf(stderr, "bench_layer: unknown option '%s'\n", a);
            usage(stderr);
            return -1;
        }
    }
    if (o->floor_only && !o->model_dir) {
        fprintf(stderr, "bench_layer: --floor-only needs --model DIR (the model whose floor to compute)\n");
        return -1;
    }
    if (o->seq_len < 1 || o->tokens < o->seq_len || o->repeats < 1 || o->repeats > 32 || o->threads < 1) {
        fprintf(stderr, "bench_layer: need --seq-len >= 1, --tokens >= --seq-len, --repeats 1..32, --threads >= 1\n");
        return -1;
    }
    return 0;
}

/* This run's scratch directory, fresh under $TMPDIR (mkdtemp: nobody
 * else's files are ever in it). */
static int make_scratch(bench_opts *o)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(o->scratch, sizeof(o->scratch), "%s/mxq-bench-layer-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(o->scratch)) {
        fprintf(stderr, "bench_layer: cannot create a scratch directory '%s': %s\n", o->scratch, strerror(errno));
        o->scratch[0] = '\0';
        return -1;
    }
    return 0;
}

/* A one-layer llama-2-7b in BF16, in <scratch>/model. */
static int make_model(mxq_ctx *ctx, bench_opts *o)
{
    snprintf(o->tmp_model, sizeof(o->tmp_model), "%s/model", o->scratch);
    mxq_synth_options so = {mxq_synth_preset_by_name("llama-2-7b"), 1, MXQ_DT_BF16, 0, 7, 1};
    if (mxq_synth_write(ctx, &so, o->tmp_model) != MXQ_OK) {
        mxq_error_print(ctx, stderr, "bench_layer");
        return -1;
    }
    o->model_dir = o->tmp_model;
    return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* The scratch directory and everything in it (no symlink is followed). */
static int remove_scratch(const bench_opts *o)
{
    if (!o->scratch[0])
        return 0;
    if (nftw(o->scratch, remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0) {
        fprintf(stderr, "bench_layer: could not remove %s: %s\n", o->scratch, strerror(errno));
        return -1;
    }
    return 0;
}

static int bench_recipe(mxq_ctx *ctx, const bench_opts *o, const char *file)
{
    char path[512];
    mxq_recipe r;
    mxq_model_config cfg;
    double runs[32][PH_COUNT], flops[PH_COUNT];
    snprintf(path, sizeof(path), "%s/%s", o->recipes_dir, file);
    if (mxq_recipe_load(ctx, path, &r) != MXQ_OK || mxq_config_load(ctx, o->model_dir, &cfg) != MXQ_OK) {
        mxq_error_print(ctx, stderr, "bench_layer");
        return -1;
    }
    memset(runs, 0, sizeof(runs));
    int rc = 0;
    for (int k = 0; k < o->repeats && rc == 0 && !o->floor_only; k++)
        rc = run_once(ctx, o, &r, runs[k]);
    phase_flops(&cfg, &r, o, flops);
    if (rc == 0 && o->floor_only)
        print_model_floor(file, o, &cfg, flops);
    else if (rc == 0)
        print_recipe(file, o, runs, flops);
    mxq_recipe_free(&r);
    return rc;
}

static const char *const all_recipes[] = {"w4a8-mxint-rtn.yaml", "w4a8-mxint-gptq.yaml",
                                           "w4a8-mxint-awq-gptq.yaml", "w4a8-mxint-sq-gptq.yaml"};
enum { N_RECIPES = sizeof(all_recipes) / sizeof(*all_recipes) };

/* Before anything costly: the selected recipes parse, and a given model
 * has a config. */
static int check_inputs(mxq_ctx *ctx, const bench_opts *o)
{
    int selected = 0;
    for (int k = 0; k < N_RECIPES; k++) {
        if (o->only && !strstr(all_recipes[k], o->only))
            continue;
        char path[512];
        mxq_recipe r;
        snprintf(path, sizeof(path), "%s/%s", o->recipes_dir, all_recipes[k]);
        if (mxq_recipe_load(ctx, path, &r) != MXQ_OK) {
            mxq_error_print(ctx, stderr, "bench_layer");
            return -1;
        }
        mxq_recipe_free(&r);
        selected++;
    }
    if (!selected) {
        fprintf(stderr, "bench_layer: --only '%s' matches none of the recipes (rtn, gptq, awq-gptq, sq-gptq)\n",
                o->only);
        return -1;
    }
    mxq_model_config cfg;
    if (o->model_dir && mxq_config_load(ctx, o->model_dir, &cfg) != MXQ_OK) {
        mxq_error_print(ctx, stderr, "bench_layer");
        return -1;
    }
    return 0;
}

static int run_all(mxq_ctx *ctx, bench_opts *o)
{
    int rc = 0;
    o->dpeak = bench_gemm_peak(1, 3);
    o->speak = bench_gemm_peak(0, 3);
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    o->tokens = o->tokens / o->seq_len * o->seq_len;
    printf("# bench_layer: layer 0 of %s%s, %d calibration tokens (%d x %d), %d thread%s, medians of %d runs\n",
           o->model_dir, o->tmp_model[0] ? " (synthesized llama-2-7b, BF16)" : "", o->tokens, o->tokens / o->seq_len,
           o->seq_len, o->threads, o->threads == 1 ? "" : "s", o->repeats);
    printf("# env: OPENBLAS_CORETYPE=%s; measured peak: sgemm %.1f GFLOP/s, dgemm %.1f GFLOP/s\n",
           coretype ? coretype : "(unset)", o->speak, o->dpeak);
    for (int k = 0; k < N_RECIPES && rc == 0; k++)
        if (!o->only || strstr(all_recipes[k], o->only))
            rc = bench_recipe(ctx, o, all_recipes[k]);
    return rc;
}

int main(int argc, char **argv)
{
    mxq_keep_freed_memory(); /* as the mxq CLI does */
    bench_opts o = {4096, 512, 3, 1, "configs/recipes", NULL, NULL, "", "", 0, 0, 0};
    int keep = 0, verbose = 0, rc = 0;
    for (int i = 1; i < argc; i++) {
        keep |= strcmp(argv[i], "--keep-model") == 0;
        verbose |= strcmp(argv[i], "--verbose") == 0;
    }
    int parsed = parse_args(argc, argv, &o);
    if (parsed != 0)
        return parsed > 0 ? 0 : 2; /* 1: --help */
    openblas_set_num_threads(o.threads);
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    if (verbose)
        mxq_ctx_set_log_level(ctx, MXQ_LOG_DEBUG);
    rc = check_inputs(ctx, &o) != 0 || make_scratch(&o) != 0 || (!o.model_dir && make_model(ctx, &o) != 0);
    if (!rc)
        rc = run_all(ctx, &o) != 0;
    if (keep && o.tmp_model[0] && !rc) {
        printf("# model kept in %s (remove the directory %s when done)\n", o.tmp_model, o.scratch);
        char out[600];
        snprintf(out, sizeof(out), "%s/out.bin", o.scratch);
        unlink(out);
    } else if (remove_scratch(&o) != 0) {
        rc = 1;
    }
    mxq_ctx_destroy(ctx);
    return rc ? 1 : 0;
}
