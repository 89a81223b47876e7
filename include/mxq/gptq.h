/* GPTQ with microscaling formats: the micro-block GPTQ of Sharify et al.
 * (2024), Algorithm 1, on one linear layer. */
#ifndef MXQ_GPTQ_H
#define MXQ_GPTQ_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"
#include "mxq/mx.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int lazy_block; /* b1: columns per lazy-batch block (default 128) */
    int microblock; /* b2: 1 (column by column) or a multiple of the MX block */
    double damp;    /* lambda = damp * mean(diag(H')) (default 0.01) */
    int act_order;  /* process MX blocks by descending Hessian diagonal mass */
    int skip_losses; /* do not compute loss_rtn / loss (GPTQ's comes from its factor;
                        round-to-nearest's costs one strmm, m n^2 flops) */
} mxq_gptq_options;

void mxq_gptq_defaults(mxq_gptq_options *options);

/* Checks b1/b2 against the MX block: b2 == 1, or b2 % block == 0 and
 * b1 % b2 == 0; damp >= 0. Messages name the recipe keys. */
mxq_status mxq_gptq_check(mxq_ctx *ctx, const mxq_gptq_options *options, const mxq_mx_spec *spec);

typedef struct {
    double loss_rtn;        /* tr(dW H dW^T) of round-to-nearest */
    double loss;            /* tr(dW H dW^T) of the GPTQ result, from the factor: N/2 (||dW R||^2 -
                               lambda ||dW||^2), which loses digits (clamped at 0) when
                               that loss is far below lambda ||dW||^2 (rank-deficient H,
                               fewer tokens than inputs) */
    int dead_channels;      /* input channels with H_dd = 0 (weights zeroed) */
    double seconds_factor;  /* work arrays, the damped Hessian in processing order, its Cholesky factor */
    double seconds_quant;   /* the column / micro-block loop outside GEMMs */
    double seconds_gemm;    /* lazy-batch trailing updates (sgemm) */
    double gemm_flops;      /* flops of those updates */
    double seconds_loss;    /* the two loss evaluations */
} mxq_gptq_stats;

/* Quantize W [out, in] (row-major, float32) in place to the MX grid of
 * `spec` along `in`, compensating errors with the Hessian. The Cholesky
 * factor is computed in double (in^2 doubles of work space) and rounded to
 * float32, in which the rest works; a damped Hessian that is not positive
 * definite fails with a message to raise gptq.damp.
 *   hessian   [in, in]  sum over calibration tokens of x x^T (not modified)
 *   n_tokens  number of tokens summed into hessian (for the 2/N scaling)
 *   scales    [out, ceil(in / block)] E8M0 bytes chosen by GPTQ (may be NULL)
 * On return W holds the dequantized quantized weights. */
mxq_status mxq_gptq_quantize(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_gptq_options *options, float *weight,
                             size_t out_features, size_t in_features, const double *hessian, double n_tokens,
                             uint8_t *scales, mxq_gptq_stats *stats);

/* tr(dW H dW^T) for dW = a - b, both [out, in], H [in, in]: float32 GEMMs
 * (ssymm, 256 rows at a time), double sums; relative error about 1e-6
 * of sum |dW| |H| |dW|. Converts H to float32 on each call (in^2). */
mxq_status mxq_quant_loss(mxq_ctx *ctx, const float *a, const float *b, size_t out_features, size_t in_features,
                          const double *hessian, double *loss);

#ifdef __cplusplus
}
#endif

#endif
