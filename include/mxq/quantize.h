/* Post-training quantization of decoder layers: calibration statistics,
 * SmoothQuant, AWQ (scale and clip search), GPTQ-MX, round-to-nearest, and
 * the whole-model job that runs them over MPI ranks and writes an MX
 * checkpoint. */
#ifndef MXQ_QUANTIZE_H
#define MXQ_QUANTIZE_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"
#include "mxq/model.h"
#include "mxq/dist.h"
#include "mxq/recipe.h"
#include "mxq/tokens.h"

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
 * `grid` points of [0, 1); picks the a with the smallest sum over the group
 * of tr(dW H dW^T), dW = W - RTN(W diag s) diag(1/s). */
mxq_status mxq_awq_search(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *group, const double *hessian,
                          const double *act_abs_mean, int grid, double *scales, double *best_alpha, double *best_loss);

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

/* Element codes and packing of weights that already lie on the MX grid of
 * the given E8M0 scales (GPTQ's output); fails if an element is off-grid. */
mxq_status mxq_mx_pack_with_scales(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *weight, size_t rows,
                                   size_t cols, const uint8_t *scales, uint8_t *packed);

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
} mxq_linear_result;

typedef struct {
    int layer;
    mxq_linear_result linear[MXQ_LIN_COUNT];
    double awq_alpha[MXQ_INPUT_COUNT];  /* -1: no AWQ on that input */
    double smooth_alpha[MXQ_INPUT_COUNT]; /* -1: no SmoothQuant on that input */
    int attn_norm_modified, ffn_norm_modified;
    double seconds_calib; /* statistics (and in sequential mode the forward passes) */
    double seconds;       /* the algorithms */
    size_t peak_rss;
} mxq_layer_result;

/* Apply the recipe's weight algorithms to layer L in place, given the
 * statistics of its inputs (finished; they are rescaled by SmoothQuant / AWQ).
 * On return L holds the dequantized weights and folded norms. */
mxq_status mxq_quantize_layer(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, int layer_index,
                              mxq_layer *L, mxq_layer_stats *stats, mxq_layer_result *result);
void mxq_layer_result_free(mxq_layer_result *result);

/* One linear on its own (mxq quantize-linear): the recipe's weight
 * algorithms with no op to fold into, so the result is the effective weight
 * Q(W diag s) diag(1/s), [out, in], written to q. stats->abs_max and
 * abs_sum may be NULL when only the Hessian is known (SmoothQuant and AWQ
 * then fail with a message). Losses are tr(dW H dW^T) against W. */
mxq_status mxq_quantize_single_linear(mxq_ctx *ctx, const mxq_recipe *recipe, const float *weight, int out, int in,
                                      const mxq_input_stats *stats, float *q, double *loss_rtn, double *loss);

/* ---- the whole job --------------------------------------------------------- */

typedef struct {
    int batch;       /* calibration sequences per micro-batch (default 8) */
    int force;       /* overwrite a non-empty output directory */
    int dry_run;     /* print the plan only */
    int stats_layers; /* fp mode: at most this many layers' statistics per rank at once (0 = all) */
} mxq_quantize_options;

/* Read the first calibration.samples sequences of calib_path and check them
 * against the recipe and the model (enough sequences, not longer than the
 * context). Collective over dist; errors are agreed. */
mxq_status mxq_calibration_tokens(mxq_ctx *ctx, const mxq_dist *dist, const char *calib_path, const mxq_recipe *recipe,
                                  const char *recipe_path, const mxq_model_config *cfg, mxq_tokens *tokens);

/* Calibrate on `calib` (from mxq_calibration_tokens; calib_name for
 * messages) and quantize the layers of `model` (this rank's part) in memory.
 * Collective over `comm`. results[i] for local layer i. stats_layers > 0
 * bounds the layers whose statistics a rank holds at once in fp mode (more
 * calibration passes, same result); 0 = all of them in one pass. */
mxq_status mxq_quantize_model_in_memory(mxq_ctx *ctx, MPI_Comm comm, mxq_model *model, const mxq_tokens *calib,
                                        const char *calib_name, const mxq_recipe *recipe, int batch, int stats_layers,
                                        mxq_layer_result *results);

/* mxq quantize: read model_dir, calibrate on calib_path, apply the recipe,
 * write the MX checkpoint to out_dir. Collective over comm. */
mxq_status mxq_quantize(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *calib_path,
                        const char *recipe_path, const char *out_dir, const mxq_quantize_options *options);

#ifdef __cplusplus
}
#endif

#endif
