/* The recipe on a decoder layer (mxq quantize) and on one linear (mxq
 * quantize-linear), through the same code: the scale search of a group of
 * linears sharing an input (compute_scales), the rules for which step
 * applies to which linear (the *_applies functions), and the quantization of
 * one weight (clip_weight: AWQ clipping; round_weight: GPTQ-MX or
 * round-to-nearest). A layer goes in phases (layer_quant.h) so that a job
 * can run a linear's GPTQ on a grid of ranks between them. What differs is where the scales go: in a layer they
 * fold into the op before each input (norms -> q/k/v and gate/up, v_proj
 * rows -> o_proj, up_proj rows -> down_proj); a linear on its own has no
 * such op, so its result is the effective weight Q(W diag s) diag(1/s).
 *
 * Every fold target lies in the same decoder layer. A caller that spreads
 * a layer's inputs over ranks searches each input's scales where its
 * statistics are and folds every input's scales into every copy of the
 * layer (mxq_layer_quant_begin_part and the scale steps after it). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "algo/hessian_ref.h"
#include "algo/layer_quant.h"
#include "core/check.h"
#include "mxq/gptq.h"
#include "mxq/quantize.h"

/* ---- which step applies to which linear ----------------------------------- */

/* SmoothQuant folds into the RMSNorms only, as in the paper: it applies to
 * the linears reading a normed input (and to a linear of no given role). */
static int smooth_applies(int role)
{
    if (role < 0)
        return 1;
    mxq_input_id in = mxq_linear_input((mxq_linear_id)role);
    return in == MXQ_INPUT_ATTN || in == MXQ_INPUT_MLP;
}

/* AutoAWQ leaves q/k unclipped: their error is amplified through the
 * attention scores, which the per-block output loss does not see. */
static int clip_applies(int role)
{
    return role != MXQ_LIN_Q && role != MXQ_LIN_K;
}

/* o_proj's input is v_proj's output only when each attention head has its
 * own value head (no GQA); otherwise there is nothing to fold AWQ into. */
static int layer_can_fold(const mxq_model_config *cfg, mxq_input_id input)
{
    return input != MXQ_INPUT_O || cfg->n_heads == cfg->n_kv_heads;
}

/* ---- shared by the layer and the single linear ---------------------------- */

/* Calibration statistics must be finite for any search to mean anything. */
static mxq_status check_stats_finite(mxq_ctx *ctx, const mxq_input_stats *in)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)in->features;
    for (size_t j = 0; j < f; j++) { /* a spread H's diagonal is checked where it lies */
        double h = in->hessian ? in->hessian[j * f + j] : 0.0;
        double amax = in->abs_max ? in->abs_max[j] : 0.0, asum = in->abs_sum ? in->abs_sum[j] : 0.0;
        CHECK(ctx, isfinite(h) && isfinite(amax) && isfinite(asum), MXQ_ERR_FORMAT,
              "the calibration statistics of input channel %zu are not finite (H = %g, max|x| = %g): the activations "
              "overflow float32",
              j, h, amax);
    }
fail:
    return status;
}

/* The scales s of a SmoothQuant or AWQ step on the group reading `in`. */
static mxq_status compute_scales(mxq_ctx *ctx, const mxq_algo_step *step, const mxq_mx_spec *spec,
                                 const mxq_linear_group *g, const mxq_input_stats *in, const mxq_hessian_ref *h,
                                 double *s, double *alpha)
{
    mxq_status status = MXQ_OK;
    double *mean = NULL, loss = 0;
    if (step->kind == MXQ_ALGO_SMOOTHQUANT) {
        CHECK(ctx, in->abs_max != NULL, MXQ_ERR_ARG,
              "smoothquant needs max|x| per input channel: give calibration inputs /X, not only /H");
        CALL(ctx, mxq_smoothquant_scales(ctx, g, in->abs_max, step->smoothquant.alpha, s));
        *alpha = step->smoothquant.alpha;
        return MXQ_OK;
    }
    CHECK(ctx, in->abs_sum != NULL, MXQ_ERR_ARG,
          "awq needs mean|x| per input channel: give calibration inputs /X, not only /H");
    mean = malloc((size_t)g->in * sizeof(double));
    CHECK_ALLOC(ctx, mean, (size_t)g->in * sizeof(double), "channel means");
    for (int j = 0; j < g->in; j++)
        mean[j] = in->n_tokens > 0 ? in->abs_sum[j] / in->n_tokens : 0.0;
    CALL_IN(ctx, mxq_awq_search_ref(ctx, spec, g, h, mean, &step->awq, s, alpha, &loss), "AWQ");
    mxq_log(ctx, MXQ_LOG_DEBUG, "awq: alpha %.2f, loss %.4e", *alpha, loss);
fail:
    free(mean);
    return status;
}

static const mxq_algo_step *find_step(const mxq_recipe *recipe, mxq_algo_kind kind)
{
    for (int k = 0; k < recipe->n_steps; k++)
        if (recipe->steps[k].kind == kind)
            return &recipe->steps[k];
    return NULL;
}

static mxq_status run_gptq(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_gptq_options *options, float *w, int out,
                           int in, const mxq_input_stats *stats, const mxq_hessian_ref *h, int role, uint8_t *scales,
                           int *dead)
{
    mxq_status status = MXQ_OK;
    mxq_gptq_options opt = *options;
    opt.skip_losses = 1; /* the caller's losses include clipping */
    mxq_gptq_stats st;
    if (!h->whole) {
        CALL(ctx, h->remote->gptq(ctx, h->remote->user, (mxq_linear_id)role, w, (size_t)out, (size_t)in,
                                  stats->n_tokens > 0 ? stats->n_tokens : 1.0, scales, dead));
        return MXQ_OK;
    }
    CALL(ctx, mxq_gptq_quantize(ctx, spec, &opt, w, (size_t)out, (size_t)in, h->whole,
                                stats->n_tokens > 0 ? stats->n_tokens : 1.0, scales, &st));
    *dead = st.dead_channels;
    mxq_log(ctx, MXQ_LOG_DEBUG, "gptq [%d x %d]: factor %.3f s, quantize %.3f s, updates %.3f s (%.0f GFLOP/s)", out,
            in, st.seconds_factor, st.seconds_quant, st.seconds_gemm,
            st.seconds_gemm > 0 ? st.gemm_flops / st.seconds_gemm / 1e9 : 0.0);
fail:
    return status;
}

/* AWQ clipping of w [out, in] in place, if the recipe asks for it and it
 * applies to `role`. */
static mxq_status clip_weight(mxq_ctx *ctx, const mxq_recipe *recipe, int role, float *w, int out, int in,
                              const mxq_hessian_ref *h)
{
    mxq_status status = MXQ_OK;
    const mxq_algo_step *awq = find_step(recipe, MXQ_ALGO_AWQ);
    if (awq && awq->awq.clip && clip_applies(role))
        CALL_IN(ctx,
                mxq_awq_clip_ref(ctx, &recipe->weights, w, out, in, h, awq->awq.clip_grid, awq->awq.max_shrink),
                "AWQ clipping");
fail:
    return status;
}

/* w [out, in] in place onto the MX grid: GPTQ-MX (scales may be NULL) or
 * round-to-nearest (which also packs, if packed is not NULL). */
static mxq_status round_weight(mxq_ctx *ctx, const mxq_recipe *recipe, int role, float *w, int out, int in,
                               const mxq_input_stats *stats, const mxq_hessian_ref *h, uint8_t *packed,
                               uint8_t *scales, int *dead)
{
    mxq_status status = MXQ_OK;
    const mxq_algo_step *gptq = find_step(recipe, MXQ_ALGO_GPTQ);
    *dead = 0;
    if (!gptq)
        CALL(ctx, mxq_mx_quantize_rows(ctx, &recipe->weights, w, (size_t)out, (size_t)in, packed, scales, w));
    else
        CALL(ctx, run_gptq(ctx, &recipe->weights, &gptq->gptq, w, out, in, stats, h, role, scales, dead));
fail:
    return status;
}

/* The report's losses of a layer's linear, tr(dW H dW^T): exact up to
 * 2 * REPORT_ROWS rows; above, estimated from every (out / REPORT_ROWS)-th
 * row and scaled to all rows (the same rows for RTN and the result), since
 * the exact figure costs 2 out in^2 flops each, more than GPTQ itself. */
enum { REPORT_ROWS = 256 };

static size_t report_stride(int out)
{
    return out < 2 * REPORT_ROWS ? 1 : (size_t)out / REPORT_ROWS;
}

/* Every stride-th row of w [out, in] into rows [out / stride, in]. */
static void sample_rows(const float *w, int out, int in, size_t stride, float *rows)
{
    for (size_t r = 0; r < (size_t)out / stride; r++)
        memcpy(rows + r * (size_t)in, w + r * stride * (size_t)in, (size_t)in * sizeof(float));
}

/* tr(dW H dW^T) of the sampled rows sa - sb [rows, n], scaled to out rows. */
static mxq_status sampled_loss(mxq_ctx *ctx, const float *sa, const float *sb, size_t rows, size_t n, int out,
                               const mxq_hessian_ref *h, double *loss)
{
    mxq_status status = MXQ_OK;
    float *d = NULL;
    if (h->whole) {
        CALL(ctx, mxq_quant_loss(ctx, sa, sb, rows, n, h->whole, loss));
    } else {
        d = mxq_alloc_floats(rows * n);
        CHECK_ALLOC(ctx, d, rows * n * sizeof(float), "the report's loss rows");
        for (size_t i = 0; i < rows * n; i++)
            d[i] = (float)((double)sa[i] - (double)sb[i]);
        CALL(ctx, h->remote->quadratic(ctx, h->remote->user, h->input, d, rows, rows, loss));
    }
    *loss *= (double)out / (double)rows;
fail:
    free(d);
    return status;
}

/* The report's loss of sa (w's sampled rows, kept before clipping) against
 * b [out, in]. */
static mxq_status report_loss(mxq_ctx *ctx, const float *sa, const float *b, int out, int in,
                              const mxq_hessian_ref *h, double *loss)
{
    mxq_status status = MXQ_OK;
    const size_t n = (size_t)in, stride = report_stride(out), rows = (size_t)out / stride;
    float *sb = NULL;
    if (stride > 1) {
        sb = malloc(rows * n * sizeof(float));
        CHECK_ALLOC(ctx, sb, rows * n * sizeof(float), "the report's loss rows");
        sample_rows(b, out, in, stride, sb);
    }
    CALL(ctx, sampled_loss(ctx, sa, sb ? sb : b, rows, n, out, h, loss));
fail:
    free(sb);
    return status;
}

/* tr(dW H dW^T) of round-to-nearest of w: the baseline every recipe is
 * reported against (exact: every row; else the report's rows, each
 * rounded as in the whole matrix, since MX blocks lie within a row). */
static mxq_status rtn_loss(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *w, int out, int in,
                           const mxq_hessian_ref *h, int exact, double *loss)
{
    mxq_status status = MXQ_OK;
    const size_t stride = exact ? 1 : report_stride(out), rows = (size_t)out / stride, n = (size_t)in;
    float *sa = stride > 1 ? malloc(rows * n * sizeof(float)) : NULL, *tmp = malloc(rows * n * sizeof(float));
    CHECK_ALLOC(ctx, tmp && (sa || stride == 1), 2 * rows * n * sizeof(float), "a weight copy");
    if (sa)
        sample_rows(w, out, in, stride, sa);
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, sa ? sa : w, rows, n, NULL, NULL, tmp));
    CALL(ctx, sampled_loss(ctx, sa ? sa : w, tmp, rows, n, out, h, loss));
fail:
    free(sa);
    free(tmp);
    return status;
}

/* ---- a decoder layer ------------------------------------------------------- */

static void group_of(const mxq_model_config *cfg, mxq_layer *L, mxq_input_id input, const int *quantized,
                     mxq_linear_group *g, mxq_linear_id *ids)
{
    memset(g, 0, sizeof(*g));
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        if (mxq_linear_input((mxq_linear_id)li) != input || (quantized && !quantized[li]))
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

/* The op that produces `input` absorbs 1/s: the input becomes X diag(1/s). */
static void fold_into_producer(const mxq_model_config *cfg, mxq_layer *L, mxq_input_id input, const double *s,
                               mxq_layer_result *res)
{
    int out, in;
    float *norm = input == MXQ_INPUT_ATTN ? L->attn_norm : input == MXQ_INPUT_MLP ? L->ffn_norm : NULL;
    if (norm) {
        for (int j = 0; j < cfg->hidden; j++)
            norm[j] = (float)((double)norm[j] / s[j]);
        *(input == MXQ_INPUT_ATTN ? &res->attn_norm_modified : &res->ffn_norm_modified) = 1;
    } else if (input == MXQ_INPUT_O || input == MXQ_INPUT_DOWN) {
        mxq_linear_id producer = input == MXQ_INPUT_O ? MXQ_LIN_V : MXQ_LIN_UP;
        mxq_linear_shape(cfg, producer, &out, &in);
        mxq_unscale_rows(L->weight[producer], L->bias[producer], out, in, s);
        res->linear[producer].weight_modified = 1;
        res->linear[producer].bias_modified = L->bias[producer] != NULL;
    }
}

/* The Hessian of `input` as the algorithms reach it: here, or spread. */
static mxq_hessian_ref hessian_of(const mxq_layer_quant *q, mxq_input_id input)
{
    return (mxq_hessian_ref){.whole = q->stats->input[input].hessian, .remote = q->remote, .input = input};
}

/* Fold s into the group reading `input`: weights W diag(s), the producing op
 * 1/s, and the statistics (if this rank holds them) those of X diag(1/s);
 * a spread H is rescaled where it lies. */
static mxq_status fold_scales(mxq_ctx *ctx, const mxq_layer_quant *q, mxq_input_id input, const double *s,
                              mxq_layer_stats *stats, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    const mxq_model_config *cfg = q->cfg;
    mxq_layer *L = q->L;
    mxq_linear_group g;
    mxq_linear_id ids[4];
    group_of(cfg, L, input, NULL, &g, ids);
    for (int k = 0; k < g.n; k++) {
        mxq_scale_columns(g.weight[k], g.out[k], g.in, s);
        res->linear[ids[k]].weight_modified = 1;
    }
    fold_into_producer(cfg, L, input, s, res);
    if (stats)
        mxq_input_stats_rescale(&stats->input[input], s);
    if (stats && !stats->input[input].hessian && q->remote)
        CALL(ctx, q->remote->rescale(ctx, q->remote->user, input, s));
fail:
    return status;
}

/* Whether scale step k (SmoothQuant or AWQ) runs on `input`: a quantized
 * linear reads it, and there is an op to fold 1/s into. */
int mxq_layer_scale_applies(const mxq_layer_quant *q, int k, mxq_input_id input)
{
    const mxq_algo_step *step = &q->recipe->steps[k];
    mxq_linear_group g;
    mxq_linear_id ids[4];
    if (step->kind == MXQ_ALGO_GPTQ || !q->recipe->has_weights)
        return 0;
    group_of(q->cfg, q->L, input, q->quantized, &g, ids);
    return g.n > 0 && layer_can_fold(q->cfg, input) &&
           !(step->kind == MXQ_ALGO_SMOOTHQUANT && !smooth_applies(ids[0]));
}

mxq_status mxq_layer_scale_search(mxq_ctx *ctx, mxq_layer_quant *q, int k, mxq_input_id input, double *s,
                                  double *alpha)
{
    mxq_status status = MXQ_OK;
    mxq_linear_group g;
    mxq_linear_id ids[4];
    double t0 = mxq_time_now();
    group_of(q->cfg, q->L, input, q->quantized, &g, ids);
    const mxq_hessian_ref h = hessian_of(q, input);
    CALL_IN(ctx,
            compute_scales(ctx, &q->recipe->steps[k], &q->recipe->weights, &g, &q->stats->input[input], &h, s, alpha),
            "layer %d %s", q->layer, mxq_input_name(input));
fail:
    q->res->seconds_scales += mxq_time_now() - t0;
    return status;
}

mxq_status mxq_layer_scale_fold(mxq_ctx *ctx, mxq_layer_quant *q, int k, mxq_input_id input, const double *s,
                                double alpha)
{
    mxq_status status = MXQ_OK;
    double t0 = mxq_time_now();
    *(q->recipe->steps[k].kind == MXQ_ALGO_SMOOTHQUANT ? &q->res->smooth_alpha[input] : &q->res->awq_alpha[input]) =
        alpha;
    CALL_IN(ctx, fold_scales(ctx, q, input, s, q->here[input] ? q->stats : NULL, q->res), "layer %d %s", q->layer,
            mxq_input_name(input));
fail:
    q->res->seconds_scales += mxq_time_now() - t0;
    return status;
}

int mxq_layer_scales_max(const mxq_model_config *cfg)
{
    int most = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        most = in > most ? in : most;
    }
    return most;
}

/* Every scale step on every input, on this rank alone. */
static mxq_status run_scale_steps(mxq_ctx *ctx, mxq_layer_quant *q)
{
    mxq_status status = MXQ_OK;
    const size_t n = (size_t)mxq_layer_scales_max(q->cfg);
    double *s = malloc(n * sizeof(double));
    CHECK_ALLOC(ctx, s, n * sizeof(double), "scales");
    for (int k = 0; k < q->recipe->n_steps; k++)
        for (int input = 0; input < MXQ_INPUT_COUNT; input++) {
            double alpha = 0;
            if (!mxq_layer_scale_applies(q, k, (mxq_input_id)input))
                continue;
            CALL(ctx, mxq_layer_scale_search(ctx, q, k, (mxq_input_id)input, s, &alpha));
            CALL(ctx, mxq_layer_scale_fold(ctx, q, k, (mxq_input_id)input, s, alpha));
        }
fail:
    free(s);
    return status;
}

int mxq_recipe_quantizes_linear(const mxq_recipe *recipe, int layer, mxq_linear_id li)
{
    char name[160];
    snprintf(name, sizeof(name), "model.layers.%d.%s", layer, mxq_linear_name(li));
    int excluded = mxq_recipe_excludes(recipe, name);
    strncat(name, ".weight", sizeof(name) - strlen(name) - 1);
    return recipe->has_weights && !(excluded || mxq_recipe_excludes(recipe, name));
}

const mxq_gptq_options *mxq_recipe_gptq(const mxq_recipe *recipe)
{
    const mxq_algo_step *step = find_step(recipe, MXQ_ALGO_GPTQ);
    return step ? &step->gptq : NULL;
}

mxq_status mxq_layer_quant_begin_part(mxq_ctx *ctx, mxq_layer_quant *q, const mxq_recipe *recipe,
                                      const mxq_model_config *cfg, int layer, mxq_layer *L, mxq_layer_stats *stats,
                                      const int *inputs_here, const mxq_remote_hessian *remote, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    *q = (mxq_layer_quant){.recipe = recipe,
                           .cfg = cfg,
                           .layer = layer,
                           .L = L,
                           .stats = stats,
                           .remote = remote,
                           .res = res,
                           .t_start = mxq_time_now()};
    res->layer = layer;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        res->awq_alpha[i] = res->smooth_alpha[i] = -1;
        q->here[i] = inputs_here ? inputs_here[i] : 1;
    }
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        q->quantized[li] = mxq_recipe_quantizes_linear(recipe, layer, (mxq_linear_id)li);
    if (!recipe->has_weights)
        return MXQ_OK;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        if (q->here[i])
            CALL_IN(ctx, check_stats_finite(ctx, &stats->input[i]), "layer %d %s", layer,
                    mxq_input_name((mxq_input_id)i));
    double t0 = mxq_time_now();
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        const mxq_hessian_ref h = hessian_of(q, mxq_linear_input((mxq_linear_id)li));
        if (q->quantized[li] && q->here[mxq_linear_input((mxq_linear_id)li)])
            CALL_IN(ctx, rtn_loss(ctx, &recipe->weights, L->weight[li], out, in, &h, 0, &res->linear[li].loss_rtn),
                    "layer %d %s", layer, mxq_linear_name((mxq_linear_id)li));
    }
    res->seconds_loss += mxq_time_now() - t0;
fail:
    return status;
}

mxq_status mxq_layer_quant_begin(mxq_ctx *ctx, mxq_layer_quant *q, const mxq_recipe *recipe,
                                 const mxq_model_config *cfg, int layer, mxq_layer *L, mxq_layer_stats *stats,
                                 const mxq_remote_hessian *remote, mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_layer_quant_begin_part(ctx, q, recipe, cfg, layer, L, stats, NULL, remote, res));
    CALL(ctx, run_scale_steps(ctx, q));
fail:
    return status;
}

int mxq_layer_quant_uses_gptq(const mxq_layer_quant *q, mxq_linear_id li)
{
    return q->quantized[li] && find_step(q->recipe, MXQ_ALGO_GPTQ) != NULL;
}

static const mxq_input_stats *linear_stats(const mxq_layer_quant *q, mxq_linear_id li)
{
    return &q->stats->input[mxq_linear_input(li)];
}

mxq_status mxq_linear_quant_prepare(mxq_ctx *ctx, mxq_layer_quant *q, mxq_linear_id li)
{
    mxq_status status = MXQ_OK;
    mxq_linear_result *r = &q->res->linear[li];
    const mxq_mx_spec *spec = &q->recipe->weights;
    int out, in;
    mxq_linear_shape(q->cfg, li, &out, &in);
    const size_t n = (size_t)out * in;
    float *w = q->L->weight[li];
    const size_t ref_rows = (size_t)out / report_stride(out); /* the report's rows only */
    const mxq_hessian_ref h = hessian_of(q, mxq_linear_input(li));
    free(q->ref);
    q->ref = malloc(ref_rows * (size_t)in * sizeof(float));
    r->packed_bytes = (size_t)out * mxq_mx_packed_row_bytes(spec->format, (size_t)in);
    r->scales_bytes = (size_t)out * mxq_mx_blocks_per_row((size_t)in, spec->block);
    r->packed = mxq_alloc_lasting(r->packed_bytes);
    r->scales = mxq_alloc_lasting(r->scales_bytes);
    char what[128];
    snprintf(what, sizeof(what), "layer %d %s", q->layer, mxq_linear_name(li));
    CHECK_ALLOC(ctx, q->ref && r->packed && r->scales, n * sizeof(float), what);
    sample_rows(w, out, in, report_stride(out), q->ref);
    q->t_linear = mxq_time_now();
    CALL_IN(ctx, clip_weight(ctx, q->recipe, li, w, out, in, &h), "layer %d %s", q->layer, mxq_linear_name(li));
    q->res->seconds_clip += mxq_time_now() - q->t_linear;
fail:
    return status;
}

void mxq_linear_quant_rounded(mxq_layer_quant *q, mxq_linear_id li, double seconds, int dead_channels)
{
    q->res->linear[li].dead_channels = dead_channels;
    q->res->seconds_gptq += seconds;
}

mxq_status mxq_linear_quant_round(mxq_ctx *ctx, mxq_layer_quant *q, mxq_linear_id li)
{
    mxq_status status = MXQ_OK;
    mxq_linear_result *r = &q->res->linear[li];
    int out, in, dead = 0;
    mxq_linear_shape(q->cfg, li, &out, &in);
    const mxq_hessian_ref h = hessian_of(q, mxq_linear_input(li));
    double t0 = mxq_time_now();
    CALL_IN(ctx,
            round_weight(ctx, q->recipe, li, q->L->weight[li], out, in, linear_stats(q, li), &h, r->packed, r->scales,
                         &dead),
            "layer %d %s", q->layer, mxq_linear_name(li));
    mxq_linear_quant_rounded(q, li, mxq_time_now() - t0, dead);
fail:
    return status;
}

mxq_status mxq_linear_quant_finish(mxq_ctx *ctx, mxq_layer_quant *q, mxq_linear_id li)
{
    mxq_status status = MXQ_OK;
    mxq_linear_result *r = &q->res->linear[li];
    const mxq_mx_spec *spec = &q->recipe->weights;
    int out, in;
    mxq_linear_shape(q->cfg, li, &out, &in);
    float *w = q->L->weight[li];
    double t0 = mxq_time_now();
    if (mxq_layer_quant_uses_gptq(q, li))
        CALL_IN(ctx, mxq_mx_pack_with_scales(ctx, spec, w, (size_t)out, (size_t)in, r->scales, r->packed),
                "layer %d %s", q->layer, mxq_linear_name(li));
    double t1 = mxq_time_now();
    q->res->seconds_pack += t1 - t0;
    const mxq_hessian_ref h = hessian_of(q, mxq_linear_input(li));
    CALL_IN(ctx, report_loss(ctx, q->ref, w, out, in, &h, &r->loss), "layer %d %s", q->layer, mxq_linear_name(li));
    q->res->seconds_loss += mxq_time_now() - t1;
    r->seconds = mxq_time_now() - q->t_linear;
    r->quantized = 1;
    r->weight_modified = 0;
    mxq_log(ctx, MXQ_LOG_DEBUG, "%s: loss %.4e (rtn %.4e), %.2f s", mxq_linear_name(li), r->loss, r->loss_rtn,
            r->seconds);
fail:
    free(q->ref);
    q->ref = NULL;
    return status;
}

void mxq_layer_quant_end(mxq_layer_quant *q)
{
    free(q->ref);
    q->ref = NULL;
    q->res->seconds = mxq_time_now() - q->t_start;
    q->res->peak_rss = mxq_peak_rss_bytes();
}

mxq_status mxq_quantize_layer(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, int layer,
                              mxq_layer *L, mxq_layer_stats *stats, mxq_layer_result *res)
{
    return mxq_quantize_layer_remote(ctx, recipe, cfg, layer, L, stats, NULL, res);
}

mxq_status mxq_quantize_layer_remote(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, int layer,
                                     mxq_layer *L, mxq_layer_stats *stats, const mxq_remote_hessian *remote,
                                     mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    mxq_layer_quant q;
    CALL(ctx, mxq_layer_quant_begin(ctx, &q, recipe, cfg, layer, L, stats, remote, res));
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        if (!q.quantized[li])
            continue;
        CALL(ctx, mxq_linear_quant_prepare(ctx, &q, (mxq_linear_id)li));
        CALL(ctx, mxq_linear_quant_round(ctx, &q, (mxq_linear_id)li));
        CALL(ctx, mxq_linear_quant_finish(ctx, &q, (mxq_linear_id)li));
    }
fail:
    mxq_layer_quant_end(&q);
    return status;
}

void mxq_layer_result_free(mxq_layer_result *res)
{
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        mxq_free_lasting(res->linear[li].packed, res->linear[li].packed_bytes);
        mxq_free_lasting(res->linear[li].scales, res->linear[li].scales_bytes);
        res->linear[li].packed = res->linear[li].scales = NULL;
    }
}

/* ---- one linear on its own -------------------------------------------------- */

/* The scale steps that apply to `role`, applied to q (a copy of the weight)
 * and to the statistics; total[j] collects the product of the scales. */
static mxq_status single_scale_steps(mxq_ctx *ctx, const mxq_recipe *recipe, int role, float *q, int out, int in,
                                     mxq_input_stats *work, double *total)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)in;
    double *s = malloc(f * sizeof(double));
    CHECK_ALLOC(ctx, s, f * sizeof(double), "scales");
    mxq_linear_group g = {1, {q}, {out}, in};
    for (int k = 0; k < recipe->n_steps; k++) {
        const mxq_algo_step *step = &recipe->steps[k];
        double alpha = 0;
        if (step->kind == MXQ_ALGO_GPTQ || (step->kind == MXQ_ALGO_SMOOTHQUANT && !smooth_applies(role)))
            continue;
        const mxq_hessian_ref h = {.whole = work->hessian};
        CALL(ctx, compute_scales(ctx, step, &recipe->weights, &g, work, &h, s, &alpha));
        mxq_scale_columns(q, out, in, s);
        mxq_input_stats_rescale(work, s);
        for (size_t j = 0; j < f; j++)
            total[j] *= s[j];
    }
fail:
    free(s);
    return status;
}

/* A copy of stats that the scale steps may rescale. */
static mxq_status stats_copy(mxq_ctx *ctx, const mxq_input_stats *src, mxq_input_stats *dst)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)src->features;
    CALL(ctx, mxq_input_stats_init(ctx, src->features, dst));
    memcpy(dst->hessian, src->hessian, f * f * sizeof(double));
    dst->n_tokens = src->n_tokens;
    if (src->abs_max)
        memcpy(dst->abs_max, src->abs_max, f * sizeof(double));
    else {
        free(dst->abs_max);
        dst->abs_max = NULL;
    }
    if (src->abs_sum)
        memcpy(dst->abs_sum, src->abs_sum, f * sizeof(double));
    else {
        free(dst->abs_sum);
        dst->abs_sum = NULL;
    }
fail:
    return status;
}

mxq_status mxq_quantize_single_linear(mxq_ctx *ctx, const mxq_recipe *recipe, int role, const float *weight, int out,
                                      int in, const mxq_input_stats *stats, float *q, double *loss_rtn, double *loss)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)in;
    mxq_input_stats work = {0};
    double *total = malloc(f * sizeof(double));
    int dead = 0;
    CHECK(ctx, recipe->has_weights, MXQ_ERR_ARG, "the recipe quantizes no weights (weights: none)");
    CHECK_ALLOC(ctx, total, f * sizeof(double), "scales");
    CHECK(ctx, role >= -1 && role < MXQ_LIN_COUNT, MXQ_ERR_ARG, "unknown linear role %d", role);
    CALL(ctx, check_stats_finite(ctx, stats));
    CALL(ctx, stats_copy(ctx, stats, &work));
    for (size_t j = 0; j < f; j++)
        total[j] = 1.0;
    /* one linear: exact losses (2 out in^2 flops each), for comparisons with
     * independent implementations */
    const mxq_hessian_ref whole = {.whole = stats->hessian};
    mxq_hessian_ref work_h = {.whole = NULL};
    CALL(ctx, rtn_loss(ctx, &recipe->weights, weight, out, in, &whole, 1, loss_rtn));
    memcpy(q, weight, (size_t)out * f * sizeof(float));
    CALL(ctx, single_scale_steps(ctx, recipe, role, q, out, in, &work, total));
    work_h = (mxq_hessian_ref){.whole = work.hessian};
    CALL(ctx, clip_weight(ctx, recipe, role, q, out, in, &work_h));
    CALL(ctx, round_weight(ctx, recipe, role, q, out, in, &work, &work_h, NULL, NULL, &dead));
    /* no op to fold 1/s into: the effective weight */
    for (size_t r = 0; r < (size_t)out; r++)
        for (size_t j = 0; j < f; j++)
            q[r * f + j] = (float)((double)q[r * f + j] / total[j]);
    CALL(ctx, mxq_quant_loss(ctx, weight, q, (size_t)out, (size_t)in, stats->hessian, loss));
fail:
    mxq_input_stats_free(&work);
    free(total);
    return status;
}
