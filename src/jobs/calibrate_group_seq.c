/* Sequential calibration by one data-parallel group of ranks.
 *
 * Each layer is calibrated on the outputs of the quantized layers before
 * it, as in the pipeline (calibrate.c), but every rank works on every
 * layer: on its share of the calibration sequences it gathers the layer's
 * input statistics, and after quantization it runs the share through the
 * quantized layer. In between, the layer's four inputs are spread over the
 * ranks (input_owners: the costliest first, each to the least loaded rank).
 * An input's statistics are summed onto its owner, which searches its
 * SmoothQuant/AWQ scales; every scale vector goes to every rank, which all
 * fold it into their copy of the layer in the same order (so the copies
 * stay equal: o_proj's scales reach v_proj's rows, down_proj's up_proj's,
 * on whichever rank holds them). The owner then clips and rounds its
 * inputs' linears, broadcasts the rounded weights for the forward pass,
 * and sends the packed ones to the layer's writer, rank l % size.
 *
 * A rank holds one layer in float32, one set of statistics, its share of
 * the activations and a micro-batch. As in the fp group, the statistics
 * are summed over ranks and each rank's Gram products run over its own
 * groupings of tokens, so the last bits depend on the rank count. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "algo/layer_quant.h"
#include "core/alloc.h"
#include "jobs/jobs_internal.h"
#include "model/lazy.h"
#include "parallel/pipeline.h"

typedef struct {
    const mxq_dist *dist;
    mxq_model *model; /* lazy, every layer */
    const mxq_tokens *tokens;
    const mxq_recipe *recipe;
    int batch;
    mxq_calib_share share;
    float *tmp; /* [batch, seq_len, hidden]: a micro-batch for the statistics pass, which must not change the share */
    mxq_workspace *ws;
    mxq_layer_stats stats;        /* this share's; each input's summed onto its owner */
    int owner[MXQ_INPUT_COUNT];   /* the rank quantizing the linears reading each input; -1: none */
    double *scales[MXQ_INPUT_COUNT]; /* [largest in_features + 1]: a step's scales and, last, its alpha */
    mxq_layer_record *records;    /* rank 0: [size] */
    const mxq_layer_hooks *hooks; /* the records of layers, a restart from the store */
} seq_group;

/* GPTQ's flops, roughly, of the quantized linears reading `input`: the
 * factor in double (2/3 n^3 float-equivalent) and the updates (m n^2). */
static double input_cost(const seq_group *g, int layer, mxq_input_id input)
{
    double cost = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        if (mxq_linear_input((mxq_linear_id)li) != input || !mxq_recipe_quantizes_linear(g->recipe, layer, li))
            continue;
        mxq_linear_shape(&g->model->cfg, (mxq_linear_id)li, &out, &in);
        cost += (double)out * in * in + 2.0 / 3.0 * in * (double)in * in;
    }
    return cost;
}

/* The owners of layer l's inputs: the costliest input first, each to the
 * least loaded rank (the lowest on ties). Every rank computes the same. */
static void input_owners(seq_group *g, int layer)
{
    double load[MXQ_INPUT_COUNT] = {0}, cost[MXQ_INPUT_COUNT];
    int done[MXQ_INPUT_COUNT] = {0};
    const int ranks = g->dist->size < MXQ_INPUT_COUNT ? g->dist->size : MXQ_INPUT_COUNT;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        cost[i] = input_cost(g, layer, (mxq_input_id)i);
        g->owner[i] = -1;
    }
    for (int step = 0; step < MXQ_INPUT_COUNT; step++) {
        int pick = -1, to = 0;
        for (int i = 0; i < MXQ_INPUT_COUNT; i++)
            if (!done[i] && cost[i] > 0 && (pick < 0 || cost[i] > cost[pick]))
                pick = i;
        if (pick < 0)
            return;
        for (int r = 1; r < ranks; r++)
            to = load[r] < load[to] ? r : to;
        done[pick] = 1;
        g->owner[pick] = to;
        load[to] += cost[pick];
    }
}

static mxq_status seq_setup(mxq_ctx *ctx, seq_group *g)
{
    mxq_status status = MXQ_OK;
    const size_t mb_floats = (size_t)g->batch * g->tokens->seq_len * g->model->cfg.hidden;
    const size_t scale_len = (size_t)mxq_layer_scales_max(&g->model->cfg) + 1;
    CALL(ctx, mxq_calib_share_create(ctx, g->dist, g->model, g->tokens, g->batch, mxq_group_first_layer(g->hooks) == 0,
                                     &g->share));
    g->tmp = mxq_alloc_floats(mb_floats);
    CHECK_ALLOC(ctx, g->tmp, mb_floats * sizeof(float), "a micro-batch of activations");
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        g->scales[i] = malloc(scale_len * sizeof(double));
        CHECK_ALLOC(ctx, g->scales[i], scale_len * sizeof(double), "scales");
    }
    g->records = calloc(g->dist->rank == 0 ? (size_t)g->dist->size : 1, sizeof(*g->records));
    CHECK_ALLOC(ctx, g->records, (size_t)g->dist->size * sizeof(*g->records), "the layer records");
    CALL(ctx, mxq_workspace_create(ctx, &g->model->cfg, g->batch, g->tokens->seq_len, &g->ws));
    CALL(ctx, mxq_layer_stats_init(ctx, &g->model->cfg, &g->stats));
fail:
    return status;
}

static mxq_status observe(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                          int features)
{
    (void)layer; /* one layer runs at a time */
    (void)features;
    seq_group *g = user;
    return mxq_input_stats_add(ctx, &g->stats.input[input], x, tokens);
}

/* Layer l converted and run on copies of the share's micro-batches, with
 * its inputs' statistics gathered (local). */
static mxq_status stats_pass(mxq_ctx *ctx, seq_group *g, int l)
{
    mxq_status status = MXQ_OK;
    mxq_observer obs = {observe, g};
    CALL(ctx, mxq_fault_point(ctx, "group.sequential.layer"));
    CALL(ctx, mxq_model_layer_load(ctx, g->model, l));
    mxq_layer_stats_zero(&g->stats);
    for (int mb = 0; mb < mxq_calib_share_batches(&g->share); mb++) {
        int n;
        const float *x = mxq_calib_share_batch(&g->share, mb, &n);
        memcpy(g->tmp, x, (size_t)n * g->share.seq_len * g->share.hidden * sizeof(float));
        CALL(ctx, mxq_model_run_layers_observed(ctx, g->model, l, l + 1, g->tmp, n, g->share.seq_len, NULL, &obs,
                                                g->ws));
    }
fail:
    return status;
}

/* Each input's statistics summed onto its owner, which finishes them. */
static mxq_status reduce_to_owners(mxq_ctx *ctx, seq_group *g)
{
    mxq_status status = MXQ_OK;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        if (g->owner[i] < 0)
            continue;
        CALL(ctx, mxq_input_stats_reduce(ctx, g->dist, &g->stats.input[i], g->owner[i]));
        if (g->owner[i] == g->dist->rank)
            mxq_input_stats_finish(&g->stats.input[i]);
    }
fail:
    return status;
}

/* Scale step k: each owner searches its inputs' scales, then every rank
 * receives and folds them all, in input order. */
static mxq_status spread_scale_step(mxq_ctx *ctx, seq_group *g, mxq_layer_quant *q, int k)
{
    mxq_status status = MXQ_OK, local = MXQ_OK;
    for (int i = 0; i < MXQ_INPUT_COUNT && local == MXQ_OK; i++)
        if (mxq_layer_scale_applies(q, k, (mxq_input_id)i) && g->owner[i] == g->dist->rank)
            local = mxq_layer_scale_search(ctx, q, k, (mxq_input_id)i, g->scales[i],
                                           &g->scales[i][mxq_input_features(&g->model->cfg, (mxq_input_id)i)]);
    AGREE(ctx, g->dist, "group.sequential.scales", local);
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        const int n = mxq_input_features(&g->model->cfg, (mxq_input_id)i);
        if (!mxq_layer_scale_applies(q, k, (mxq_input_id)i))
            continue;
        CALL_MPI(ctx, g->dist->comm, MPI_Bcast(g->scales[i], n + 1, MPI_DOUBLE, g->owner[i], g->dist->comm));
        if (local == MXQ_OK) /* the statistics are here or on their owner: a local fold */
            local = mxq_layer_scale_fold(ctx, q, k, (mxq_input_id)i, g->scales[i], g->scales[i][n]);
    }
    AGREE(ctx, g->dist, "group.sequential.fold", local);
fail:
    return status;
}

/* This rank's linears: clipped, rounded, packed, measured (local). */
static mxq_status quantize_own_linears(mxq_ctx *ctx, const seq_group *g, mxq_layer_quant *q)
{
    mxq_status status = MXQ_OK;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        if (!q->quantized[li] || g->owner[mxq_linear_input((mxq_linear_id)li)] != g->dist->rank)
            continue;
        CALL(ctx, mxq_linear_quant_prepare(ctx, q, (mxq_linear_id)li));
        CALL(ctx, mxq_linear_quant_round(ctx, q, (mxq_linear_id)li));
        CALL(ctx, mxq_linear_quant_finish(ctx, q, (mxq_linear_id)li));
    }
fail:
    return status;
}

/* What the writer needs of a linear quantized elsewhere, besides its bytes. */
typedef struct {
    double loss_rtn, loss, seconds;
    int dead_channels;
} linear_meta;

/* Linear li's packed weights and scales, from its owner to the writer. */
static mxq_status send_to_writer(mxq_ctx *ctx, const seq_group *g, mxq_layer_quant *q, mxq_linear_id li, int from,
                                 int writer)
{
    mxq_status status = MXQ_OK;
    mxq_linear_result *r = &q->res->linear[li];
    const MPI_Comm comm = g->dist->comm;
    linear_meta meta = {r->loss_rtn, r->loss, r->seconds, r->dead_channels};
    if (g->dist->rank == from) {
        CALL_MPI(ctx, comm, MPI_Send(&meta, (int)sizeof(meta), MPI_BYTE, writer, MXQ_TAG_DATA, comm));
        CALL_MPI(ctx, comm, MPI_Send(r->packed, (int)r->packed_bytes, MPI_BYTE, writer, MXQ_TAG_DATA, comm));
        CALL_MPI(ctx, comm, MPI_Send(r->scales, (int)r->scales_bytes, MPI_BYTE, writer, MXQ_TAG_DATA, comm));
    } else {
        CALL_MPI(ctx, comm, MPI_Recv(&meta, (int)sizeof(meta), MPI_BYTE, from, MXQ_TAG_DATA, comm, MPI_STATUS_IGNORE));
        CALL_MPI(ctx, comm,
                 MPI_Recv(r->packed, (int)r->packed_bytes, MPI_BYTE, from, MXQ_TAG_DATA, comm, MPI_STATUS_IGNORE));
        CALL_MPI(ctx, comm,
                 MPI_Recv(r->scales, (int)r->scales_bytes, MPI_BYTE, from, MXQ_TAG_DATA, comm, MPI_STATUS_IGNORE));
        *r = (mxq_linear_result){.quantized = 1,
                                 .bias_modified = r->bias_modified,
                                 .loss_rtn = meta.loss_rtn,
                                 .loss = meta.loss,
                                 .seconds = meta.seconds,
                                 .dead_channels = meta.dead_channels,
                                 .packed = r->packed,
                                 .scales = r->scales,
                                 .packed_bytes = r->packed_bytes,
                                 .scales_bytes = r->scales_bytes};
    }
fail:
    return status;
}

/* The writer's room for the linears quantized elsewhere (local). */
static mxq_status writer_room(mxq_ctx *ctx, const seq_group *g, mxq_layer_quant *q)
{
    mxq_status status = MXQ_OK;
    const mxq_mx_spec *spec = &q->recipe->weights;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        mxq_linear_result *r = &q->res->linear[li];
        int out, in;
        if (!q->quantized[li] || g->owner[mxq_linear_input((mxq_linear_id)li)] == g->dist->rank)
            continue;
        mxq_linear_shape(q->cfg, (mxq_linear_id)li, &out, &in);
        r->packed_bytes = (size_t)out * mxq_mx_packed_row_bytes(spec->format, (size_t)in);
        r->scales_bytes = (size_t)out * mxq_mx_blocks_per_row((size_t)in, spec->block);
        r->packed = mxq_alloc_lasting(r->packed_bytes);
        r->scales = mxq_alloc_lasting(r->scales_bytes);
        CHECK_ALLOC(ctx, r->packed && r->scales, r->packed_bytes + r->scales_bytes, "a linear's packed weights");
    }
fail:
    return status;
}

/* The rounded weights to every rank (for the forward pass), the packed ones
 * and the phases' longest times to the writer. */
static mxq_status share_linears(mxq_ctx *ctx, seq_group *g, mxq_layer_quant *q, int writer)
{
    mxq_status status = MXQ_OK;
    AGREE(ctx, g->dist, "group.sequential.room", g->dist->rank == writer ? writer_room(ctx, g, q) : MXQ_OK);
    /* a packed linear goes in one message (a 70B down_proj packs to 117 MB) */
    int fits = 1;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(q->cfg, (mxq_linear_id)li, &out, &in);
        fits &= !q->quantized[li] || (size_t)out * mxq_mx_packed_row_bytes(q->recipe->weights.format, (size_t)in) <= INT_MAX;
    }
    CHECK_AGREED(ctx, g->dist, "group.sequential.sizes", fits, MXQ_ERR_ARG,
                 "layer %d: a quantized linear packs to more than one MPI message holds (2 GB)", q->layer);
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        const int from = g->owner[mxq_linear_input((mxq_linear_id)li)];
        int out, in;
        if (!q->quantized[li])
            continue;
        mxq_linear_shape(q->cfg, (mxq_linear_id)li, &out, &in);
        CALL(ctx, mxq_bcast_floats(ctx, g->dist, q->L->weight[li], (size_t)out * in, from));
        if (from != writer && (g->dist->rank == from || g->dist->rank == writer))
            CALL(ctx, send_to_writer(ctx, g, q, (mxq_linear_id)li, from, writer));
    }
    mxq_layer_result *res = q->res;
    double phases[MXQ_PHASE_COUNT] = {res->seconds_scales, res->seconds_clip, res->seconds_gptq, res->seconds_pack,
                                      res->seconds_loss};
    CALL_MPI(ctx, g->dist->comm,
             MPI_Reduce(g->dist->rank == writer ? MPI_IN_PLACE : phases, phases, MXQ_PHASE_COUNT, MPI_DOUBLE, MPI_MAX,
                        writer, g->dist->comm));
    res->seconds_scales = phases[MXQ_PHASE_SCALES];
    res->seconds_clip = phases[MXQ_PHASE_CLIP];
    res->seconds_gptq = phases[MXQ_PHASE_GPTQ];
    res->seconds_pack = phases[MXQ_PHASE_PACK];
    res->seconds_loss = phases[MXQ_PHASE_LOSS];
fail:
    return status;
}

/* Layer l quantized by the group: scales searched by the inputs' owners and
 * folded everywhere, linears quantized by their input's owner and shared.
 * On return every rank holds the quantized layer; res is the writer's. */
static mxq_status spread_quantize(mxq_ctx *ctx, seq_group *g, int l, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    mxq_layer_quant q;
    int here[MXQ_INPUT_COUNT], begun = 0;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        here[i] = g->owner[i] == g->dist->rank;
    mxq_status local = mxq_layer_quant_begin_part(ctx, &q, g->recipe, &g->model->cfg, l,
                                                  &g->model->layers[l - g->model->first_layer], &g->stats, here, NULL,
                                                  res);
    begun = 1;
    AGREE(ctx, g->dist, "group.sequential.begin", local);
    for (int k = 0; k < g->recipe->n_steps; k++)
        if (g->recipe->steps[k].kind != MXQ_ALGO_GPTQ)
            CALL(ctx, spread_scale_step(ctx, g, &q, k));
    AGREE(ctx, g->dist, "group.sequential.linears", quantize_own_linears(ctx, g, &q));
    CALL(ctx, share_linears(ctx, g, &q, l % g->dist->size));
fail:
    if (begun)
        mxq_layer_quant_end(&q);
    return status;
}

/* The share run through the quantized layer l (activations quantized as at
 * run time). Local. */
static mxq_status forward_quantized(mxq_ctx *ctx, seq_group *g, int l)
{
    mxq_status status = MXQ_OK;
    mxq_fake_quant fq = {0};
    fq.enabled_acts = g->recipe->has_acts;
    if (g->recipe->has_acts)
        fq.acts = g->recipe->acts;
    for (int mb = 0; mb < mxq_calib_share_batches(&g->share); mb++) {
        int n;
        float *x = mxq_calib_share_batch(&g->share, mb, &n);
        CALL(ctx, mxq_model_run_layers(ctx, g->model, l, l + 1, x, n, g->share.seq_len, &fq, g->ws));
    }
fail:
    return status;
}

/* After the next layer's inputs are in the store (a record says the layer
 * is done: a resumed run reads on from there): the writer records layer l
 * and keeps what it writes, the others give the layer back (local). */
static mxq_status finish_layer(mxq_ctx *ctx, seq_group *g, int l, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    if (l % g->dist->size == g->dist->rank) {
        CALL(ctx, mxq_layer_hook_record(ctx, g->hooks, l, &g->model->layers[l - g->model->first_layer], res));
        CALL(ctx, mxq_layer_keep_written(ctx, g->model, l, res));
    } else {
        mxq_layer_result_free(res);
        *res = (mxq_layer_result){.layer = -1};
        CALL(ctx, mxq_model_layer_unload(ctx, g->model, l));
    }
fail:
    return status;
}

/* One layer: statistics, quantization, the quantized forward pass. */
static mxq_status seq_layer(mxq_ctx *ctx, seq_group *g, int l, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    double t0 = mxq_time_now();
    AGREE(ctx, g->dist, "group.sequential.statistics", stats_pass(ctx, g, l));
    input_owners(g, l);
    CALL(ctx, reduce_to_owners(ctx, g));
    const double t1 = mxq_time_now();
    CALL(ctx, spread_quantize(ctx, g, l, res));
    const double t2 = mxq_time_now();
    AGREE(ctx, g->dist, "group.sequential.forward", forward_quantized(ctx, g, l));
    res->seconds_calib = (t1 - t0) + (mxq_time_now() - t2);
fail:
    return status;
}

static void seq_group_free(seq_group *g)
{
    mxq_layer_stats_free(&g->stats);
    mxq_calib_share_free(&g->share);
    free(g->tmp);
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        free(g->scales[i]);
    free(g->records);
    mxq_workspace_free(g->ws);
}

mxq_status mxq_calibrate_group_sequential(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model,
                                          const mxq_tokens *tokens, const mxq_recipe *recipe, int batch,
                                          mxq_act_store *store, const mxq_layer_hooks *hooks,
                                          mxq_layer_result *results)
{
    mxq_status status = MXQ_OK;
    seq_group g = {.dist = dist, .model = model, .tokens = tokens, .recipe = recipe, .batch = batch, .hooks = hooks};
    const int L = model->cfg.n_layers;
    for (int l = 0; l < L; l++)
        results[l].layer = -1;
    AGREE(ctx, dist, "group.sequential.setup", seq_setup(ctx, &g));
    CALL(ctx, mxq_calib_share_restart(ctx, dist, hooks, store, &g.share));
    const int first = mxq_group_first_layer(hooks);
    if (store)
        CALL(ctx, mxq_act_store_write(ctx, dist, store, first, g.share.first, g.share.n, g.share.acts));
    for (int l = first; l < L; l++) {
        CALL(ctx, seq_layer(ctx, &g, l, &results[l]));
        if (store && l + 1 < L) /* the quantized layer's outputs: the next layer's inputs */
            CALL(ctx, mxq_act_store_write(ctx, dist, store, l + 1, g.share.first, g.share.n, g.share.acts));
        AGREE(ctx, dist, "group.sequential.finish", finish_layer(ctx, &g, l, &results[l]));
        CALL(ctx, mxq_group_log_layers(ctx, dist, model, results, l % dist->size == dist->rank ? l : -1, g.records));
    }
fail:
    seq_group_free(&g);
    return status;
}
