/* One decoder layer through the recipe: SmoothQuant or AWQ scales (folded
 * into the op before each input), AWQ clipping, then GPTQ-MX or
 * round-to-nearest for every linear.
 *
 * Every fold target lies in the same decoder layer (norms -> q/k/v and
 * gate/up, v_proj rows -> o_proj, up_proj rows -> down_proj), and a layer is
 * never split between ranks, so the scales never leave the rank that owns
 * the layer. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "mxq/gptq.h"
#include "mxq/quantize.h"

static void group_of(const mxq_model_config *cfg, mxq_layer *L, mxq_input_id input, const int *quantized,
                     int only_quantized, mxq_linear_group *g, mxq_linear_id *ids)
{
    memset(g, 0, sizeof(*g));
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        if (mxq_linear_input((mxq_linear_id)li) != input || (only_quantized && !quantized[li]))
            continue;
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        ids[g->n] = (mxq_linear_id)li;
        g->weight[g->n] = L->weight[li];
        g->out[g->n] = out;
        g->in = in;
        g->n++;
    }
}

/* Fold s into the group reading `input`: the input becomes X diag(1/s)
 * (through the op that produces it) and the weights W diag(s). */
static void fold_scales(const mxq_model_config *cfg, mxq_layer *L, mxq_input_id input, const double *s,
                        mxq_layer_stats *stats, mxq_layer_result *res)
{
    mxq_linear_group g;
    mxq_linear_id ids[4];
    int none[MXQ_LIN_COUNT] = {0};
    group_of(cfg, L, input, none, 0, &g, ids);
    for (int k = 0; k < g.n; k++) {
        mxq_scale_columns(g.weight[k], g.out[k], g.in, s);
        res->linear[ids[k]].weight_modified = 1;
    }
    int d = cfg->hidden;
    switch (input) {
    case MXQ_INPUT_ATTN:
        for (int j = 0; j < d; j++)
            L->attn_norm[j] = (float)((double)L->attn_norm[j] / s[j]);
        res->attn_norm_modified = 1;
        break;
    case MXQ_INPUT_MLP:
        for (int j = 0; j < d; j++)
            L->ffn_norm[j] = (float)((double)L->ffn_norm[j] / s[j]);
        res->ffn_norm_modified = 1;
        break;
    case MXQ_INPUT_O: {
        int out, in;
        mxq_linear_shape(cfg, MXQ_LIN_V, &out, &in);
        mxq_unscale_rows(L->weight[MXQ_LIN_V], L->bias[MXQ_LIN_V], out, in, s);
        res->linear[MXQ_LIN_V].weight_modified = 1;
        res->linear[MXQ_LIN_V].bias_modified = L->bias[MXQ_LIN_V] != NULL;
        break;
    }
    case MXQ_INPUT_DOWN: {
        int out, in;
        mxq_linear_shape(cfg, MXQ_LIN_UP, &out, &in);
        mxq_unscale_rows(L->weight[MXQ_LIN_UP], NULL, out, in, s);
        res->linear[MXQ_LIN_UP].weight_modified = 1;
        break;
    }
    default: break;
    }
    mxq_input_stats_rescale(&stats->input[input], s);
}

/* o_proj's input is v_proj's output only when each attention head has its
 * own value head (no GQA) and the attention mixes positions, not channels. */
static int can_fold(const mxq_model_config *cfg, mxq_input_id input)
{
    return input != MXQ_INPUT_O || cfg->n_heads == cfg->n_kv_heads;
}

static mxq_status run_scale_step(mxq_ctx *ctx, const mxq_algo_step *step, const mxq_mx_spec *spec,
                                 const mxq_model_config *cfg, int layer, mxq_layer *L, mxq_layer_stats *stats,
                                 const int *quantized, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    double *s = NULL;
    for (int input = 0; input < MXQ_INPUT_COUNT; input++) {
        /* SmoothQuant folds into the RMSNorms only, as in the paper. */
        if (step->kind == MXQ_ALGO_SMOOTHQUANT && input != MXQ_INPUT_ATTN && input != MXQ_INPUT_MLP)
            continue;
        if (!can_fold(cfg, (mxq_input_id)input))
            continue;
        mxq_linear_group g;
        mxq_linear_id ids[4];
        group_of(cfg, L, (mxq_input_id)input, quantized, 1, &g, ids);
        if (g.n == 0)
            continue;
        mxq_input_stats *in = &stats->input[input];
        free(s);
        s = malloc((size_t)g.in * sizeof(double));
        CHECK_ALLOC(ctx, s, (size_t)g.in * sizeof(double), "scales");
        if (step->kind == MXQ_ALGO_SMOOTHQUANT) {
            CALL(ctx, mxq_smoothquant_scales(ctx, &g, in->abs_max, step->smoothquant.alpha, s));
            res->smooth_alpha[input] = step->smoothquant.alpha;
        } else {
            double *mean = malloc((size_t)g.in * sizeof(double)), alpha = 0, loss = 0;
            CHECK_ALLOC(ctx, mean, (size_t)g.in * sizeof(double), "channel means");
            for (int j = 0; j < g.in; j++)
                mean[j] = in->n_tokens > 0 ? in->abs_sum[j] / in->n_tokens : 0.0;
            mxq_status st = mxq_awq_search(ctx, spec, &g, in->hessian, mean, step->awq.grid, s, &alpha, &loss);
            free(mean);
            if (st != MXQ_OK) {
                mxq_error_set(ctx, st, __FILE__, __LINE__, "AWQ on %s of layer %d failed",
                              mxq_input_name((mxq_input_id)input), layer);
                status = st;
                goto fail;
            }
            res->awq_alpha[input] = alpha;
            mxq_log(ctx, MXQ_LOG_DEBUG, "layer %d: awq on %s: alpha %.2f, loss %.4e", layer,
                    mxq_input_name((mxq_input_id)input), alpha, loss);
        }
        fold_scales(cfg, L, (mxq_input_id)input, s, stats, res);
    }
fail:
    free(s);
    return status;
}

static mxq_status quantize_linear(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_algo_step *gptq,
                                  const mxq_algo_step *awq, mxq_linear_id li, const mxq_model_config *cfg, int layer,
                                  mxq_layer *L, const mxq_input_stats *in, mxq_linear_result *r)
{
    mxq_status status = MXQ_OK;
    const mxq_mx_spec *spec = &recipe->weights;
    int out, inf;
    mxq_linear_shape(cfg, li, &out, &inf);
    const size_t n = (size_t)out * inf;
    float *w = L->weight[li], *ref = malloc(n * sizeof(float));
    char what[128];
    snprintf(what, sizeof(what), "layers.%d.%s", layer, mxq_linear_name(li));
    r->packed = malloc((size_t)out * mxq_mx_packed_row_bytes(spec->format, (size_t)inf));
    r->scales = malloc((size_t)out * mxq_mx_blocks_per_row((size_t)inf, spec->block));
    CHECK_ALLOC(ctx, ref && r->packed && r->scales, n * sizeof(float), what);
    memcpy(ref, w, n * sizeof(float));
    double t0 = mxq_time_now();
    /* AutoAWQ leaves q/k unclipped: their error is amplified through the
     * attention scores, which the per-block output loss does not see. */
    if (awq && awq->awq.clip && li != MXQ_LIN_Q && li != MXQ_LIN_K)
        CALL(ctx, mxq_awq_clip(ctx, spec, w, out, inf, in->hessian, awq->awq.clip_grid, awq->awq.max_shrink));
    if (gptq) {
        mxq_gptq_options opt = gptq->gptq;
        opt.skip_losses = 1;
        mxq_gptq_stats st;
        mxq_status s = mxq_gptq_quantize(ctx, spec, &opt, w, (size_t)out, (size_t)inf, in->hessian, in->n_tokens,
                                         r->scales, &st);
        if (s != MXQ_OK) {
            mxq_error_set(ctx, s, __FILE__, __LINE__, "GPTQ of %s failed", what);
            status = s;
            goto fail;
        }
        r->dead_channels = st.dead_channels;
        CALL(ctx, mxq_mx_pack_with_scales(ctx, spec, w, (size_t)out, (size_t)inf, r->scales, r->packed));
    } else {
        CALL(ctx, mxq_mx_quantize_rows(ctx, spec, w, (size_t)out, (size_t)inf, r->packed, r->scales, w));
    }
    CALL(ctx, mxq_quant_loss(ctx, ref, w, (size_t)out, (size_t)inf, in->hessian, &r->loss));
    r->seconds = mxq_time_now() - t0;
    r->quantized = 1;
    mxq_log(ctx, MXQ_LOG_DEBUG, "%s: %s loss %.4e (rtn %.4e), %.2f s", what, gptq ? "gptq" : "rtn", r->loss,
            r->loss_rtn, r->seconds);
    r->weight_modified = 0;
fail:
    free(ref);
    return status;
}

mxq_status mxq_quantize_layer(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, int layer,
                              mxq_layer *L, mxq_layer_stats *stats, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    int quantized[MXQ_LIN_COUNT] = {0};
    float *tmp = NULL;
    const mxq_algo_step *gptq = NULL, *awq = NULL;
    double t0 = mxq_time_now();
    res->layer = layer;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        res->awq_alpha[i] = res->smooth_alpha[i] = -1;
    if (!recipe->has_weights)
        goto done;

    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        char name[160];
        snprintf(name, sizeof(name), "model.layers.%d.%s", layer, mxq_linear_name((mxq_linear_id)li));
        int excluded = mxq_recipe_excludes(recipe, name);
        strncat(name, ".weight", sizeof(name) - strlen(name) - 1);
        excluded = excluded || mxq_recipe_excludes(recipe, name);
        quantized[li] = !excluded;
    }

    /* Round-to-nearest loss of the original weights: the baseline every
     * algorithm is reported against. */
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        if (!quantized[li])
            continue;
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        size_t n = (size_t)out * in;
        free(tmp);
        tmp = malloc(n * sizeof(float));
        CHECK_ALLOC(ctx, tmp, n * sizeof(float), "a weight copy");
        CALL(ctx, mxq_mx_quantize_rows(ctx, &recipe->weights, L->weight[li], (size_t)out, (size_t)in, NULL, NULL, tmp));
        const mxq_input_stats *st = &stats->input[mxq_linear_input((mxq_linear_id)li)];
        CALL(ctx, mxq_quant_loss(ctx, L->weight[li], tmp, (size_t)out, (size_t)in, st->hessian, &res->linear[li].loss_rtn));
    }

    for (int k = 0; k < recipe->n_steps; k++) {
        const mxq_algo_step *step = &recipe->steps[k];
        if (step->kind == MXQ_ALGO_GPTQ)
            gptq = step;
        else
            CALL(ctx, run_scale_step(ctx, step, &recipe->weights, cfg, layer, L, stats, quantized, res));
        if (step->kind == MXQ_ALGO_AWQ)
            awq = step;
    }
    if (gptq)
        CALL(ctx, mxq_gptq_check(ctx, &gptq->gptq, &recipe->weights));
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        if (quantized[li])
            CALL(ctx, quantize_linear(ctx, recipe, gptq, awq, (mxq_linear_id)li, cfg, layer, L,
                                      &stats->input[mxq_linear_input((mxq_linear_id)li)], &res->linear[li]));
done:
    res->seconds = mxq_time_now() - t0;
    res->peak_rss = mxq_peak_rss_bytes();
fail:
    free(tmp);
    return status;
}

void mxq_layer_result_free(mxq_layer_result *res)
{
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        free(res->linear[li].packed);
        free(res->linear[li].scales);
        res->linear[li].packed = res->linear[li].scales = NULL;
    }
}

mxq_status mxq_quantize_single_linear(mxq_ctx *ctx, const mxq_recipe *recipe, const float *weight, int out, int in,
                                      const mxq_input_stats *stats, float *q, double *loss_rtn, double *loss)
{
    mxq_status status = MXQ_OK;
    const size_t n = (size_t)out * in, f = (size_t)in;
    mxq_input_stats work = {0};
    double *total = malloc(f * sizeof(double)), *s = malloc(f * sizeof(double));
    const mxq_algo_step *gptq = NULL, *awq = NULL;
    CHECK(ctx, recipe->has_weights, MXQ_ERR_ARG, "the recipe quantizes no weights (weights: none)");
    CHECK_ALLOC(ctx, total && s, 2 * f * sizeof(double), "scales");
    CALL(ctx, mxq_input_stats_init(ctx, in, &work));
    memcpy(work.hessian, stats->hessian, f * f * sizeof(double));
    if (stats->abs_max)
        memcpy(work.abs_max, stats->abs_max, f * sizeof(double));
    if (stats->abs_sum)
        memcpy(work.abs_sum, stats->abs_sum, f * sizeof(double));
    work.n_tokens = stats->n_tokens;
    for (size_t j = 0; j < f; j++)
        total[j] = 1.0;

    CALL(ctx, mxq_mx_quantize_rows(ctx, &recipe->weights, weight, (size_t)out, (size_t)in, NULL, NULL, q));
    CALL(ctx, mxq_quant_loss(ctx, weight, q, (size_t)out, (size_t)in, stats->hessian, loss_rtn));
    memcpy(q, weight, n * sizeof(float));
    mxq_linear_group g = {1, {q}, {out}, in};
    for (int k = 0; k < recipe->n_steps; k++) {
        const mxq_algo_step *step = &recipe->steps[k];
        if (step->kind == MXQ_ALGO_GPTQ) {
            gptq = step;
            continue;
        }
        if (step->kind == MXQ_ALGO_SMOOTHQUANT) {
            CHECK(ctx, stats->abs_max != NULL, MXQ_ERR_ARG,
                  "smoothquant needs max|x| per input channel: give calibration inputs /X, not only /H");
            CALL(ctx, mxq_smoothquant_scales(ctx, &g, work.abs_max, step->smoothquant.alpha, s));
        } else {
            awq = step;
            CHECK(ctx, stats->abs_sum != NULL, MXQ_ERR_ARG,
                  "awq needs mean|x| per input channel: give calibration inputs /X, not only /H");
            double *mean = malloc(f * sizeof(double)), alpha, best;
            CHECK_ALLOC(ctx, mean, f * sizeof(double), "channel means");
            for (size_t j = 0; j < f; j++)
                mean[j] = work.n_tokens > 0 ? work.abs_sum[j] / work.n_tokens : 0.0;
            mxq_status st = mxq_awq_search(ctx, &recipe->weights, &g, work.hessian, mean, step->awq.grid, s, &alpha,
                                           &best);
            free(mean);
            CALL(ctx, st);
        }
        mxq_scale_columns(q, out, in, s);
        mxq_input_stats_rescale(&work, s);
        for (size_t j = 0; j < f; j++)
            total[j] *= s[j];
    }
    if (awq && awq->awq.clip)
        CALL(ctx, mxq_awq_clip(ctx, &recipe->weights, q, out, in, work.hessian, awq->awq.clip_grid,
                               awq->awq.max_shrink));
    if (gptq) {
        mxq_gptq_options opt = gptq->gptq;
        opt.skip_losses = 1;
        mxq_gptq_stats st;
        CALL(ctx, mxq_gptq_check(ctx, &opt, &recipe->weights));
        CALL(ctx, mxq_gptq_quantize(ctx, &recipe->weights, &opt, q, (size_t)out, (size_t)in, work.hessian,
                                    work.n_tokens > 0 ? work.n_tokens : 1.0, NULL, &st));
    } else {
        CALL(ctx, mxq_mx_quantize_rows(ctx, &recipe->weights, q, (size_t)out, (size_t)in, NULL, NULL, q));
    }
    for (size_t r = 0; r < (size_t)out; r++)
        for (size_t j = 0; j < f; j++)
            q[r * f + j] = (float)((double)q[r * f + j] / total[j]);
    CALL(ctx, mxq_quant_loss(ctx, weight, q, (size_t)out, (size_t)in, stats->hessian, loss));
fail:
    mxq_input_stats_free(&work);
    free(total);
    free(s);
    return status;
}
