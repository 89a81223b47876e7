/* GPTQ's working state and steps, shared by the local driver (gptq.c) and
 * the one that runs on a ScaLAPACK grid (parallel/gptq_grid.c). Internal. */
#ifndef MXQ_ALGO_GPTQ_INTERNAL_H
#define MXQ_ALGO_GPTQ_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/gptq.h"

/* Everything one GPTQ run works on. Columns are in processing order (p);
 * col_of[p] is the original column. The grid driver runs one lazy batch at
 * a time through a view of this struct whose w/acc/r hold just that batch
 * (n = its width); `order` and `scales` then point into the whole layer's
 * arrays, shifted to the batch's first block, and scale_stride is the
 * layer's blocks per row. */
typedef struct {
    const mxq_mx_spec *spec;
    size_t m, n, nblocks, wide; /* wide: columns of cur/q (a micro-block or an MX block) */
    size_t scale_stride;        /* bytes per row of `scales` */
    int B, b1, b2;
    double lambda;    /* the damping added to diag(H') */
    double sum_e2;    /* ||D R||^2 so far */
    float *w;         /* [m, n] original weights; Q as columns are done */
    float *acc;       /* [m, n] A = D[:, done] R[done, :] */
    float *r;         /* [n, n] R, upper: H' = R R^T */
    float *d;         /* [m, b1] D of the current lazy batch */
    float *cur, *q;   /* [m, wide] current values w~ and their quantization */
    double *mass;     /* [nblocks] act-order scratch */
    uint8_t *mb_scales, *scales; /* micro-block scales; [m, scale_stride] chosen scales */
    int *order, *se;  /* [nblocks] block order; [m] exponents of the current block */
    size_t *col_of;   /* [n] */
    uint8_t *dead;    /* [n] H_dd = 0 */
} mxq_gptq_work;

/* The lazy-batch width b1 for `options`: with b2 = 1 rounded up to whole
 * MX blocks (a block's exponent is fixed from the up-to-date values of all
 * its columns, so a block must not straddle a batch). */
int mxq_gptq_batch_width(const mxq_mx_spec *spec, const mxq_gptq_options *options);

/* Block order for act-order: full blocks by descending sum of diag(H),
 * stable; a partial last block stays last. order[p] = original block of
 * processing position p. diag(H)_c is diag[c * diag_stride]; `mass` is
 * scratch of nblocks doubles. */
void mxq_gptq_block_order(const double *diag, size_t diag_stride, size_t n, int block, int act_order, int *order,
                          size_t nblocks, double *mass);

/* The blocked Cholesky factorization M = U^T U (upper, column-major) that
 * both the local path and the grid run, by the same BLAS and LAPACK calls
 * on the same operands, so that their factors are the same bits (LAPACK's
 * dpotrf and ScaLAPACK's pdpotrf block differently, and GPTQ turns the last
 * bits of a factor into different rounding decisions). Block step k:
 *   mxq_chol_panel: block row k from its diagonal on, copied into a panel
 *     [nbk, width] (ld nbk): U_kk by dpotrf, then U_k,k+1: = U_kk^-T M_k,k+1:
 *     by dtrsm. Returns dpotrf's info (0: done).
 *   mxq_chol_update: the part of a later block row i from its diagonal on,
 *     c [nbi, width] (ld ldc): c -= P[:, off:off+nbi]^T P[:, off:off+width],
 *     off = the block row's first column less block k's, one dgemm. */
int mxq_chol_panel(double *panel, int nbk, size_t width);
void mxq_chol_update(const double *panel, int nbk, size_t off, int nbi, size_t width, double *c, size_t ldc);
/* m [n, n] (ld n) in place, in blocks of nb, with a panel of nb x n
 * doubles. Returns 0, or the 1-based row where M is not positive definite
 * (or its factor not finite). */
int mxq_chol_blocked(double *m, size_t n, int nb, double *panel);

/* Columns [i0, i1) of one lazy batch, micro-block by micro-block (or column
 * by column): quantizes them into w, leaves D = W - Q of the batch in d,
 * accumulates ||D R||^2 into sum_e2 when want_loss, and updates acc for the
 * batch's own later columns only (the trailing update is the caller's). */
mxq_status mxq_gptq_sweep_batch(mxq_ctx *ctx, mxq_gptq_work *g, size_t i0, size_t i1, int want_loss);

#endif
