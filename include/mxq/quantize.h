/* Post-training quantization of decoder layers: calibration statistics,
 * SmoothQuant, AWQ (scale and clip search), GPTQ-MX and round-to-nearest on
 * one layer or one linear. The jobs that run them over MPI ranks are in
 * mxq/jobs.h. */
#ifndef MXQ_QUANTIZE_H
#define MXQ_QUANTIZE_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"
#include "mxq/model.h"
#include "mxq/recipe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- calibration statistics of one linear input ------------------------ */

/* Accumulated in double: H feeds a Cholesky factorisation whose conditioning
 * is what GPTQ lives on, and it sums x x^T over 10^5..10^6 tokens; float
 * accumulation would lose ~3 digits there. */
typedef struct {
    int features;
    double n_tokens;
    double *hessian; /* [f, f] sum over tokens of x x^T */
    double *abs_max; /* [f] max |x_j| */
    double *abs_sum; /* [f] sum |x_j| (mean = abs_sum / n_tokens) */
} mxq_input_stats;

typedef struct {
    mxq_input_stats input[MXQ_INPUT_COUNT];
} mxq_layer_stats;

mxq_status mxq_input_stats_init(mxq_ctx *ctx, int features, mxq_input_stats *stats);
void mxq_input_stats_free(mxq_input_stats *stats);
/* Add x [tokens, features]. Only the upper triangle of H is updated. */
mxq_status mxq_input_stats_add(mxq_ctx *ctx, mxq_input_stats *stats, const float *x, size_t tokens);
/* Mirror the upper triangle into the lower one (after the last add). */
void mxq_input_stats_finish(mxq_input_stats *stats);

mxq_status mxq_layer_stats_init(mxq_ctx *ctx, const mxq_model_config *cfg, mxq_layer_stats *stats);
void mxq_layer_stats_free(mxq_layer_stats *stats);
/* Back to no tokens seen, for the next layer (no allocation). */
void mxq_layer_stats_zero(mxq_layer_stats *stats);
/* Bytes the statistics of one layer take. */
size_t mxq_layer_stats_bytes(const mxq_model_config *cfg);

/* ---- algorithms on the linears that share one input --------------------- */

/* Several linears [out_i, in] reading the same input. */
typedef struct {
    int n;
    float *weight[4];
    int out[4];
    int in;
} mxq_linear_group;

/* SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), both clamped at
 * 1e-5, max|W_j| over all linears of the group. */
mxq_status mxq_smoothquant_scales(mxq_ctx *ctx, const mxq_linear_group *group, const double *act_abs_max, double alpha,
                                  double *scales);

/* AWQ scale search: s = mean|X|^a normalised by sqrt(max s * min s), a on
 * `options->grid` points of [0, 1); picks the a with the smallest sum over
 * the group of tr(dW H dW^T), dW = W - RTN(W diag s) diag(1/s), evaluated
 * with float32 GEMMs on every (out / sample_rows)-th row of each linear
 * (every row when out < 2 sample_rows or sample_rows is 0), scaled to all
 * rows. */
mxq_status mxq_awq_search(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *group, const double *hessian,
                          const double *act_abs_mean, const mxq_awq_options *options, double *scales,
                          double *best_alpha, double *best_loss);

/* AWQ clip search: per row and MX block, shrink the block max by up to
 * max_shrink in clip_grid steps; keep the one minimising dw H_bb dw^T
 * (dw = w - Q(clamp(w))); clamps W in place. */
mxq_status mxq_awq_clip(mxq_ctx *ctx, const mxq_mx_spec *spec, float *weight, int out, int in, const double *hessian,
                        int clip_grid, double max_shrink);

/* W[:, j] *= s_j */
void mxq_scale_columns(float *weight, int out, int in, const double *scales);
/* W[i, :] /= s_i (and b_i /= s_i) */
void mxq_unscale_rows(float *weight, float *bias, int out, int in, const double *scales);
/* Statistics of the input X diag(1/s): H_ij /= s_i s_j, |x|_j /= s_j. */
void mxq_input_stats_rescale(mxq_input_stats *stats, const double *scales);

/* ---- one decoder layer --------------------------------------------------- */

typedef struct {
    int quantized;       /* 0: left in floating point (excluded, or weights: none) */
    int weight_modified; /* unquantized but changed by a folded scale */
    int bias_modified;
    double loss_rtn;     /* tr(dW H dW^T) of round-to-nearest of the original weight */
    double loss;         /* the same for the recipe's result */
    int dead_channels;
    double seconds;
    uint8_t *packed;     /* [out, packed row bytes] */
    uint8_t *scales;     /* [out, blocks] E8M0 */
    size_t packed_bytes, scales_bytes; /* their sizes (mxq_layer_result_free releases them) */
} mxq_linear_result;

typedef struct {
    int layer;
    mxq_linear_result linear[MXQ_LIN_COUNT];
    double awq_alpha[MXQ_INPUT_COUNT];  /* -1: no AWQ on that input */
    double smooth_alpha[MXQ_INPUT_COUNT]; /* -1: no SmoothQuant on that input */
    int attn_norm_modified, ffn_norm_modified;
    double seconds_calib; /* statistics (and in sequential mode the forward passes) */
    double seconds;       /* the algorithms; of which: */
    double seconds_scales; /* SmoothQuant / AWQ scale searches and folding */
    double seconds_clip;   /* AWQ clip search */
    double seconds_gptq;   /* GPTQ (or round-to-nearest) */
    double seconds_pack;   /* MX packing */
    double seconds_loss;   /* the report's losses */
    size_t peak_rss;
} mxq_layer_result;

/* Apply the recipe's weight algorithms to layer L in place, given the
 * statistics of its inputs (finished; they are rescaled by SmoothQuant / AWQ).
 * On return L holds the dequantized weights and folded norms. */
mxq_status mxq_quantize_layer(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, int layer_index,
                              mxq_layer *L, mxq_layer_stats *stats, mxq_layer_result *result);
void mxq_layer_result_free(mxq_layer_result *result);

/* One linear on its own (mxq quantize-linear), through the same per-linear
 * code as mxq_quantize_layer: the recipe's steps that apply to a linear of
 * that role (an mxq_linear_id, or -1 for a linear of no particular role, to
 * which every step applies), with no op to fold into, so the result is the
 * effective weight Q(W diag s) diag(1/s), [out, in], written to q.
 * stats->abs_max and abs_sum may be NULL when only the Hessian is known
 * (SmoothQuant and AWQ then fail with a message). Losses are tr(dW H dW^T)
 * against W. */
mxq_status mxq_quantize_single_linear(mxq_ctx *ctx, const mxq_recipe *recipe, int role, const float *weight, int out,
                                      int in, const mxq_input_stats *stats, float *q, double *loss_rtn, double *loss);

#ifdef __cplusplus
}
#endif

#endif
