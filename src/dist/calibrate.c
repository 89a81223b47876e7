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
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "mxq/dist.h"
#include "mxq/quantize.h"
#include "mxq/tokens.h"
#include "pipeline.h"

typedef struct {
    const mxq_model *model;
    const mxq_tokens *tokens;
    mxq_workspace *ws;
    mxq_layer_stats *stats; /* the layers being calibrated */
    int stats_first;        /* absolute index of stats[0] */
    int stats_count;
} calib_state;

static mxq_status observe(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                          int features)
{
    calib_state *c = user;
    if (layer < c->stats_first || layer >= c->stats_first + c->stats_count)
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
    double rtn = 0, loss = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        if (r->linear[li].quantized) {
            rtn += r->linear[li].loss_rtn;
            loss += r->linear[li].loss;
        }
    char alphas[128] = "";
    size_t used = 0;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        if (r->awq_alpha[i] >= 0)
            used += (size_t)snprintf(alphas + used, sizeof(alphas) - used, " awq[%s]=%.2f", mxq_input_name(i),
                                     r->awq_alpha[i]);
        else if (r->smooth_alpha[i] >= 0)
            used += (size_t)snprintf(alphas + used, sizeof(alphas) - used, " sq[%s]=%.2f", mxq_input_name(i),
                                     r->smooth_alpha[i]);
        if (used >= sizeof(alphas))
            break;
    }
    mxq_log(ctx, MXQ_LOG_INFO, "layer %d (%d/%d): loss rtn %.4e -> %.4e (%+.1f%%)%s  calib %.2f s  quant %.2f s  rss %.0f MB",
            r->layer, r->layer + 1, m->cfg.n_layers, rtn, loss, rtn > 0 ? 100.0 * (loss - rtn) / rtn : 0.0, alphas,
            r->seconds_calib, r->seconds, (double)r->peak_rss / 1048576.0);
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

/* A layer's tensors as they were before quantization, kept while a copy is
 * quantized (windowed fp mode: later passes must still see FP layers). */
static void layer_free(mxq_layer *L)
{
    free(L->attn_norm);
    free(L->ffn_norm);
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        free(L->weight[li]);
        free(L->bias[li]);
    }
    memset(L, 0, sizeof(*L));
}

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
    layer_free(dst);
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

/* Put a quantized layer in place of the FP one. */
static mxq_status layer_install(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, mxq_layer *L,
                                mxq_layer *q, const mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        if (res->linear[li].quantized) {
            int out, in;
            mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
            CALL(ctx, mxq_mx_dequantize_rows(ctx, &recipe->weights, res->linear[li].packed, res->linear[li].scales,
                                             (size_t)out, (size_t)in, L->weight[li]));
        } else {
            float *t = L->weight[li];
            L->weight[li] = q->weight[li];
            q->weight[li] = t;
        }
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        float *t = L->bias[li];
        L->bias[li] = q->bias[li];
        q->bias[li] = t;
    }
    float *t = L->attn_norm;
    L->attn_norm = q->attn_norm;
    q->attn_norm = t;
    t = L->ffn_norm;
    L->ffn_norm = q->ffn_norm;
    q->ffn_norm = t;
fail:
    layer_free(q);
    return status;
}

/* fp mode: pipelined passes of the FP model over the calibration set. With
 * stats_layers = 0 (or >= the layers a rank owns) one pass collects the
 * statistics of every layer and the layers are quantized in place. With a
 * window of W layers, pass k collects those of each rank's k-th window and
 * quantizes copies, so a rank never holds more than W layers' Hessians and
 * later passes still run the FP model; the statistics, hence the bytes
 * written, are the same as with one pass. */
static mxq_status calibrate_fp(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                               const mxq_recipe *recipe, int batch, int stats_layers, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    const int n_local = model->last_layer - model->first_layer;
    calib_state c = {model, tokens, NULL, NULL, model->first_layer, 0};
    mxq_pipeline p = {0};
    mxq_layer *held = NULL; /* [n_local] quantized copies (windowed mode) */
    mxq_status local = MXQ_OK;
    int window = 0;

    int max_local = n_local;
    CALL_MPI(ctx, MPI_Allreduce(&n_local, &max_local, 1, MPI_INT, MPI_MAX, dist->comm));
    window = stats_layers > 0 && stats_layers < max_local ? stats_layers : max_local;
    const int passes = (max_local + window - 1) / window;

    c.stats = calloc((size_t)window, sizeof(mxq_layer_stats));
    held = calloc((size_t)n_local + 1, sizeof(mxq_layer));
    if (!c.stats || !held) {
        mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory for the layer statistics table");
        local = MXQ_ERR_NOMEM;
    }
    size_t buf_floats = (size_t)batch * tokens->seq_len * model->cfg.hidden;
    if (local == MXQ_OK)
        local = mxq_workspace_create(ctx, &model->cfg, batch, tokens->seq_len, &c.ws);
    if (local == MXQ_OK) {
        p.buf[0] = malloc(buf_floats * sizeof(float));
        p.buf[1] = malloc(buf_floats * sizeof(float));
        if (!p.buf[0] || !p.buf[1]) {
            mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory for pipeline buffers (%zu bytes)",
                          2 * buf_floats * sizeof(float));
            local = MXQ_ERR_NOMEM;
        }
    }
    CALL(ctx, mxq_dist_agree(ctx, dist, local));
    if (passes > 1 && dist->rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "calibration: %d passes, statistics of at most %d layer%s per rank at a time",
                passes, window, window == 1 ? "" : "s");

    p.dist = dist;
    p.n_seqs = tokens->n_seqs;
    p.seq_len = tokens->seq_len;
    p.hidden = model->cfg.hidden;
    p.batch = batch;
    p.n_micro = (tokens->n_seqs + batch - 1) / batch;
    p.label = "calibration";
    p.stage = calib_stage;
    p.user = &c;
    for (int pass = 0; pass < passes; pass++) {
        int lo = pass * window, hi = lo + window < n_local ? lo + window : n_local;
        c.stats_first = model->first_layer + lo;
        c.stats_count = hi > lo ? hi - lo : 0;
        local = MXQ_OK;
        for (int i = 0; i < c.stats_count && local == MXQ_OK; i++)
            local = mxq_layer_stats_init(ctx, &model->cfg, &c.stats[i]);
        CALL(ctx, mxq_dist_agree(ctx, dist, local));
        double t0 = mxq_time_now();
        CALL(ctx, mxq_dist_agree(ctx, dist, mxq_pipeline_run(ctx, &p)));
        double calib_seconds = mxq_time_now() - t0;

        local = MXQ_OK;
        for (int i = lo; i < hi && local == MXQ_OK; i++) {
            mxq_layer_result *res = &results[i];
            res->seconds_calib = calib_seconds / (hi - lo);
            if (passes == 1) {
                local = finish_and_quantize(ctx, recipe, model, model->first_layer + i, &c.stats[i - lo], res, NULL);
            } else {
                local = layer_copy(ctx, &model->cfg, &model->layers[i], &held[i]);
                if (local == MXQ_OK)
                    local = finish_and_quantize(ctx, recipe, model, model->first_layer + i, &c.stats[i - lo], res,
                                                &held[i]);
                if (local == MXQ_OK)
                    layer_shrink(&held[i], res);
            }
            mxq_layer_stats_free(&c.stats[i - lo]);
        }
        for (int i = 0; i < c.stats_count; i++)
            mxq_layer_stats_free(&c.stats[i]);
        CALL(ctx, mxq_dist_agree(ctx, dist, local));
    }
    local = MXQ_OK;
    for (int i = 0; passes > 1 && i < n_local && local == MXQ_OK; i++)
        local = layer_install(ctx, recipe, &model->cfg, &model->layers[i], &held[i], &results[i]);
    CALL(ctx, mxq_dist_agree(ctx, dist, local));
fail:
    for (int i = 0; c.stats && i < window; i++)
        mxq_layer_stats_free(&c.stats[i]);
    for (int i = 0; held && i < n_local; i++)
        layer_free(&held[i]);
    free(held);
    free(c.stats);
    free(p.buf[0]);
    free(p.buf[1]);
    mxq_workspace_free(c.ws);
    return status;
}

/* sequences in micro-batch mb (the last one may be short) */
static int micro_batch_seqs(int n_seqs, int batch, int mb)
{
    return n_seqs - mb * batch < batch ? n_seqs - mb * batch : batch;
}

/* sequential mode (see the top of the file). */
static mxq_status sequential_local(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                                   const mxq_recipe *recipe, int batch, mxq_layer_result *results, float *store,
                                   float *tmp, mxq_workspace *ws, int *upstream_aborted)
{
    mxq_status status = MXQ_OK;
    const int S = tokens->seq_len, d = model->cfg.hidden, n_seqs = tokens->n_seqs;
    const int n_micro = (n_seqs + batch - 1) / batch;
    const size_t mb_floats = (size_t)batch * S * d;
    mxq_layer_stats stats = {0};
    calib_state c = {model, tokens, ws, &stats, 0, 1};
    mxq_observer obs = {observe, &c};
    mxq_fake_quant fq = {0};
    fq.enabled_acts = recipe->has_acts;
    if (recipe->has_acts)
        fq.acts = recipe->acts;

    for (int mb = 0; mb < n_micro; mb++) {
        int n = micro_batch_seqs(n_seqs, batch, mb);
        float *x = store + (size_t)mb * mb_floats;
        if (model->has_embedding) {
            CALL(ctx, mxq_model_embed(ctx, model, tokens->ids + (size_t)mb * batch * S, n, S, x));
        } else {
            MPI_Status st;
            CALL_MPI(ctx, MPI_Recv(x, (int)((size_t)n * S * d), MPI_FLOAT, dist->rank - 1, MPI_ANY_TAG, dist->comm,
                                   &st));
            if (st.MPI_TAG == MXQ_TAG_ABORT) {
                *upstream_aborted = 1;
                FAIL(ctx, MXQ_ERR_REMOTE, "stopped because an upstream rank failed");
            }
        }
    }
    for (int l = model->first_layer; l < model->last_layer; l++) {
        mxq_layer_result *res = &results[l - model->first_layer];
        double t0 = mxq_time_now();
        CALL(ctx, mxq_layer_stats_init(ctx, &model->cfg, &stats));
        c.stats_first = l;
        for (int mb = 0; mb < n_micro; mb++) {
            int n = micro_batch_seqs(n_seqs, batch, mb);
            memcpy(tmp, store + (size_t)mb * mb_floats, (size_t)n * S * d * sizeof(float));
            CALL(ctx, mxq_model_run_layers_observed(ctx, model, l, l + 1, tmp, n, S, NULL, &obs, ws));
        }
        double t1 = mxq_time_now();
        CALL(ctx, finish_and_quantize(ctx, recipe, model, l, &stats, res, NULL));
        mxq_layer_stats_free(&stats);
        double t2 = mxq_time_now();
        for (int mb = 0; mb < n_micro; mb++) {
            int n = micro_batch_seqs(n_seqs, batch, mb);
            CALL(ctx, mxq_model_run_layers(ctx, model, l, l + 1, store + (size_t)mb * mb_floats, n, S, &fq, ws));
        }
        res->seconds_calib = (t1 - t0) + (mxq_time_now() - t2);
    }
    if (dist->rank + 1 < dist->size)
        for (int mb = 0; mb < n_micro; mb++) {
            int n = micro_batch_seqs(n_seqs, batch, mb);
            CALL_MPI(ctx, MPI_Send(store + (size_t)mb * mb_floats, (int)((size_t)n * S * d), MPI_FLOAT,
                                   dist->rank + 1, MXQ_TAG_DATA, dist->comm));
        }
fail:
    mxq_layer_stats_free(&stats);
    return status;
}

static mxq_status calibrate_sequential(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                                       const mxq_recipe *recipe, int batch, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    const int S = tokens->seq_len, d = model->cfg.hidden;
    const int n_micro = (tokens->n_seqs + batch - 1) / batch;
    size_t store_floats = (size_t)n_micro * batch * S * d;
    float *store = malloc(store_floats * sizeof(float));
    float *tmp = malloc((size_t)batch * S * d * sizeof(float));
    mxq_workspace *ws = NULL;
    mxq_status local = MXQ_OK;
    if (!store || !tmp) {
        mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__,
                      "out of memory holding the calibration activations (%zu bytes; sequential mode keeps "
                      "samples x seq_len x hidden floats per rank)",
                      store_floats * sizeof(float));
        local = MXQ_ERR_NOMEM;
    }
    if (local == MXQ_OK)
        local = mxq_workspace_create(ctx, &model->cfg, batch, S, &ws);
    CALL(ctx, mxq_dist_agree(ctx, dist, local));

    int upstream_aborted = 0;
    local = sequential_local(ctx, dist, model, tokens, recipe, batch, results, store, tmp, ws, &upstream_aborted);
    /* Tell downstream (blocked in its receives) that nothing is coming. */
    if (local != MXQ_OK && dist->rank + 1 < dist->size)
        MPI_Send(NULL, 0, MPI_FLOAT, dist->rank + 1, MXQ_TAG_ABORT, dist->comm);
    CALL(ctx, mxq_dist_agree(ctx, dist, local));
fail:
    free(store);
    free(tmp);
    mxq_workspace_free(ws);
    return status;
}

mxq_status mxq_calibration_tokens(mxq_ctx *ctx, const mxq_dist *dist, const char *calib_path,
                                  const mxq_recipe *recipe, const char *recipe_path, const mxq_model_config *cfg,
                                  mxq_tokens *tokens)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, calib_path != NULL, MXQ_ERR_ARG, "a calibration token file is needed to apply a recipe");
    CALL(ctx, mxq_dist_agree(ctx, dist, mxq_tokens_read(ctx, dist, calib_path, recipe->calib_samples, cfg->vocab, tokens)));
    mxq_status local = MXQ_OK;
    if (tokens->total_seqs < recipe->calib_samples) {
        mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__,
                      "calibration file '%s' has %d sequences, but the recipe%s%s asks for calibration.samples = %d",
                      calib_path, tokens->total_seqs, recipe_path ? " " : "", recipe_path ? recipe_path : "",
                      recipe->calib_samples);
        local = MXQ_ERR_ARG;
    } else if (tokens->seq_len > cfg->max_positions) {
        mxq_error_set(ctx, MXQ_ERR_FORMAT, __FILE__, __LINE__,
                      "calibration file '%s' has sequences of %d tokens, longer than the model's context of %d "
                      "(max_position_embeddings)",
                      calib_path, tokens->seq_len, cfg->max_positions);
        local = MXQ_ERR_FORMAT;
    }
    CALL(ctx, mxq_dist_agree(ctx, dist, local));
    return MXQ_OK;
fail:
    mxq_tokens_free(tokens);
    return status;
}

mxq_status mxq_quantize_model_in_memory(mxq_ctx *ctx, MPI_Comm comm, mxq_model *model, const mxq_tokens *calib,
                                        const char *calib_name, const mxq_recipe *recipe, int batch, int stats_layers,
                                        mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    mxq_dist dist = {.comm = MPI_COMM_NULL};
    CALL(ctx, mxq_dist_create(ctx, comm, &dist));
    if (batch <= 0)
        batch = 8;
    if (batch > calib->n_seqs)
        batch = calib->n_seqs;
    if (dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "calibration: %d sequences of %d tokens from %s, %s mode, micro-batch %d",
                calib->n_seqs, calib->seq_len, calib_name, recipe->calib_mode == MXQ_CALIB_FP ? "fp" : "sequential",
                batch);
    if (recipe->calib_mode == MXQ_CALIB_FP)
        CALL(ctx, calibrate_fp(ctx, &dist, model, calib, recipe, batch, stats_layers, results));
    else
        CALL(ctx, calibrate_sequential(ctx, &dist, model, calib, recipe, batch, results));
fail:
    mxq_dist_free(&dist);
    return status;
}
