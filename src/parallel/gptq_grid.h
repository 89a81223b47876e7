/* GPTQ of one linear spread over the ranks of a group: the Hessian's
 * Cholesky factor and the weights live block-cyclically on a ScaLAPACK
 * grid, so that no rank holds more than its share of either. Internal. */
#ifndef MXQ_PARALLEL_GPTQ_GRID_H
#define MXQ_PARALLEL_GPTQ_GRID_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/gptq.h"
#include "parallel/parallel.h"

/* Where the Hessian comes from. */
typedef enum {
    MXQ_HESSIAN_ON_ROOT = 0, /* the whole H on `root` (NULL elsewhere) */
    MXQ_HESSIAN_PARTIAL = 1, /* each rank's partial sum over its tokens, all [n, n]; the
                                sum is reduced straight into the grid's distribution */
} mxq_hessian_source;

/* A Hessian accumulated straight into the grid's distribution (see
 * parallel/hessian_split.h): this rank's block rows of M = J H J, unscaled,
 * of which only the upper triangle (H's lower one) and the diagonal blocks
 * are filled. The first GPTQ of it scales, damps and factors it in place
 * and keeps what the later linears of the same input need, which reuse the
 * factor (the same damping, dead channels and order: act_order is off). */
typedef struct {
    double *rows;   /* [n_loc, n] col-major; then the float32 factor U' in the same memory, read as
                       float [n_loc, n] col-major (same lld); a failed first GPTQ leaves it unusable */
    double *diag;   /* [n] diag(H), set on every rank by the first GPTQ */
    uint8_t *dead;  /* [n] dead channels (H order), set by the first GPTQ */
    double scale, lambda; /* M = scale H + lambda I on live channels (set by the first GPTQ) */
    int factored;
} mxq_grid_hessian;

/* The grid's block-row layout, shared with the spread statistics: block
 * row gb of nb rows lives on rank gb % ranks, as its local block gb / ranks.
 * The global row of rank r's local row l, and how many rows rank r holds
 * of n (whole blocks). */
size_t mxq_grid_global_row(size_t nb, int ranks, int r, size_t l);
size_t mxq_grid_local_rows(size_t n, size_t nb, int ranks, int r);

/* Whether an [out, n] linear can run on a grid of `ranks`: n must be a
 * whole number of lazy batches (gptq.block columns), so that every batch
 * is one block of the distribution and sweeps where it lives. */
int mxq_gptq_grid_applies(const mxq_mx_spec *spec, const mxq_gptq_options *options, size_t n, int ranks);

/* mxq_gptq_quantize on a 1-D grid of all ranks of `dist`. Collective: every
 * rank passes the same spec, options and shape (checked), and with a
 * partial H the total n_tokens (with H on root, root's count is used).
 * `weight` [m, n] and `scales` [m, blocks] are used on `root` only (NULL
 * elsewhere), as in mxq_gptq_quantize; `stats` is filled on every rank.
 * The float32 results agree with the local path to rounding: the Cholesky
 * factor is computed by blocks in another order. */
mxq_status mxq_gptq_grid(mxq_ctx *ctx, const mxq_dist *dist, int root, const mxq_mx_spec *spec,
                         const mxq_gptq_options *options, float *weight, size_t m, size_t n, const double *hessian,
                         mxq_hessian_source source, double n_tokens, uint8_t *scales, mxq_gptq_stats *stats);

/* mxq_gptq_grid with the Hessian already spread (h, on every rank; the
 * first call factors it in place). Needs act_order off. */
mxq_status mxq_gptq_grid_spread(mxq_ctx *ctx, const mxq_dist *dist, int root, const mxq_mx_spec *spec,
                                const mxq_gptq_options *options, float *weight, size_t m, size_t n,
                                mxq_grid_hessian *h, double n_tokens, uint8_t *scales, mxq_gptq_stats *stats);

#endif
