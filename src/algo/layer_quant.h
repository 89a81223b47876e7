/* A decoder layer's quantization in phases, for jobs that run a linear's
 * GPTQ elsewhere (on a grid of ranks) between them, or that spread a
 * layer's inputs over ranks (the scale steps' search and fold apart).
 * mxq_quantize_layer is exactly begin; for each linear: prepare, round,
 * finish; end. Internal. */
#ifndef MXQ_ALGO_LAYER_QUANT_H
#define MXQ_ALGO_LAYER_QUANT_H

#include "algo/hessian_ref.h"
#include "mxq/gptq.h"
#include "mxq/quantize.h"

typedef struct {
    const mxq_recipe *recipe;
    const mxq_model_config *cfg;
    int layer;
    mxq_layer *L;
    mxq_layer_stats *stats;
    const mxq_remote_hessian *remote; /* the inputs whose stats have no hessian: spread over ranks (NULL: none) */
    mxq_layer_result *res;
    int quantized[MXQ_LIN_COUNT]; /* not excluded by the recipe */
    int here[MXQ_INPUT_COUNT];    /* this rank holds the input's statistics and quantizes its linears */
    float *ref;                   /* [report rows, in] the current linear after the scale steps: its report loss */
    double t_start, t_linear; /* the layer's start; the current linear's, after its reference copy */
} mxq_layer_quant;

/* Whether the recipe quantizes linear li of `layer` (it has weights, and
 * neither the linear nor its weight is excluded). */
int mxq_recipe_quantizes_linear(const mxq_recipe *recipe, int layer, mxq_linear_id li);
/* The recipe's GPTQ options; NULL if it has no GPTQ step. */
const mxq_gptq_options *mxq_recipe_gptq(const mxq_recipe *recipe);

/* The round-to-nearest losses and the scale steps (SmoothQuant, AWQ
 * search, folded into the layer). */
mxq_status mxq_layer_quant_begin(mxq_ctx *ctx, mxq_layer_quant *q, const mxq_recipe *recipe,
                                 const mxq_model_config *cfg, int layer, mxq_layer *L, mxq_layer_stats *stats,
                                 const mxq_remote_hessian *remote, mxq_layer_result *res);

/* The first part of begin, for a layer whose inputs are spread over ranks
 * (inputs_here[i]: this rank holds input i's statistics; NULL: all): the
 * round-to-nearest losses of the linears reading the inputs here. The scale
 * steps follow, searched where the input is and folded on every rank that
 * holds the layer (for each non-GPTQ step k in order, every input: search,
 * then fold; the searches of one step read nothing an earlier fold of that
 * step changes, so a step's searches may run side by side). */
mxq_status mxq_layer_quant_begin_part(mxq_ctx *ctx, mxq_layer_quant *q, const mxq_recipe *recipe,
                                      const mxq_model_config *cfg, int layer, mxq_layer *L, mxq_layer_stats *stats,
                                      const int *inputs_here, const mxq_remote_hessian *remote,
                                      mxq_layer_result *res);
/* Whether recipe step k searches scales for `input` in this layer. */
int mxq_layer_scale_applies(const mxq_layer_quant *q, int k, mxq_input_id input);
/* Step k's scales s [features of input] and its alpha (the input's
 * statistics must be here). */
mxq_status mxq_layer_scale_search(mxq_ctx *ctx, mxq_layer_quant *q, int k, mxq_input_id input, double *s,
                                  double *alpha);
/* s folded into the layer: the group's columns, the producing op, and the
 * input's statistics if here. */
mxq_status mxq_layer_scale_fold(mxq_ctx *ctx, mxq_layer_quant *q, int k, mxq_input_id input, const double *s,
                                double alpha);
/* The longest scale vector of a layer: its largest in_features. */
int mxq_layer_scales_max(const mxq_model_config *cfg);

/* Whether linear li is quantized by GPTQ (not excluded; the recipe has it). */
int mxq_layer_quant_uses_gptq(const mxq_layer_quant *q, mxq_linear_id li);

/* Linear li (quantized[li] only): its result buffers, the reference copy,
 * AWQ clipping. */
mxq_status mxq_linear_quant_prepare(mxq_ctx *ctx, mxq_layer_quant *q, mxq_linear_id li);
/* GPTQ on this rank, or round-to-nearest (which also packs). */
mxq_status mxq_linear_quant_round(mxq_ctx *ctx, mxq_layer_quant *q, mxq_linear_id li);
/* After GPTQ ran elsewhere: it left Q in L->weight[li] and its scales in
 * res->linear[li].scales; this records its time and dead channels. */
void mxq_linear_quant_rounded(mxq_layer_quant *q, mxq_linear_id li, double seconds, int dead_channels);
/* Packing (GPTQ) and the report's loss; frees the reference copy. */
mxq_status mxq_linear_quant_finish(mxq_ctx *ctx, mxq_layer_quant *q, mxq_linear_id li);

/* Times and peak memory into the result; frees what is left (also after a
 * failure). */
void mxq_layer_quant_end(mxq_layer_quant *q);

/* mxq_quantize_layer with the inputs whose stats have no hessian spread
 * over ranks, reached through `remote` (the job serves its requests on the
 * other ranks meanwhile). */
mxq_status mxq_quantize_layer_remote(mxq_ctx *ctx, const mxq_recipe *recipe, const mxq_model_config *cfg, int layer,
                                     mxq_layer *L, mxq_layer_stats *stats, const mxq_remote_hessian *remote,
                                     mxq_layer_result *res);

#endif
