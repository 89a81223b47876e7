/* Perplexity over an MPI pipeline.
 *
 * The pipeline itself is in pipeline.c. The last rank turns hidden states into per-sequence
 * negative log-likelihoods; their sum is taken in sequence order, so the
 * result is the same bits for any number of ranks.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "mxq/dist.h"
#include "mxq/eval.h"
#include "mxq/quantize.h"
#include "mxq/tokens.h"
#include "pipeline.h"

typedef struct {
    const mxq_model *model;
    const mxq_tokens *tokens;
    const mxq_fake_quant *quant;
    mxq_workspace *ws;
    double *nll; /* [n_seqs], on the last rank */
} eval_stage;

/* This rank's stage on micro-batch mb, in place on buf. */
static mxq_status run_stage(mxq_ctx *ctx, void *user, int mb, int first_seq, int n, float *buf)
{
    mxq_status status = MXQ_OK;
    eval_stage *e = user;
    const mxq_model *m = e->model;
    int S = e->tokens->seq_len;
    const int32_t *ids = e->tokens->ids + (size_t)first_seq * S;
    if (m->has_embedding)
        CALL(ctx, mxq_model_embed(ctx, m, ids, n, S, buf));
    CALL(ctx, mxq_model_run_layers(ctx, m, m->first_layer, m->last_layer, buf, n, S, e->quant, e->ws));
    if (m->has_head)
        CALL(ctx, mxq_model_sequence_nll(ctx, m, buf, ids, n, S, e->nll + first_seq, e->ws));
fail:
    return status;
}

mxq_status mxq_eval_perplexity(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *tokens_path,
                               const mxq_eval_options *options, mxq_eval_result *result)
{
    mxq_status status = MXQ_OK;
    mxq_dist dist = {.comm = MPI_COMM_NULL};
    mxq_pipeline p = {0};
    eval_stage e = {0};
    mxq_model_config cfg;
    mxq_tokens tokens = {0}, calib = {0};
    mxq_model *model = NULL;
    mxq_layer_result *qresults = NULL;
    mxq_fake_quant quant = options->quant;
    int *first = NULL;
    memset(result, 0, sizeof(*result));

    CALL(ctx, mxq_dist_create(ctx, comm, &dist));
    const int rank = dist.rank, size = dist.size;
    double t_load = mxq_time_now();

    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_config_load(ctx, model_dir, &cfg)));
    mxq_status local = MXQ_OK;
    if (cfg.mx_weights && (quant.enabled_weights || options->recipe)) {
        mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__,
                      "'%s' is already quantized (%s weights); --weights and --recipe apply to unquantized models",
                      model_dir, cfg.mx_weight_spec.format->name);
        local = MXQ_ERR_ARG;
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));
    /* An mxq checkpoint says how its activations are quantized; --acts overrides. */
    if (cfg.mx_acts && !quant.enabled_acts) {
        quant.enabled_acts = 1;
        quant.acts = cfg.mx_act_spec;
    }
    if (options->recipe && options->recipe->has_acts && !options->quant.enabled_acts) {
        quant.enabled_acts = 1;
        quant.acts = options->recipe->acts;
    }
    first = malloc((size_t)(size + 1) * sizeof(int));
    CHECK_ALLOC(ctx, first, (size_t)(size + 1) * sizeof(int), "the layer partition");
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_partition_layers(ctx, &cfg, size, first)));
    mxq_model_part part = {first[rank], first[rank + 1], rank == 0, rank == size - 1};
    mxq_log(ctx, MXQ_LOG_DEBUG, "rank %d owns layers [%d, %d)%s%s", rank, part.first_layer, part.last_layer,
            part.embedding ? " + embedding" : "", part.head ? " + norm/lm_head" : "");
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_model_load(ctx, model_dir, &cfg, &part, &model)));
    if (quant.enabled_weights)
        CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_model_fake_quantize_weights(ctx, model, &quant.weights)));
    if (options->recipe) {
        int n_local = part.last_layer - part.first_layer;
        qresults = calloc((size_t)n_local + 1, sizeof(*qresults));
        local = MXQ_OK;
        if (!qresults) {
            mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory for layer results");
            local = MXQ_ERR_NOMEM;
        }
        CALL(ctx, mxq_dist_agree(ctx, &dist, local));
        CALL(ctx, mxq_calibration_tokens(ctx, &dist, options->calib_path, options->recipe, options->recipe_path,
                                         &cfg, &calib));
        CALL(ctx, mxq_quantize_model_in_memory(ctx, dist.comm, model, &calib, options->calib_path, options->recipe,
                                               options->batch, 0, qresults));
        mxq_tokens_free(&calib);
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_tokens_read(ctx, &dist, tokens_path, options->limit, cfg.vocab, &tokens)));
    local = MXQ_OK;
    if (tokens.seq_len > cfg.max_positions) {
        mxq_error_set(ctx, MXQ_ERR_FORMAT, __FILE__, __LINE__,
                      "token file '%s' has sequences of %d tokens, longer than the model's context of %d "
                      "(max_position_embeddings)",
                      tokens_path, tokens.seq_len, cfg.max_positions);
        local = MXQ_ERR_FORMAT;
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));
    if (options->limit > tokens.total_seqs)
        mxq_log(ctx, MXQ_LOG_WARN, "--limit %d exceeds the %d sequences in '%s'; evaluating all of them",
                options->limit, tokens.total_seqs, tokens_path);

    e.model = model;
    e.tokens = &tokens;
    e.quant = &quant;
    p.dist = &dist;
    p.n_seqs = tokens.n_seqs;
    p.seq_len = tokens.seq_len;
    p.hidden = cfg.hidden;
    p.label = "eval";
    p.stage = run_stage;
    p.user = &e;
    p.batch = options->batch > 0 ? options->batch : 8;
    if (p.batch > tokens.n_seqs)
        p.batch = tokens.n_seqs;
    p.n_micro = (tokens.n_seqs + p.batch - 1) / p.batch;
    size_t buf_floats = (size_t)p.batch * tokens.seq_len * cfg.hidden;
    local = mxq_workspace_create(ctx, &cfg, p.batch, tokens.seq_len, &e.ws);
    if (local == MXQ_OK) {
        p.buf[0] = malloc(buf_floats * sizeof(float));
        p.buf[1] = malloc(buf_floats * sizeof(float));
        e.nll = calloc((size_t)tokens.n_seqs, sizeof(double));
        if (!p.buf[0] || !p.buf[1] || !e.nll) {
            mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory for pipeline buffers (%zu bytes)",
                          2 * buf_floats * sizeof(float));
            local = MXQ_ERR_NOMEM;
        }
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));
    double load_seconds = mxq_time_now() - t_load;
    mxq_log(ctx, MXQ_LOG_INFO, "eval: %s (%s, %d layers, d=%d) on %d rank%s; %d sequences of %d tokens, micro-batch %d",
            model_dir, mxq_arch_name(cfg.arch), cfg.n_layers, cfg.hidden, size, size == 1 ? "" : "s", tokens.n_seqs,
            tokens.seq_len, p.batch);

    double t0 = mxq_time_now();
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_pipeline_run(ctx, &p)));
    double seconds = mxq_time_now() - t0;

    double totals[2] = {0, 0};
    if (rank == size - 1) {
        for (int s = 0; s < tokens.n_seqs; s++)
            totals[0] += e.nll[s];
        totals[1] = (double)tokens.n_seqs * (tokens.seq_len - 1);
    }
    CALL_MPI(ctx, MPI_Bcast(totals, 2, MPI_DOUBLE, size - 1, dist.comm));
    result->tokens_scored = (size_t)totals[1];
    result->mean_nll = totals[0] / totals[1];
    result->ppl = exp(result->mean_nll);
    result->sequences = tokens.n_seqs;
    result->seq_len = tokens.seq_len;
    result->seconds = seconds;
    result->load_seconds = load_seconds;
    result->tokens_per_s = (double)tokens.n_seqs * tokens.seq_len / seconds;
    result->ranks = size;
    result->acts_quantized = quant.enabled_acts;
    if (quant.enabled_acts)
        result->acts = quant.acts;
fail:
    if (qresults && model)
        for (int i = 0; i < model->last_layer - model->first_layer; i++)
            mxq_layer_result_free(&qresults[i]);
    free(qresults);
    free(p.buf[0]);
    free(p.buf[1]);
    free(e.nll);
    mxq_workspace_free(e.ws);
    mxq_tokens_free(&tokens);
    mxq_tokens_free(&calib);
    mxq_model_free(model);
    free(first);
    mxq_dist_free(&dist);
    return status;
}
