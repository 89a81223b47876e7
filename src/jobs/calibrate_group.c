/* fp calibration by one data-parallel group of ranks.
 *
 * Every rank holds the activations of its share of the calibration
 * sequences and runs them through the whole model, one layer at a time:
 * the layer is converted from the checkpoint, its inputs' statistics are
 * gathered on the share, summed onto the rank that owns the layer (layer l
 * belongs to rank l % size), and the layer is given back. After every
 * `size` layers each rank quantizes the one it owns, all at the same time.
 *
 * Linears with --grid-min-inputs inputs or more have their GPTQ on a
 * ScaLAPACK grid of all the ranks instead: the round's owners then go
 * linear by linear, scales and clipping side by side, each owner's GPTQ on
 * the grid in turn, packing and losses side by side (quantize_round_on_grid).
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

#include "algo/gptq_internal.h"
#include "algo/layer_quant.h"
#include "core/alloc.h"
#include "jobs/jobs_internal.h"
#include "model/lazy.h"
#include "jobs/quantize_report.h"
#include "parallel/gptq_grid.h"
#include "parallel/pipeline.h"

typedef struct {
    const mxq_dist *dist;
    mxq_model *model; /* lazy, every layer */
    const mxq_tokens *tokens;
    const mxq_recipe *recipe;
    int batch;
    mxq_calib_share share;
    mxq_workspace *ws;
    /* Two sets of statistics, each allocated once (allocating 1.3 GB per 7B
     * layer fragments the heap, whose peak then grows by hundreds of MB
     * every few layers): the current layer's on this share, and the summed
     * ones of the layer this rank quantizes next. They swap roles. The
     * second is allocated when first needed. */
    mxq_layer_stats stats[2];
    int partial; /* index into stats: the current layer's */
    int owned_layer; /* -1: none waiting; else its statistics are stats[1 - partial] */
    double owned_calib_seconds;
    mxq_layer_record *records; /* rank 0: [size], the layers just quantized, for their progress lines */
    int grid_min_inputs;       /* GPTQ of linears with this many inputs or more on the grid (0: never) */
    const mxq_layer_hooks *hooks; /* layers done before are only run through */
} group_run;

static mxq_status observe(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                          int features)
{
    (void)layer; /* one layer runs at a time */
    (void)features;
    group_run *g = user;
    return mxq_input_stats_add(ctx, &g->stats[g->partial].input[input], x, tokens);
}

/* This rank's share of the sequences, embedded; the embedding goes after. */
static mxq_status group_setup(mxq_ctx *ctx, group_run *g)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_calib_share_create(ctx, g->dist, g->model, g->tokens, g->batch, mxq_group_first_layer(g->hooks) == 0,
                                     &g->share));
    g->records = calloc(g->dist->rank == 0 ? (size_t)g->dist->size : 1, sizeof(*g->records));
    CHECK_ALLOC(ctx, g->records, (size_t)g->dist->size * sizeof(*g->records), "the layer records");
    CALL(ctx, mxq_workspace_create(ctx, &g->model->cfg, g->batch, g->tokens->seq_len, &g->ws));
    CALL(ctx, mxq_layer_stats_init(ctx, &g->model->cfg, &g->stats[0]));
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
    /* the second set only when this rank's own layer waits while another
     * runs: never on the round's last rank (a 70B layer's is 7.8 GB), whose
     * one set is free again once its layer is quantized */
    if (!g->stats[g->partial].input[0].hessian && g->owned_layer < 0)
        g->partial = 1 - g->partial;
    if (!g->stats[g->partial].input[0].hessian)
        CALL(ctx, mxq_layer_stats_init(ctx, &g->model->cfg, &g->stats[g->partial]));
    mxq_layer_stats_zero(&g->stats[g->partial]);
    for (int mb = 0; mb < mxq_calib_share_batches(&g->share); mb++) {
        int n;
        float *x = mxq_calib_share_batch(&g->share, mb, &n);
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

/* Whether layer `layer` (may be past the end) runs linear li's GPTQ on the
 * grid of all the group's ranks: big enough, and whole lazy batches. Every
 * rank decides the same from the recipe and the shapes alone. */
static int gptq_on_grid(const group_run *g, int layer, mxq_linear_id li)
{
    const mxq_gptq_options *o = mxq_recipe_gptq(g->recipe);
    int out, in;
    mxq_linear_shape(&g->model->cfg, li, &out, &in);
    return layer < g->model->cfg.n_layers && !mxq_layer_done(g->hooks, layer) && g->dist->size > 1 && o &&
           g->grid_min_inputs > 0 &&
           in >= g->grid_min_inputs && mxq_recipe_quantizes_linear(g->recipe, layer, li) &&
           mxq_gptq_grid_applies(&g->recipe->weights, o, (size_t)in, g->dist->size);
}

/* Rank 0 says which linears' GPTQ goes to the grid, and in how many
 * layers when exclusions keep some on their owners. */
static void log_grid_linears(mxq_ctx *ctx, const group_run *g)
{
    char names[512] = "";
    const int L = g->model->cfg.n_layers;
    for (int li = 0; li < MXQ_LIN_COUNT && g->dist->rank == 0; li++) {
        int layers = 0;
        for (int l = 0; l < L; l++)
            layers += gptq_on_grid(g, l, (mxq_linear_id)li);
        if (layers == L || layers == 0)
            snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s", names[0] && layers ? ", " : "",
                     layers ? mxq_linear_name((mxq_linear_id)li) : "");
        else
            snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s (%d of %d layers)",
                     names[0] ? ", " : "", mxq_linear_name((mxq_linear_id)li), layers, L);
    }
    if (g->dist->rank == 0 && names[0])
        mxq_log(ctx, MXQ_LOG_INFO, "GPTQ of %s on a ScaLAPACK grid of all %d ranks (linears with at least %d inputs)",
                names, g->dist->size, g->grid_min_inputs);
    else if (g->dist->rank == 0 && g->grid_min_inputs > 0 && g->dist->size > 1 && mxq_recipe_gptq(g->recipe))
        mxq_log(ctx, MXQ_LOG_INFO,
                "GPTQ stays on the layers' owners: no linear has %d inputs or more in whole lazy batches of %d",
                g->grid_min_inputs, mxq_gptq_batch_width(&g->recipe->weights, mxq_recipe_gptq(g->recipe)));
}

static int round_uses_grid(const group_run *g, int base)
{
    for (int p = 0; p < g->dist->size; p++)
        for (int li = 0; li < MXQ_LIN_COUNT; li++)
            if (gptq_on_grid(g, base + p, (mxq_linear_id)li))
                return 1;
    return 0;
}

/* The summed statistics of the layer this rank owns, made symmetric. */
static mxq_layer_stats *owned_stats(group_run *g)
{
    mxq_layer_stats *owned = &g->stats[1 - g->partial];
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        mxq_input_stats_finish(&owned->input[i]);
    return owned;
}

/* Layer l, just quantized here: recorded, and only what the shard writes
 * from it kept. */
static mxq_status keep_and_record(mxq_ctx *ctx, group_run *g, int l, const mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    const mxq_layer_result *res = &results[l - g->model->first_layer];
    CALL(ctx, mxq_layer_hook_record(ctx, g->hooks, l, &g->model->layers[l - g->model->first_layer], res));
    CALL(ctx, mxq_layer_keep_written(ctx, g->model, l, res));
fail:
    return status;
}

/* Linear li of root's layer on the grid (collective); root's weight, H and
 * scales go in, Q and the scales come back to it. */
static mxq_status grid_gptq_of(mxq_ctx *ctx, group_run *g, mxq_layer_quant *q, int base, int root, mxq_linear_id li)
{
    mxq_status status = MXQ_OK;
    const int is_root = g->dist->rank == root;
    mxq_gptq_options o = *mxq_recipe_gptq(g->recipe);
    o.skip_losses = 1; /* the report's losses include clipping: mxq_linear_quant_finish */
    int out, in;
    mxq_linear_shape(&g->model->cfg, li, &out, &in);
    const mxq_input_stats *st = is_root ? &q->stats->input[mxq_linear_input(li)] : NULL;
    mxq_gptq_stats gs;
    double t0 = mxq_time_now();
    CALL_IN(ctx,
            mxq_gptq_grid(ctx, g->dist, root, &g->recipe->weights, &o, is_root ? q->L->weight[li] : NULL, (size_t)out,
                          (size_t)in, st ? st->hessian : NULL, MXQ_HESSIAN_ON_ROOT,
                          st && st->n_tokens > 0 ? st->n_tokens : 1.0, is_root ? q->res->linear[li].scales : NULL,
                          &gs),
            "layer %d %s: GPTQ on the grid of %d ranks", base + root, mxq_linear_name(li), g->dist->size);
    if (is_root)
        mxq_linear_quant_rounded(q, li, mxq_time_now() - t0, gs.dead_channels);
fail:
    return status;
}

/* Linear li of every owner's layer: prepared (and, off the grid, rounded)
 * side by side; then the grid's GPTQs one owner after the other; then
 * packed and measured side by side. */
static mxq_status round_linear(mxq_ctx *ctx, group_run *g, mxq_layer_quant *q, int base, mxq_linear_id li)
{
    mxq_status status = MXQ_OK, local = MXQ_OK;
    const int mine = g->owned_layer, here = mine >= 0 && q->quantized[li];
    if (here)
        local = mxq_linear_quant_prepare(ctx, q, li);
    if (here && local == MXQ_OK && !gptq_on_grid(g, mine, li))
        local = mxq_linear_quant_round(ctx, q, li);
    AGREE(ctx, g->dist, "group.quantize", local);
    for (int p = 0; p < g->dist->size; p++)
        if (gptq_on_grid(g, base + p, li))
            CALL(ctx, grid_gptq_of(ctx, g, q, base, p, li));
    AGREE(ctx, g->dist, "group.quantize", here ? mxq_linear_quant_finish(ctx, q, li) : MXQ_OK);
fail:
    return status;
}

/* The owners quantize their layers of the round [base, base + size) side
 * by side, linear by linear, so that the big linears' GPTQ can run on the
 * grid of all ranks between the phases. */
static mxq_status quantize_round_on_grid(mxq_ctx *ctx, group_run *g, mxq_layer_result *results, int base)
{
    mxq_status status = MXQ_OK;
    const int l = g->owned_layer;
    mxq_layer_quant q;
    memset(&q, 0, sizeof(q));
    int begun = 0;
    mxq_status local = MXQ_OK;
    if (l >= 0) {
        local = mxq_layer_quant_begin(ctx, &q, g->recipe, &g->model->cfg, l,
                                      &g->model->layers[l - g->model->first_layer], owned_stats(g), NULL,
                                      &results[l - g->model->first_layer]);
        begun = 1;
    }
    AGREE(ctx, g->dist, "group.quantize", local);
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        CALL(ctx, round_linear(ctx, g, &q, base, (mxq_linear_id)li));
    if (l >= 0) {
        mxq_layer_quant_end(&q);
        begun = 0;
        results[l - g->model->first_layer].seconds_calib = g->owned_calib_seconds;
    }
    AGREE(ctx, g->dist, "group.quantize", l >= 0 ? keep_and_record(ctx, g, l, results) : MXQ_OK);
fail:
    if (begun)
        mxq_layer_quant_end(&q);
    g->owned_layer = -1;
    return status;
}

/* Each rank quantizes the layer it owns, if any (local). */
static mxq_status quantize_own_layer(mxq_ctx *ctx, group_run *g, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    const int l = g->owned_layer;
    if (l < 0)
        return MXQ_OK;
    mxq_layer_result *res = &results[l - g->model->first_layer];
    CALL(ctx, mxq_quantize_layer(ctx, g->recipe, &g->model->cfg, l, &g->model->layers[l - g->model->first_layer],
                                 owned_stats(g), res));
    res->seconds_calib = g->owned_calib_seconds;
    CALL(ctx, keep_and_record(ctx, g, l, results));
fail:
    g->owned_layer = -1;
    return status;
}

/* The round of layers [base, base + size): on the grid if any of its
 * linears goes there, else each owner alone (one agreement). */
static mxq_status group_quantize(mxq_ctx *ctx, group_run *g, mxq_layer_result *results, int base)
{
    mxq_status status = MXQ_OK;
    if (round_uses_grid(g, base))
        CALL(ctx, quantize_round_on_grid(ctx, g, results, base));
    else
        AGREE(ctx, g->dist, "group.quantize", quantize_own_layer(ctx, g, results));
fail:
    return status;
}

static void group_run_free(group_run *g)
{
    mxq_layer_stats_free(&g->stats[0]);
    mxq_layer_stats_free(&g->stats[1]);
    mxq_calib_share_free(&g->share);
    free(g->records);
    mxq_workspace_free(g->ws);
}

mxq_status mxq_calibrate_group(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                               const mxq_recipe *recipe, int batch, int grid_min_inputs, mxq_act_store *store,
                               const mxq_layer_hooks *hooks, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    group_run g = {.dist = dist,
                   .model = model,
                   .tokens = tokens,
                   .recipe = recipe,
                   .batch = batch,
                   .owned_layer = -1,
                   .grid_min_inputs = grid_min_inputs,
                   .hooks = hooks};
    const int L = model->cfg.n_layers;
    if (mxq_group_spread_applies(recipe, &model->cfg, dist->size, grid_min_inputs))
        return mxq_calibrate_group_spread(ctx, dist, model, tokens, recipe, batch, store, hooks, results);
    for (int l = 0; l < L; l++)
        results[l].layer = -1;
    AGREE(ctx, dist, "group.setup", group_setup(ctx, &g));
    CALL(ctx, mxq_calib_share_restart(ctx, dist, hooks, store, &g.share));
    log_grid_linears(ctx, &g);
    mxq_group_log_why_whole(ctx, dist, recipe, &model->cfg, grid_min_inputs);
    for (int l = mxq_group_first_layer(hooks); l < L; l++) {
        double t0 = mxq_time_now();
        if (store)
            CALL(ctx, mxq_act_store_write(ctx, dist, store, l, g.share.first, g.share.n, g.share.acts));
        if (mxq_layer_done(hooks, l)) {
            AGREE(ctx, dist, "group.forward", mxq_calib_share_skip_layer(ctx, model, &g.share, l, g.ws));
        } else {
            AGREE(ctx, dist, "group.forward", group_forward(ctx, &g, l));
            CALL(ctx, mxq_layer_stats_reduce(ctx, dist, &g.stats[g.partial], l % dist->size));
            AGREE(ctx, dist, "group.keep", group_keep(ctx, &g, l));
        }
        if (g.owned_layer == l)
            g.owned_calib_seconds = mxq_time_now() - t0;
        if (l % dist->size == dist->size - 1 || l == L - 1) {
            const int quantized = g.owned_layer;
            CALL(ctx, group_quantize(ctx, &g, results, l - l % dist->size));
            CALL(ctx, mxq_group_log_layers(ctx, dist, model, results, quantized, g.records));
        }
    }
fail:
    group_run_free(&g);
    return status;
}
