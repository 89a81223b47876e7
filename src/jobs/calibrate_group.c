/* fp calibration by one data-parallel group of ranks.
 *
 * Every rank holds the activations of its share of the calibration
 * sequences and runs them through the whole model, one layer at a time:
 * the layer is converted from the checkpoint, its inputs' statistics are
 * gathered on the share, summed onto the rank that owns the layer (layer l
 * belongs to rank l % size), and the layer is given back. After every
 * `size` layers each rank quantizes the one it owns, all at the same time.
 *
 * So a rank holds one layer's weights (two while its own waits), the
 * statistics of at most two layers and its share of the activations,
 * whatever the model's depth: what a 7B model needs on a small node. The
 * statistics are summed over ranks, and each rank's float32 Gram products
 * run over its own groupings of tokens, so their last bits depend on the
 * rank count (tests/cli/test_cli_quantize.c compares them with the
 * pipeline's). */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "jobs/jobs_internal.h"
#include "model/lazy.h"
#include "jobs/quantize_report.h"
#include "parallel/pipeline.h"

typedef struct {
    const mxq_dist *dist;
    mxq_model *model; /* lazy, every layer */
    const mxq_tokens *tokens;
    const mxq_recipe *recipe;
    int batch;
    int seq_first, n_seqs; /* this rank's share of the sequences */
    float *store;          /* [n_seqs, seq_len, hidden]: the share's activations at the current layer */
    mxq_workspace *ws;
    /* Two sets of statistics, allocated once (allocating 1.3 GB per 7B layer
     * fragments the heap, whose peak then grows by hundreds of MB every few
     * layers): the current layer's on this share, and the summed ones of
     * the layer this rank quantizes next. They swap roles. */
    mxq_layer_stats stats[2];
    int partial; /* index into stats: the current layer's */
    int owned_layer; /* -1: none waiting; else its statistics are stats[1 - partial] */
    double owned_calib_seconds;
    mxq_layer_record *records; /* rank 0: [size], the layers just quantized, for their progress lines */
} group_run;

static mxq_status observe(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                          int features)
{
    (void)layer; /* one layer runs at a time */
    (void)features;
    group_run *g = user;
    return mxq_input_stats_add(ctx, &g->stats[g->partial].input[input], x, tokens);
}

static float *share_batch(const group_run *g, int mb, int *n)
{
    const size_t seq_floats = (size_t)g->tokens->seq_len * g->model->cfg.hidden;
    *n = mxq_micro_batch_seqs(g->n_seqs, g->batch, mb);
    return g->store + (size_t)mb * g->batch * seq_floats;
}

static int share_batches(const group_run *g) { return (g->n_seqs + g->batch - 1) / g->batch; }

/* This rank's share of the sequences, embedded; the embedding goes after. */
static mxq_status group_setup(mxq_ctx *ctx, group_run *g)
{
    mxq_status status = MXQ_OK;
    const int S = g->tokens->seq_len, size = g->dist->size, rank = g->dist->rank;
    g->seq_first = (int)((long long)g->tokens->n_seqs * rank / size);
    g->n_seqs = (int)((long long)g->tokens->n_seqs * (rank + 1) / size) - g->seq_first;
    const size_t floats = (size_t)g->n_seqs * S * g->model->cfg.hidden;
    CHECK(ctx, (long long)g->batch * S * g->model->cfg.hidden < INT_MAX, MXQ_ERR_ARG,
          "a micro-batch of %d sequences x %d tokens x %d features is too large; use a smaller --batch", g->batch, S,
          g->model->cfg.hidden);
    g->store = mxq_alloc_floats(floats ? floats : 1);
    CHECK_ALLOC(ctx, g->store, floats * sizeof(float), "this rank's share of the calibration activations");
    g->records = calloc(rank == 0 ? (size_t)size : 1, sizeof(*g->records));
    CHECK_ALLOC(ctx, g->records, (size_t)size * sizeof(*g->records), "the layer records");
    CALL(ctx, mxq_workspace_create(ctx, &g->model->cfg, g->batch, S, &g->ws));
    for (int i = 0; i < 2; i++)
        CALL(ctx, mxq_layer_stats_init(ctx, &g->model->cfg, &g->stats[i]));
    for (int mb = 0; mb < share_batches(g); mb++) {
        int n;
        float *x = share_batch(g, mb, &n);
        CALL(ctx, mxq_model_embed(ctx, g->model, g->tokens->ids + (size_t)(g->seq_first + mb * g->batch) * S, n, S, x));
    }
    CALL(ctx, mxq_model_unload_embedding(ctx, g->model));
fail:
    return status;
}

/* Layer l converted, run on the share with its statistics gathered. */
static mxq_status group_forward(mxq_ctx *ctx, group_run *g, int l)
{
    mxq_status status = MXQ_OK;
    mxq_observer obs = {observe, g};
    CALL(ctx, mxq_fault_point(ctx, "group.layer"));
    CALL(ctx, mxq_model_layer_load(ctx, g->model, l));
    mxq_layer_stats_zero(&g->stats[g->partial]);
    for (int mb = 0; mb < share_batches(g); mb++) {
        int n;
        float *x = share_batch(g, mb, &n);
        CALL(ctx, mxq_model_run_layers_observed(ctx, g->model, l, l + 1, x, n, g->tokens->seq_len, NULL, &obs, g->ws));
    }
fail:
    return status;
}

/* After the statistics are summed onto layer l's owner: it keeps them and
 * the layer; the others give the layer back (local). */
static mxq_status group_keep(mxq_ctx *ctx, group_run *g, int l)
{
    mxq_status status = MXQ_OK;
    if (g->dist->rank == l % g->dist->size) {
        g->owned_layer = l;
        g->partial = 1 - g->partial;
        CALL(ctx, mxq_model_layer_release_pages(ctx, g->model, l));
    } else {
        CALL(ctx, mxq_model_layer_unload(ctx, g->model, l));
    }
fail:
    return status;
}

/* Each rank quantizes the layer it owns, if any (local). */
static mxq_status group_quantize(mxq_ctx *ctx, group_run *g, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    const int l = g->owned_layer;
    if (l < 0)
        return MXQ_OK;
    mxq_layer_result *res = &results[l - g->model->first_layer];
    mxq_layer_stats *owned = &g->stats[1 - g->partial];
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        mxq_input_stats_finish(&owned->input[i]);
    CALL(ctx, mxq_quantize_layer(ctx, g->recipe, &g->model->cfg, l, &g->model->layers[l - g->model->first_layer], owned,
                                 res));
    res->seconds_calib = g->owned_calib_seconds;
    CALL(ctx, mxq_layer_keep_written(ctx, g->model, l, res));
fail:
    g->owned_layer = -1;
    return status;
}

/* The progress lines of the layers just quantized, printed by rank 0. */
static mxq_status group_log(mxq_ctx *ctx, group_run *g, const mxq_layer_result *results, int quantized_layer)
{
    mxq_status status = MXQ_OK;
    mxq_layer_record rec = {.layer = -1};
    if (quantized_layer >= 0)
        mxq_layer_record_of(&results[quantized_layer - g->model->first_layer], g->dist->rank, &rec);
    CALL_MPI(ctx, g->dist->comm,
             MPI_Gather(&rec, (int)sizeof(rec), MPI_BYTE, g->records, (int)sizeof(rec), MPI_BYTE, 0, g->dist->comm));
    for (int r = 0; g->dist->rank == 0 && r < g->dist->size; r++)
        if (g->records[r].layer >= 0)
            mxq_layer_record_log(ctx, g->model->cfg.n_layers, &g->records[r]);
fail:
    return status;
}

static void group_run_free(group_run *g)
{
    mxq_layer_stats_free(&g->stats[0]);
    mxq_layer_stats_free(&g->stats[1]);
    free(g->store);
    free(g->records);
    mxq_workspace_free(g->ws);
}

mxq_status mxq_calibrate_group(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                               const mxq_recipe *recipe, int batch, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    group_run g = {.dist = dist, .model = model, .tokens = tokens, .recipe = recipe, .batch = batch, .owned_layer = -1};
    const int L = model->cfg.n_layers;
    for (int l = 0; l < L; l++)
        results[l].layer = -1;
    AGREE(ctx, dist, "group.setup", group_setup(ctx, &g));
    for (int l = 0; l < L; l++) {
        double t0 = mxq_time_now();
        AGREE(ctx, dist, "group.forward", group_forward(ctx, &g, l));
        CALL(ctx, mxq_layer_stats_reduce(ctx, dist, &g.stats[g.partial], l % dist->size));
        AGREE(ctx, dist, "group.keep", group_keep(ctx, &g, l));
        if (g.owned_layer == l)
            g.owned_calib_seconds = mxq_time_now() - t0;
        if (l % dist->size == dist->size - 1 || l == L - 1) {
            const int quantized = g.owned_layer;
            AGREE(ctx, dist, "group.quantize", group_quantize(ctx, &g, results));
            CALL(ctx, group_log(ctx, &g, results, quantized));
        }
    }
fail:
    group_run_free(&g);
    return status;
}
