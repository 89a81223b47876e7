/* fp calibration by one data-parallel group whose statistics are spread:
 * every Hessian lives in block rows over the ranks (parallel/hessian_split.h),
 * so that no rank holds a layer's statistics whole (a 70B layer's are 7.8
 * GB; on 2 ranks each holds 3.9 GB).
 *
 * Layer by layer: every rank converts the layer, runs its share of the
 * sequences through it, and the activations of each linear input are
 * exchanged so that each rank adds its block rows of H; the layer's owner
 * (l % size) then quantizes it with every Hessian request (AWQ's losses,
 * clipping's diagonal blocks, the folds) served by all ranks, and every
 * GPTQ on the grid of all ranks, which factors H where it lies. The
 * others give the layer back first. Chosen when every GPTQ linear goes to
 * the grid (--grid-min-inputs, or the memory a rank has): see
 * mxq_group_spread_applies. */
#include <stdlib.h>
#include <string.h>

#include "algo/gptq_internal.h"
#include "algo/layer_quant.h"
#include "jobs/jobs_internal.h"
#include "model/lazy.h"
#include "parallel/hessian_split.h"

typedef struct {
    const mxq_dist *dist;
    mxq_model *model; /* lazy, every layer */
    const mxq_tokens *tokens;
    const mxq_recipe *recipe;
    int batch;
    mxq_calib_share share;
    mxq_workspace *ws; /* created for each layer's forward, freed while it is quantized */
    mxq_hsplit inputs[MXQ_INPUT_COUNT];
    mxq_hsplit_work work;
    int max_batches;      /* the most micro-batches a rank has */
    int adds;             /* the exchanges this rank joined in the current layer */
    int exchange_failed;  /* one of them failed: every rank knows */
    mxq_layer_record *records;
    const mxq_layer_hooks *hooks; /* layers done before, a restart from the store */
} spread_run;

/* Whether every quantized linear's GPTQ goes to the grid (and there is one). */
static int every_gptq_on_grid(const mxq_recipe *recipe, const mxq_model_config *cfg, int size, int grid_min_inputs)
{
    const mxq_gptq_options *o = mxq_recipe_gptq(recipe);
    if (size < 2 || !o || grid_min_inputs <= 0 || recipe->calib_mode != MXQ_CALIB_FP)
        return 0;
    int any = 0;
    for (int l = 0; l < cfg->n_layers; l++)
        for (int li = 0; li < MXQ_LIN_COUNT; li++) {
            int out, in;
            mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
            if (!mxq_recipe_quantizes_linear(recipe, l, (mxq_linear_id)li))
                continue;
            if (in < grid_min_inputs || !mxq_gptq_grid_applies(&recipe->weights, o, (size_t)in, size))
                return 0;
            any = 1;
        }
    return any;
}

/* Whether the group spreads its statistics; if not though every GPTQ goes
 * to the grid, why (else "" in why). */
static int spread_verdict(const mxq_recipe *recipe, const mxq_model_config *cfg, int size, int grid_min_inputs,
                          char *why, size_t n)
{
    why[0] = '\0';
    if (!every_gptq_on_grid(recipe, cfg, size, grid_min_inputs))
        return 0;
    const mxq_gptq_options *o = mxq_recipe_gptq(recipe);
    const int nb = mxq_gptq_batch_width(&recipe->weights, o);
    if (o->act_order)
        snprintf(why, n, "gptq.act_order is on (the spread block rows are in input order)");
    for (int i = 0; i < MXQ_INPUT_COUNT && !why[0]; i++)
        if (!mxq_hsplit_applies(mxq_input_features(cfg, (mxq_input_id)i), nb, recipe->weights.block))
            snprintf(why, n, "%s's %d features are not whole lazy batches of %d", mxq_input_name((mxq_input_id)i),
                     mxq_input_features(cfg, (mxq_input_id)i), nb);
    return !why[0];
}

int mxq_group_spread_applies(const mxq_recipe *recipe, const mxq_model_config *cfg, int size, int grid_min_inputs)
{
    char why[160];
    return spread_verdict(recipe, cfg, size, grid_min_inputs, why, sizeof(why));
}

void mxq_group_log_why_whole(mxq_ctx *ctx, const mxq_dist *dist, const mxq_recipe *recipe,
                             const mxq_model_config *cfg, int grid_min_inputs)
{
    char why[160];
    if (!spread_verdict(recipe, cfg, dist->size, grid_min_inputs, why, sizeof(why)) && why[0] && dist->rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "the statistics stay whole on the layers' owners, not spread over the ranks: %s",
                why);
}

static mxq_status observe(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                          int features)
{
    (void)layer; /* one layer runs at a time */
    (void)features;
    spread_run *s = user;
    s->adds++;
    mxq_status st = mxq_hsplit_add(ctx, s->dist, &s->inputs[input], &s->work, x, tokens, MXQ_OK);
    s->exchange_failed |= st != MXQ_OK;
    return st;
}

static mxq_status spread_setup(mxq_ctx *ctx, spread_run *s)
{
    mxq_status status = MXQ_OK;
    const mxq_model_config *cfg = &s->model->cfg;
    const int nb = mxq_gptq_batch_width(&s->recipe->weights, mxq_recipe_gptq(s->recipe));
    CALL(ctx, mxq_calib_share_create(ctx, s->dist, s->model, s->tokens, s->batch, mxq_group_first_layer(s->hooks) == 0,
                                     &s->share));
    s->records = calloc(s->dist->rank == 0 ? (size_t)s->dist->size : 1, sizeof(*s->records));
    CHECK_ALLOC(ctx, s->records, (size_t)s->dist->size * sizeof(*s->records), "the layer records");
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        CALL(ctx, mxq_hsplit_init(ctx, s->dist, mxq_input_features(cfg, (mxq_input_id)i), nb, &s->inputs[i]));
    CALL(ctx, mxq_hsplit_work_init(ctx, s->dist, mxq_layer_scales_max(cfg), nb,
                                   (size_t)s->batch * (size_t)s->tokens->seq_len, &s->work));
fail:
    return status;
}

/* Micro-batch mb of this rank's share through layer l, or (past its last)
 * its part in the exchanges of the ranks that have one. */
static mxq_status forward_batch(mxq_ctx *ctx, spread_run *s, int l, int mb)
{
    mxq_status status = MXQ_OK;
    mxq_observer obs = {observe, s};
    if (mb < mxq_calib_share_batches(&s->share)) {
        int n;
        float *x = mxq_calib_share_batch(&s->share, mb, &n);
        CALL(ctx, mxq_model_run_layers_observed(ctx, s->model, l, l + 1, x, n, s->tokens->seq_len, NULL, &obs, s->ws));
        return MXQ_OK;
    }
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        CALL(ctx, observe(ctx, s, l, (mxq_input_id)i, NULL, 0, 0));
fail:
    return status;
}

/* Layer l converted and run on the share, its statistics spread. A rank
 * that fails outside an exchange joins the next one with its failure, so
 * that no rank waits there for it. */
static mxq_status spread_forward(mxq_ctx *ctx, spread_run *s, int l)
{
    mxq_status local = mxq_fault_point(ctx, "spread.layer");
    s->adds = 0;
    s->exchange_failed = 0;
    if (local == MXQ_OK)
        local = mxq_model_layer_load(ctx, s->model, l);
    if (local == MXQ_OK) /* the checkpoint's pages: given back as soon as the layer is float32 */
        local = mxq_model_layer_release_pages(ctx, s->model, l);
    if (local == MXQ_OK)
        local = mxq_workspace_create(ctx, &s->model->cfg, s->batch, s->tokens->seq_len, &s->ws);
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        mxq_hsplit_zero(&s->inputs[i]);
    for (int mb = 0; mb < s->max_batches && local == MXQ_OK; mb++)
        local = forward_batch(ctx, s, l, mb);
    mxq_workspace_free(s->ws);
    s->ws = NULL;
    if (local != MXQ_OK && !s->exchange_failed && s->adds < s->max_batches * MXQ_INPUT_COUNT)
        (void)mxq_hsplit_add(ctx, s->dist, &s->inputs[0], &s->work, NULL, 0, local);
    return local;
}

/* The owner quantizes layer l, every rank serving its Hessian requests. */
static mxq_status spread_quantize(mxq_ctx *ctx, spread_run *s, int l, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK, local;
    const int owner = l % s->dist->size;
    mxq_hsplit_server sv;
    mxq_hsplit_server_init(&sv, s->dist, owner, l, s->recipe, s->inputs);
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        CALL(ctx, mxq_hsplit_finish(ctx, s->dist, &s->inputs[i], owner, mxq_input_name((mxq_input_id)i)));
    if (s->dist->rank == owner) {
        mxq_layer_stats stats;
        for (int i = 0; i < MXQ_INPUT_COUNT; i++)
            stats.input[i] = s->inputs[i].abs; /* no hessian: spread */
        local = mxq_quantize_layer_remote(ctx, s->recipe, &s->model->cfg, l,
                                          &s->model->layers[l - s->model->first_layer], &stats, &sv.ops, res);
        CALL(ctx, mxq_hsplit_end(ctx, &sv));
    } else { /* serve whatever happened here: the owner's requests wait for every rank */
        local = mxq_model_layer_unload(ctx, s->model, l);
        mxq_status served = mxq_hsplit_serve(ctx, &sv);
        local = local != MXQ_OK ? local : served;
    }
    AGREE(ctx, s->dist, "spread.quantize", local);
fail:
    return status;
}

/* On the owner: layer l recorded, and only what the shard writes kept. */
static mxq_status keep_and_record(mxq_ctx *ctx, mxq_model *model, const mxq_layer_hooks *hooks, int l,
                                  const mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_layer_hook_record(ctx, hooks, l, &model->layers[l - model->first_layer], res));
    CALL(ctx, mxq_layer_keep_written(ctx, model, l, res));
fail:
    return status;
}

static void spread_free(spread_run *s)
{
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        mxq_hsplit_free(&s->inputs[i]);
    mxq_hsplit_work_free(&s->work);
    mxq_calib_share_free(&s->share);
    mxq_workspace_free(s->ws);
    free(s->records);
}

mxq_status mxq_calibrate_group_spread(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                                      const mxq_recipe *recipe, int batch, mxq_act_store *store,
                                      const mxq_layer_hooks *hooks, mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    spread_run s = {.dist = dist, .model = model, .tokens = tokens, .recipe = recipe, .batch = batch, .hooks = hooks};
    const int L = model->cfg.n_layers;
    for (int l = 0; l < L; l++)
        results[l].layer = -1;
    AGREE(ctx, dist, "spread.setup", spread_setup(ctx, &s));
    CALL(ctx, mxq_calib_share_restart(ctx, dist, hooks, store, &s.share));
    s.max_batches = mxq_calib_share_batches(&s.share);
    CALL_MPI(ctx, dist->comm, MPI_Allreduce(MPI_IN_PLACE, &s.max_batches, 1, MPI_INT, MPI_MAX, dist->comm));
    if (dist->rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO,
                "statistics spread over the %d ranks (each holds 1/%d of every Hessian), GPTQ of every linear on their "
                "grid, one layer at a time",
                dist->size, dist->size);
    for (int l = mxq_group_first_layer(hooks); l < L; l++) {
        const int owner = l % dist->size;
        double t0 = mxq_time_now();
        if (store)
            CALL(ctx, mxq_act_store_write(ctx, dist, store, l, s.share.first, s.share.n, s.share.acts));
        if (mxq_layer_done(hooks, l)) {
            AGREE(ctx, dist, "spread.forward", mxq_calib_share_skip_layer(ctx, model, &s.share, l, NULL));
            continue;
        }
        AGREE(ctx, dist, "spread.forward", spread_forward(ctx, &s, l));
        results[l].seconds_calib = mxq_time_now() - t0;
        CALL(ctx, spread_quantize(ctx, &s, l, &results[l]));
        AGREE(ctx, dist, "spread.keep", dist->rank == owner ? keep_and_record(ctx, model, hooks, l, &results[l]) : MXQ_OK);
        CALL(ctx, mxq_group_log_layers(ctx, dist, model, results, dist->rank == owner ? l : -1, s.records));
    }
fail:
    spread_free(&s);
    return status;
}
