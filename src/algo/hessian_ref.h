/* A linear input's Hessian as the algorithms see it: whole in this
 * process's memory, or spread over other ranks (a data-parallel group keeps
 * a 70B down_proj's 6.6 GB H in block rows on every rank, and none holds it
 * whole). A spread H is reached through requests only (mxq_remote_hessian),
 * which the job serves over its ranks; the algorithms stay free of MPI.
 * Internal. */
#ifndef MXQ_ALGO_HESSIAN_REF_H
#define MXQ_ALGO_HESSIAN_REF_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/quantize.h"

/* The requests a spread Hessian answers; every one is collective over the
 * ranks holding it, which the caller drives. */
typedef struct {
    void *user;
    /* sums[g] = sum over rows r in [g per, (g+1) per) of d_r H d_r^T, for
     * d [rows, n] on the caller (rows a multiple of per). Before the first
     * GPTQ of the input from H; after it from its factor (to float32
     * precision; the factor replaces H in place). */
    mxq_status (*quadratic)(mxq_ctx *ctx, void *user, mxq_input_id input, const float *d, size_t rows, size_t per,
                            double *sums);
    /* H's diagonal blocks of `block`, [n / block][block][block] (H as it was
     * when the input's first GPTQ began, if it has). */
    mxq_status (*diagonal_blocks)(mxq_ctx *ctx, void *user, mxq_input_id input, int block, double *blocks);
    /* H_ij /= s_i s_j (a scale step folded into the input). */
    mxq_status (*rescale)(mxq_ctx *ctx, void *user, mxq_input_id input, const double *s);
    /* GPTQ of linear li's weight [m, n] (in place, as mxq_gptq_quantize with
     * skip_losses) with the input's H; its scales and dead channels. */
    mxq_status (*gptq)(mxq_ctx *ctx, void *user, mxq_linear_id li, float *weight, size_t m, size_t n,
                       double n_tokens, uint8_t *scales, int *dead_channels);
} mxq_remote_hessian;

/* One input's H: `whole` [n, n], or (whole NULL) `remote`'s input. */
typedef struct {
    const double *whole;
    const mxq_remote_hessian *remote;
    mxq_input_id input;
} mxq_hessian_ref;

/* mxq_awq_search and mxq_awq_clip on either kind of H (the same results
 * for a whole one). */
mxq_status mxq_awq_search_ref(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g,
                              const mxq_hessian_ref *h, const double *mean, const mxq_awq_options *opt, double *best_s,
                              double *best_alpha, double *best_loss);
mxq_status mxq_awq_clip_ref(mxq_ctx *ctx, const mxq_mx_spec *spec, float *w, int out, int in, const mxq_hessian_ref *h,
                            int clip_grid, double max_shrink);

#endif
