/* Calibration and quantization of this rank's layers, in memory.
 *
 * fp mode: the FP model runs over the calibration set as a pipeline (the
 * same one evaluation uses); each rank accumulates the statistics of its own
 * layers' linear inputs as micro-batches pass, then all ranks quantize their
 * layers at the same time.
 *
 * sequential mode: each layer is calibrated on the outputs of the already
 * quantized layers before it (weights and activations quantized as at run
 * time). A rank takes the whole calibration set from its upstream, then per
 * layer: statistics -> quantize -> forward the quantized layer; then sends
 * the whole set downstream. The ranks work one after the other; that is the
 * price of the mode, and it holds n_samples * seq_len * hidden floats. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/jobs_internal.h"
#include "model/lazy.h"
#include "jobs/quantize_report.h"
#include "parallel/pipeline.h"

typedef struct {
    const mxq_model *model;
    const mxq_tokens *tokens;
    mxq_workspace *ws;
    mxq_layer_stats *stats; /* the layers being calibrated */
    int stats_first;        /* absolute index of stats[0] */
    int stats_count;
    const mxq_layer_hooks *hooks; /* layers done before have no statistics */
} calib_state;

static mxq_status observe(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                          int features)
{
    calib_state *c = user;
    if (layer < c->stats_first || layer >= c->stats_first + c->stats_count || mxq_layer_done(c->hooks, layer))
        return MXQ_OK;
    return mxq_input_stats_add(ctx, &c->stats[layer - c->stats_first].input[input], x, tokens);
}

static mxq_status calib_stage(mxq_ctx *ctx, void *user, int mb, int first_seq, int n, float *buf)
{
    mxq_status status = MXQ_OK;
    calib_state *c = user;
    const mxq_model *m = c->model;
    const int S = c->tokens->seq_len;
    mxq_observer obs = {observe, c};
    if (m->has_embedding)
        CALL(ctx, mxq_model_embed(ctx, m, c->tokens->ids + (size_t)first_seq * S, n, S, buf));
    CALL(ctx, mxq_model_run_layers_observed(ctx, m, m->first_layer, m->last_layer, buf, n, S, NULL, &obs, c->ws));
fail:
    return status;
}

static void log_layer(mxq_ctx *ctx, const mxq_model *m, const mxq_layer_result *r)
{
    mxq_layer_record rec;
    mxq_layer_record_of(r, 0, &rec);
    mxq_layer_record_log(ctx, m->cfg.n_layers, &rec);
}

/* Quantize layer `layer` in place, or `target` (a copy of it) when given. */
static mxq_status finish_and_quantize(mxq_ctx *ctx, const mxq_recipe *recipe, mxq_model *model, int layer,
                                      mxq_layer_stats *stats, mxq_layer_result *res, mxq_layer *target)
{
    mxq_status status = MXQ_OK;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        mxq_input_stats_finish(&stats->input[i]);
    CALL(ctx, mxq_quantize_layer(ctx, recipe, &model->cfg, layer,
                                 target ? target : &model->layers[layer - model->first_layer], stats, res));
    log_layer(ctx, model, res);
fail:
    return status;
}

static void free_floats(float **p)
{
    free(*p);
    *p = NULL;
}

mxq_status mxq_layer_keep_written(mxq_ctx *ctx, mxq_model *model, int layer, const mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    if (!model->ckpt)
        return MXQ_OK;
    mxq_layer *L = &model->layers[layer - model->first_layer];
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        if (res->linear[li].quantized || !res->linear[li].weight_modified)
            free_floats(&L->weight[li]);
        if (!res->linear[li].bias_modified)
            free_floats(&L->bias[li]);
    }
    if (!res->attn_norm_modified)
        free_floats(&L->attn_norm);
    if (!res->ffn_norm_modified)
        free_floats(&L->ffn_norm);
    CALL(ctx, mxq_model_layer_release_pages(ctx, model, layer));
fail:
    return status;
}

/* ---- quantized copies of layers (windowed fp mode) ------------------------ */

/* A layer's tensors as they were before quantization are kept while a
 * copy is quantized (windowed fp mode: later passes must still see FP
 * layers); copies are freed with mxq_layer_free_tensors. */

static float *copy_floats(const float *src, size_t n)
{
    if (!src)
        return NULL;
    float *dst = malloc(n * sizeof(float));
    if (dst)
        memcpy(dst, src, n * sizeof(float));
    return dst;
}

static mxq_status layer_copy(mxq_ctx *ctx, const mxq_model_config *cfg, const mxq_layer *src, mxq_layer *dst)
{
    mxq_status status = MXQ_OK;
    memset(dst, 0, sizeof(*dst));
    dst->attn_norm = copy_floats(src->attn_norm, (size_t)cfg->hidden);
    dst->ffn_norm = copy_floats(src->ffn_norm, (size_t)cfg->hidden);
    int ok = dst->attn_norm && dst->ffn_norm;
    for (int li = 0; li < MXQ_LIN_COUNT && ok; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        dst->weight[li] = copy_floats(src->weight[li], (size_t)out * in);
        dst->bias[li] = copy_floats(src->bias[li], (size_t)out);
        ok = dst->weight[li] && (dst->bias[li] || !src->bias[li]);
    }
    CHECK(ctx, ok, MXQ_ERR_NOMEM, "out of memory copying a layer for windowed calibration");
    return MXQ_OK;
fail:
    mxq_layer_free_tensors(dst);
    return status;
}

/* Keep of a quantized copy only what is not in its result: weights of
 * quantized linears are rebuilt from packed + scales at the end. */
static void layer_shrink(mxq_layer *q, const mxq_layer_result *res)
{
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        if (res->linear[li].quantized) {
            free(q->weight[li]);
            q->weight[li] = NULL;
        }
}

static void swap_floats(float **a, float **b)
{
    float *t = *a;
    *a = *b;
    *b = t;
}

/* Put a quantized layer in place of the FP one. */
static mxq_status layer_install(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, mxq_layer *L,
                                mxq_layer *q, const mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        if (res->linear[li].quantized)
            CALL(ctx, mxq_mx_dequantize_rows(ctx, &recipe->weights, res->linear[li].packed, res->linear[li].scales,
                                             (size_t)out, (size_t)in, L->weight[li]));
        else
            swap_floats(&L->weight[li], &q->weight[li]);
        swap_floats(&L->bias[li], &q->bias[li]);
    }
    swap_floats(&L->attn_norm, &q->attn_norm);
    swap_floats(&L->ffn_norm, &q->ffn_norm);
fail:
    mxq_layer_free_tensors(q);
    return status;
}

/* ---- fp mode ------------------------------------------------------------------ */

/* One rank's fp-mode calibration: pipelined passes of the FP model over the
 * calibration set. With a window of W layers, pass k collects the
 * statistics of each rank's k-th window of W layers and quantizes copies,
 * so a rank never holds more than W layers' Hessians and later passes still
 * run the FP model; the statistics, hence the bytes written, are those of
 * one pass. */
typedef struct {
    calib_state c;
    mxq_pipeline p;
    mxq_layer *held; /* [n_local] quantized copies (windowed mode) */
    int n_local, window, passes;
} fp_run;

static void fp_run_free(fp_run *run)
{
    for (int i = 0; run->c.stats && i < run->window; i++)
        mxq_layer_stats_free(&run->c.stats[i]);
    for (int i = 0; run->held && i < run->n_local; i++)
        mxq_layer_free_tensors(&run->held[i]);
    free(run->held);
    free(run->c.stats);
    free(run->p.buf[0]);
    free(run->p.buf[1]);
    mxq_workspace_free(run->c.ws);
}

static mxq_status start_pass(mxq_ctx *ctx, mxq_model *model, fp_run *run, int pass);

/* This rank's buffers and the first pass's statistics (agreed by the
 * caller). */
static mxq_status fp_setup(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens, int batch,
                           fp_run *run)
{
    mxq_status status = MXQ_OK;
    size_t buf_floats = (size_t)batch * tokens->seq_len * model->cfg.hidden;
    run->c.stats = calloc((size_t)run->window, sizeof(mxq_layer_stats));
    run->held = calloc((size_t)run->n_local + 1, sizeof(mxq_layer));
    CHECK_ALLOC(ctx, run->c.stats && run->held, (size_t)run->window * sizeof(mxq_layer_stats),
                "the layer statistics table");
    CALL(ctx, mxq_workspace_create(ctx, &model->cfg, batch, tokens->seq_len, &run->c.ws));
    run->p.buf[0] = malloc(buf_floats * sizeof(float));
    run->p.buf[1] = malloc(buf_floats * sizeof(float));
    CHECK_ALLOC(ctx, run->p.buf[0] && run->p.buf[1], 2 * buf_floats * sizeof(float), "the pipeline buffers");
    run->p = (mxq_pipeline){dist,  tokens->n_seqs, tokens->seq_len, model->cfg.hidden, batch,
                            (tokens->n_seqs + batch - 1) / batch, "calibration", "calibrate.pipeline.midway",
                            calib_stage, &run->c, {run->p.buf[0], run->p.buf[1]}};
    CALL(ctx, start_pass(ctx, model, run, 0));
fail:
    return status;
}

/* Pass `pass` covers local layers [lo, hi) of each rank. */
static void pass_window(const fp_run *run, int pass, int *lo, int *hi)
{
    *lo = pass * run->window;
    *hi = *lo + run->window < run->n_local ? *lo + run->window : run->n_local;
    if (*hi < *lo)
        *hi = *lo;
}

/* Statistics of the layers pass `pass` calibrates (none past the last). */
static mxq_status start_pass(mxq_ctx *ctx, mxq_model *model, fp_run *run, int pass)
{
    mxq_status status = MXQ_OK;
    int lo, hi;
    if (pass >= run->passes)
        return MXQ_OK;
    pass_window(run, pass, &lo, &hi);
    run->c.stats_first = model->first_layer + lo;
    run->c.stats_count = hi - lo;
    for (int i = 0; i < run->c.stats_count; i++)
        if (!mxq_layer_done(run->c.hooks, run->c.stats_first + i))
            CALL(ctx, mxq_layer_stats_init(ctx, &model->cfg, &run->c.stats[i]));
fail:
    return status;
}

/* After pass `pass`: quantize its layers from the statistics just
 * collected, then prepare the next pass, or after the last one put the
 * quantized copies in place (windowed mode). Local to this rank. */
static mxq_status finish_pass(mxq_ctx *ctx, const mxq_recipe *recipe, mxq_model *model, fp_run *run, int pass,
                              double calib_seconds, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    int lo, hi;
    pass_window(run, pass, &lo, &hi);
    for (int i = lo; i < hi; i++) {
        mxq_layer_result *res = &results[i];
        mxq_layer_stats *stats = &run->c.stats[i - lo];
        const int layer = model->first_layer + i;
        res->seconds_calib = calib_seconds / (hi - lo);
        if (mxq_layer_done(run->c.hooks, layer)) {
            res->layer = -1; /* the job takes it from the earlier run's record */
        } else if (run->passes == 1) {
            CALL(ctx, finish_and_quantize(ctx, recipe, model, layer, stats, res, NULL));
            CALL(ctx, mxq_layer_hook_record(ctx, run->c.hooks, layer, &model->layers[i], res));
        } else {
            CALL(ctx, layer_copy(ctx, &model->cfg, &model->layers[i], &run->held[i]));
            CALL(ctx, finish_and_quantize(ctx, recipe, model, layer, stats, res, &run->held[i]));
            layer_shrink(&run->held[i], res);
            CALL(ctx, mxq_layer_hook_record(ctx, run->c.hooks, layer, &run->held[i], res));
        }
        mxq_layer_stats_free(stats);
    }
    CALL(ctx, start_pass(ctx, model, run, pass + 1));
    for (int i = 0; pass + 1 == run->passes && run->passes > 1 && i < run->n_local; i++)
        if (!mxq_layer_done(run->c.hooks, model->first_layer + i))
            CALL(ctx, layer_install(ctx, recipe, &model->cfg, &model->layers[i], &run->held[i], &results[i]));
fail:
    return status;
}

static mxq_status calibrate_fp(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                               const mxq_recipe *recipe, int batch, int stats_layers, const mxq_layer_hooks *hooks,
                               mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    fp_run run = {.n_local = model->last_layer - model->first_layer};
    run.c = (calib_state){model, tokens, NULL, NULL, model->first_layer, 0, hooks};
    int max_local = run.n_local;
    CALL_MPI(ctx, dist->comm, MPI_Allreduce(&run.n_local, &max_local, 1, MPI_INT, MPI_MAX, dist->comm));
    run.window = stats_layers > 0 && stats_layers < max_local ? stats_layers : max_local;
    run.passes = (max_local + run.window - 1) / run.window;
    AGREE(ctx, dist, "calibrate.setup", fp_setup(ctx, dist, model, tokens, batch, &run));
    if (run.passes > 1 && dist->rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "calibration: %d passes, statistics of at most %d layer%s per rank at a time",
                run.passes, run.window, run.window == 1 ? "" : "s");
    for (int pass = 0; pass < run.passes; pass++) {
        double t0 = mxq_time_now();
        AGREE(ctx, dist, "calibrate.pipeline", mxq_pipeline_run(ctx, &run.p));
        AGREE(ctx, dist, "calibrate.quantize",
              finish_pass(ctx, recipe, model, &run, pass, mxq_time_now() - t0, results));
    }
fail:
    fp_run_free(&run);
    return status;
}

/* ---- sequential mode -------------------------------------------------------- */

typedef struct {
    const mxq_dist *dist;
    mxq_model *model;
    const mxq_tokens *tokens;
    const mxq_recipe *recipe;
    int batch, n_micro;
    size_t mb_floats;  /* floats of one full micro-batch */
    float *store, *tmp; /* [n_micro * mb_floats], [mb_floats] */
    mxq_workspace *ws;
    int upstream_aborted;
} seq_run;

static int seq_count(const seq_run *s, int mb)
{
    return mxq_micro_batch_seqs(s->tokens->n_seqs, s->batch, mb) * s->tokens->seq_len * s->model->cfg.hidden;
}

/* After a failed receive: take what upstream still sends (up to its ABORT),
 * so that it is not left blocked in MPI_Send. */
static void drain_upstream(seq_run *s, int from)
{
    for (int mb = from; mb < s->n_micro; mb++) {
        MPI_Status st;
        if (MPI_Recv(s->tmp, seq_count(s, mb), MPI_FLOAT, s->dist->rank - 1, MPI_ANY_TAG, s->dist->comm, &st) !=
                MPI_SUCCESS ||
            st.MPI_TAG == MXQ_TAG_ABORT)
            break;
    }
}

/* The calibration activations: embedded here (rank 0) or from upstream. */
static mxq_status seq_take_input(mxq_ctx *ctx, seq_run *s)
{
    mxq_status status = MXQ_OK;
    const int S = s->tokens->seq_len;
    int received = 0; /* messages taken from upstream */
    for (int mb = 0; mb < s->n_micro; mb++) {
        int n = mxq_micro_batch_seqs(s->tokens->n_seqs, s->batch, mb);
        float *x = s->store + (size_t)mb * s->mb_floats;
        if (s->model->has_embedding) {
            CALL(ctx, mxq_model_embed(ctx, s->model, s->tokens->ids + (size_t)mb * s->batch * S, n, S, x));
            continue;
        }
        if (mb == s->n_micro / 2)
            CALL(ctx, mxq_fault_point(ctx, "sequential.receive.midway"));
        MPI_Status st;
        int rc = MPI_Recv(x, seq_count(s, mb), MPI_FLOAT, s->dist->rank - 1, MPI_ANY_TAG, s->dist->comm, &st);
        received++; /* consumed, even if it failed (a truncated message is) */
        CALL_MPI(ctx, s->dist->comm, rc);
        s->upstream_aborted = st.MPI_TAG == MXQ_TAG_ABORT;
        CHECK(ctx, !s->upstream_aborted, MXQ_ERR_REMOTE, "stopped because an upstream rank failed");
    }
    /* quantization never runs the head: a lazily loaded embedding (7B: 524
     * MB in float32) goes once the set is embedded */
    if (s->model->has_embedding && s->model->ckpt)
        CALL(ctx, mxq_model_unload_embedding(ctx, s->model));
    return MXQ_OK;
fail:
    if (!s->upstream_aborted && !s->model->has_embedding)
        drain_upstream(s, received);
    return status;
}

/* Per layer: statistics on the current activations, quantize, then run the
 * quantized layer (activations quantized as at run time) on them. */
static mxq_status seq_layers(mxq_ctx *ctx, seq_run *s, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    mxq_model *model = s->model;
    const int S = s->tokens->seq_len, n_seqs = s->tokens->n_seqs;
    mxq_layer_stats stats = {0};
    calib_state c = {model, s->tokens, s->ws, &stats, 0, 1, NULL};
    mxq_observer obs = {observe, &c};
    mxq_fake_quant fq = {0};
    fq.enabled_acts = s->recipe->has_acts;
    if (s->recipe->has_acts)
        fq.acts = s->recipe->acts;
    for (int l = model->first_layer; l < model->last_layer; l++) {
        mxq_layer_result *res = &results[l - model->first_layer];
        double t0 = mxq_time_now();
        CALL(ctx, mxq_fault_point(ctx, "sequential.layer"));
        if (model->ckpt)
            CALL(ctx, mxq_model_layer_load(ctx, model, l));
        /* allocated once: a layer's statistics (1.3 GB for 7B) allocated
         * and freed per layer fragment the heap, whose peak then grows */
        if (!stats.input[0].hessian)
            CALL(ctx, mxq_layer_stats_init(ctx, &model->cfg, &stats));
        mxq_layer_stats_zero(&stats);
        c.stats_first = l;
        for (int mb = 0; mb < s->n_micro; mb++) {
            int n = mxq_micro_batch_seqs(n_seqs, s->batch, mb);
            memcpy(s->tmp, s->store + (size_t)mb * s->mb_floats, (size_t)seq_count(s, mb) * sizeof(float));
            CALL(ctx, mxq_model_run_layers_observed(ctx, model, l, l + 1, s->tmp, n, S, NULL, &obs, s->ws));
        }
        double t1 = mxq_time_now();
        CALL(ctx, finish_and_quantize(ctx, s->recipe, model, l, &stats, res, NULL));
        double t2 = mxq_time_now();
        for (int mb = 0; mb < s->n_micro; mb++)
            CALL(ctx, mxq_model_run_layers(ctx, model, l, l + 1, s->store + (size_t)mb * s->mb_floats,
                                           mxq_micro_batch_seqs(n_seqs, s->batch, mb), S, &fq, s->ws));
        res->seconds_calib = (t1 - t0) + (mxq_time_now() - t2);
        CALL(ctx, mxq_layer_keep_written(ctx, model, l, res));
    }
fail:
    mxq_layer_stats_free(&stats);
    return status;
}

static mxq_status seq_send_output(mxq_ctx *ctx, seq_run *s)
{
    mxq_status status = MXQ_OK;
    for (int mb = 0; s->dist->rank + 1 < s->dist->size && mb < s->n_micro; mb++) {
        if (mb == s->n_micro / 2)
            CALL(ctx, mxq_fault_point(ctx, "sequential.send.midway"));
        CALL_MPI(ctx, s->dist->comm, MPI_Send(s->store + (size_t)mb * s->mb_floats, seq_count(s, mb), MPI_FLOAT, s->dist->rank + 1,
                               MXQ_TAG_DATA, s->dist->comm));
    }
fail:
    return status;
}

static mxq_status seq_setup(mxq_ctx *ctx, seq_run *s)
{
    mxq_status status = MXQ_OK;
    const int S = s->tokens->seq_len, d = s->model->cfg.hidden;
    CHECK(ctx, (long long)s->batch * S * d < INT_MAX, MXQ_ERR_ARG,
          "a micro-batch of %d sequences x %d tokens x %d features exceeds one MPI message; use a smaller --batch",
          s->batch, S, d);
    s->store = malloc((size_t)s->n_micro * s->mb_floats * sizeof(float));
    s->tmp = malloc(s->mb_floats * sizeof(float));
    CHECK(ctx, s->store && s->tmp, MXQ_ERR_NOMEM,
          "out of memory holding the calibration activations (%zu bytes; sequential mode keeps samples x seq_len x "
          "hidden floats per rank)",
          (size_t)s->n_micro * s->mb_floats * sizeof(float));
    CALL(ctx, mxq_workspace_create(ctx, &s->model->cfg, s->batch, S, &s->ws));
fail:
    return status;
}

static mxq_status calibrate_sequential(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                                       const mxq_recipe *recipe, int batch, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    seq_run s = {dist, model, tokens, recipe, batch, (tokens->n_seqs + batch - 1) / batch,
                 (size_t)batch * tokens->seq_len * model->cfg.hidden, NULL, NULL, NULL, 0};
    AGREE(ctx, dist, "sequential.setup", seq_setup(ctx, &s));
    mxq_status local = seq_take_input(ctx, &s);
    if (local == MXQ_OK)
        local = seq_layers(ctx, &s, results);
    if (local == MXQ_OK)
        local = seq_send_output(ctx, &s);
    /* Tell downstream (blocked in its receives) that nothing more is coming. */
    if (local != MXQ_OK && dist->rank + 1 < dist->size)
        CALL_MPI(ctx, dist->comm, MPI_Send(NULL, 0, MPI_FLOAT, dist->rank + 1, MXQ_TAG_ABORT, dist->comm));
    AGREE(ctx, dist, "sequential.done", local);
fail:
    free(s.store);
    free(s.tmp);
    mxq_workspace_free(s.ws);
    return status;
}

/* --resume of a run whose every layer is recorded (and its store, if any,
 * whole): there is nothing to calibrate. The results stay empty; the job
 * takes every layer from its record. */
static int nothing_to_run(const mxq_model *model, const mxq_layer_hooks *hooks, const mxq_act_store *store,
                          mxq_layer_result *results)
{
    const int L = model->cfg.n_layers;
    for (int l = 0; l < L; l++)
        if (!mxq_layer_done(hooks, l))
            return 0;
    if (store && hooks->start != L)
        return 0;
    for (int i = 0; i < model->last_layer - model->first_layer; i++)
        results[i].layer = -1;
    return 1;
}

mxq_status mxq_quantize_model_in_memory(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *calib,
                                        const char *calib_name, const mxq_recipe *recipe, int batch, int data_parallel,
                                        int stats_layers, int grid_min_inputs, mxq_act_store *store,
                                        const mxq_layer_hooks *hooks, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    if (nothing_to_run(model, hooks, store, results)) {
        if (dist->rank == 0)
            mxq_log(ctx, MXQ_LOG_INFO, "every layer is recorded: nothing to calibrate or quantize");
        return MXQ_OK;
    }
    if (batch <= 0)
        batch = 8;
    if (batch > calib->n_seqs)
        batch = calib->n_seqs;
    if (dist->rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "calibration: %d sequences of %d tokens from %s, %s mode, micro-batch %d, %s",
                calib->n_seqs, calib->seq_len, calib_name, recipe->calib_mode == MXQ_CALIB_FP ? "fp" : "sequential",
                batch,
                data_parallel ? (recipe->calib_mode == MXQ_CALIB_FP
                                     ? "one data-parallel group, layer by layer"
                                     : "one data-parallel group, layer by layer, each layer's inputs spread over the ranks")
                              : "ranks as a pipeline of layer ranges");
    if (data_parallel && recipe->calib_mode == MXQ_CALIB_SEQUENTIAL)
        CALL(ctx, mxq_calibrate_group_sequential(ctx, dist, model, calib, recipe, batch, store, hooks, results));
    else if (data_parallel)
        CALL(ctx, mxq_calibrate_group(ctx, dist, model, calib, recipe, batch, grid_min_inputs, store, hooks, results));
    else if (recipe->calib_mode == MXQ_CALIB_FP)
        CALL(ctx, calibrate_fp(ctx, dist, model, calib, recipe, batch, stats_layers, hooks, results));
    else
        CALL(ctx, calibrate_sequential(ctx, dist, model, calib, recipe, batch, results));
fail:
    return status;
}
