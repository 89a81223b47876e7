/* GPTQ on a ScaLAPACK grid: the same algorithm as algo/gptq.c, with the
 * Hessian's factor and the weights spread over the ranks of a group.
 *
 * The local path factors M = J H'_p J (H' in processing order, J the index
 * reversal) as U'^T U' and works with R = J U'^T J, upper, H'_p = R R^T.
 * Here M is distributed by block rows of nb = b1 (the lazy batch) over a
 * P x 1 grid and factored by the local path's blocked Cholesky, step by
 * step (factor: the same calls on the same operands, so the same bits),
 * then rounded to float32 like the local factor; the weights are kept as
 * W' = (W J_p)^T, i.e.
 * column-major [n, m] in reversed processing order, with the same row
 * blocks. Then, for the lazy batch [i0, i1) (one block row, gb = nblk-1-k):
 *   - R[i0:i1, i0:i1] is U' of that block row, reversed: the owner of the
 *     block row sweeps the batch with the local code (mxq_gptq_sweep_batch);
 *   - the trailing update A[:, i1:] += D R[i0:i1, i1:] reads, reversed,
 *     A'(0:n-i1, :) += U'(0:n-i1, n-i1:n-i0) D'(batch, :): the batch's D
 *     (m x b1) broadcast from its owner, then one sgemm per rank on its
 *     rows, summing in the local path's order (trailing_update).
 * Both the factor and the updates are thus the local path's own BLAS calls
 * on the same operands, and the results are the same bits (tested; and on
 * llama-2-70b's down_proj in bench/bench_gptq_grid.sh).
 * Why reversed: a column-major [n, m] block of W' is a row-major [m, n_loc]
 * array, what the MX kernels and the local sweep read; and no distributed
 * index reversal (a permutation across ranks) is ever needed.
 *
 * The losses follow the local path: GPTQ's from ||D R||^2 (summed by the
 * batch owners), round-to-nearest's with one pstrmm. */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "algo/gptq_internal.h"
#include "core/alloc.h"
#include "parallel/gptq_grid.h"
#include "parallel/scalapack.h"

#define SEND_SEGMENT ((size_t)1 << 26) /* floats per message: 256 MB */

typedef struct {
    const mxq_dist *dist;
    int context, have_context;
    int P, me, nb;
    size_t m, n, nblk, nblocks, n_loc, lld;
    int desc_h[9], desc_a[9];
    double *hd;    /* [n_loc, n] col-major: this rank's block rows of M, then U' (factor) */
    float *h;      /* the same memory: U' rounded to float32 (same lld) */
    float *w;      /* [n_loc, m] col-major: W' (Q as batches are done) */
    float *orig;   /* [n_loc, m] W' before dead channels were zeroed (losses) */
    float *acc;    /* [n_loc, m] A', the error feedback */
    float *dpan;   /* [nb, m] col-major: the current batch's D', in processing order (broadcast by its owner) */
    double *diag;  /* [n] diag(H), original order */
    double *staging; /* [2, nb, n] H rows on their way */
    double *mass;
    int *order;
    size_t *col_of;
    uint8_t *dead;   /* [n] processing order */
    uint8_t *scales; /* [m, nblocks] the blocks of this rank's batches */
    mxq_grid_hessian *spread; /* H already here, in hd's layout (hd is its rows); NULL: hd is ours */
    double scale, lambda;
    mxq_gptq_work view; /* one batch, row-major [m, nb], in processing order */
} grid_gptq;

int mxq_gptq_grid_applies(const mxq_mx_spec *spec, const mxq_gptq_options *o, size_t n, int ranks)
{
    const size_t b1 = (size_t)mxq_gptq_batch_width(spec, o);
    /* a block row of H (b1 x n doubles) is one MPI message */
    return ranks >= 1 && b1 > 0 && n >= b1 && n % b1 == 0 && n < (1u << 24) && b1 * n <= INT_MAX;
}

size_t mxq_grid_global_row(size_t nb, int ranks, int r, size_t l)
{
    return ((l / nb) * (size_t)ranks + (size_t)r) * nb + l % nb;
}

size_t mxq_grid_local_rows(size_t n, size_t nb, int ranks, int r)
{
    const size_t blocks = n / nb;
    return blocks > (size_t)r ? ((blocks - (size_t)r + (size_t)ranks - 1) / (size_t)ranks) * nb : 0;
}

/* Global row of W'/M from a local row of rank `p`. */
static size_t global_row(const grid_gptq *gg, int p, size_t l)
{
    return mxq_grid_global_row((size_t)gg->nb, gg->P, p, l);
}

/* numroc's count (n is whole blocks: mxq_gptq_grid_applies). */
static size_t rows_of(const grid_gptq *gg, int p)
{
    return mxq_grid_local_rows(gg->n, (size_t)gg->nb, gg->P, p);
}

/* count floats to or from peer, in messages of at most SEND_SEGMENT */
static mxq_status send_floats(mxq_ctx *ctx, const mxq_dist *dist, const float *buf, size_t count, int peer)
{
    mxq_status status = MXQ_OK;
    for (size_t at = 0; at < count; at += SEND_SEGMENT) {
        int len = (int)(count - at < SEND_SEGMENT ? count - at : SEND_SEGMENT);
        CALL_MPI(ctx, dist->comm, MPI_Send(buf + at, len, MPI_FLOAT, peer, 7, dist->comm));
    }
fail:
    return status;
}

static mxq_status recv_floats(mxq_ctx *ctx, const mxq_dist *dist, float *buf, size_t count, int peer)
{
    mxq_status status = MXQ_OK;
    for (size_t at = 0; at < count; at += SEND_SEGMENT) {
        int len = (int)(count - at < SEND_SEGMENT ? count - at : SEND_SEGMENT);
        CALL_MPI(ctx, dist->comm, MPI_Recv(buf + at, len, MPI_FLOAT, peer, 7, dist->comm, MPI_STATUS_IGNORE));
    }
fail:
    return status;
}

static mxq_status grid_open(mxq_ctx *ctx, grid_gptq *gg)
{
    mxq_status status = MXQ_OK;
    int me_blacs, np_blacs, nprow, npcol, mycol, info = 0, izero = 0;
    Cblacs_pinfo(&me_blacs, &np_blacs);
    int handle = Csys2blacs_handle(gg->dist->comm);
    gg->context = handle;
    Cblacs_gridinit(&gg->context, "Row", gg->P, 1);
    Cfree_blacs_system_handle(handle);
    gg->have_context = 1;
    Cblacs_gridinfo(gg->context, &nprow, &npcol, &gg->me, &mycol);
    /* the distribution is computed from the rank: it must be the grid row */
    CHECK(ctx, nprow == gg->P && npcol == 1 && gg->me == gg->dist->rank, MXQ_ERR_MPI,
          "BLACS made a %d x %d grid of %d ranks (rank %d in row %d), not the %d x 1 in rank order asked for", nprow,
          npcol, gg->P, gg->dist->rank, gg->me, gg->P);
    gg->n_loc = rows_of(gg, gg->me);
    gg->lld = gg->n_loc ? gg->n_loc : 1;
    int n = (int)gg->n, m = (int)gg->m, lld = (int)gg->lld;
    descinit_(gg->desc_h, &n, &n, &gg->nb, &gg->nb, &izero, &izero, &gg->context, &lld, &info);
    CHECK(ctx, info == 0, MXQ_ERR_LAPACK, "descinit of the distributed Hessian failed (info=%d)", info);
    descinit_(gg->desc_a, &n, &m, &gg->nb, &gg->nb, &izero, &izero, &gg->context, &lld, &info);
    CHECK(ctx, info == 0, MXQ_ERR_LAPACK, "descinit of the distributed weights failed (info=%d)", info);
fail:
    return status;
}

static mxq_status view_alloc(mxq_ctx *ctx, grid_gptq *gg, const mxq_mx_spec *spec, const mxq_gptq_options *o)
{
    mxq_status status = MXQ_OK;
    mxq_gptq_work *v = &gg->view;
    const size_t m = gg->m, nb = (size_t)gg->nb;
    v->spec = spec;
    v->m = m;
    v->n = nb;
    v->B = spec->block;
    v->b1 = gg->nb;
    v->b2 = o->microblock;
    v->wide = (size_t)(v->b2 > 1 ? v->b2 : v->B);
    v->nblocks = gg->nblocks;
    v->scale_stride = gg->nblocks;
    v->w = mxq_alloc_floats(m * nb);
    v->acc = mxq_alloc_floats(m * nb);
    v->r = mxq_alloc_floats(nb * nb);
    v->d = mxq_alloc_floats(m * nb);
    v->cur = malloc(m * v->wide * sizeof(float));
    v->q = malloc(m * v->wide * sizeof(float));
    v->mb_scales = malloc(m * mxq_mx_blocks_per_row(v->wide, v->B));
    v->se = malloc(m * sizeof(int));
    CHECK_ALLOC(ctx, v->w && v->acc && v->r && v->d && v->cur && v->q && v->mb_scales && v->se,
                (3 * m * nb + nb * nb) * sizeof(float), "the GPTQ batch");
fail:
    return status;
}

static mxq_status grid_alloc(mxq_ctx *ctx, grid_gptq *gg, const mxq_mx_spec *spec, const mxq_gptq_options *o)
{
    mxq_status status = MXQ_OK;
    const size_t m = gg->m, n = gg->n, local = gg->lld * (m > n ? m : n);
    gg->hd = gg->spread ? gg->spread->rows : mxq_alloc(gg->lld * n * sizeof(double));
    gg->w = mxq_alloc_floats(gg->lld * m);
    gg->orig = o->skip_losses ? NULL : mxq_alloc_floats(gg->lld * m);
    gg->acc = mxq_alloc_floats(gg->lld * m);
    gg->dpan = mxq_alloc_floats((size_t)gg->nb * m);
    gg->diag = malloc(n * sizeof(double));
    gg->staging = mxq_alloc(2 * (size_t)gg->nb * n * sizeof(double));
    gg->mass = malloc(gg->nblocks * sizeof(double));
    gg->order = malloc(gg->nblocks * sizeof(int));
    gg->col_of = malloc(n * sizeof(size_t));
    gg->dead = calloc(n, 1);
    gg->scales = calloc(m * gg->nblocks, 1);
    CHECK_ALLOC(ctx,
                gg->hd && gg->w && (gg->orig || o->skip_losses) && gg->acc && gg->dpan && gg->diag && gg->staging &&
                    gg->mass && gg->order && gg->col_of && gg->dead && gg->scales,
                local * 3 * sizeof(float) + gg->lld * n * sizeof(double), "the distributed GPTQ");
    memset(gg->acc, 0, gg->lld * m * sizeof(float));
    CALL(ctx, view_alloc(ctx, gg, spec, o));
fail:
    return status;
}

static void grid_free(grid_gptq *gg)
{
    if (!gg->spread)
        free(gg->hd);
    free(gg->w);
    free(gg->orig);
    free(gg->acc);
    free(gg->dpan);
    free(gg->diag);
    free(gg->staging);
    free(gg->mass);
    free(gg->order);
    free(gg->col_of);
    free(gg->dead);
    free(gg->scales);
    free(gg->view.w);
    free(gg->view.acc);
    free(gg->view.r);
    free(gg->view.d);
    free(gg->view.cur);
    free(gg->view.q);
    free(gg->view.mb_scales);
    free(gg->view.se);
    if (gg->have_context)
        Cblacs_gridexit(gg->context);
}

/* diag(H) from a spread H's block rows (M(g, g) = H(n-1-g, n-1-g)),
 * summed over the ranks into every rank, and kept for the later linears. */
static mxq_status spread_diagonal(mxq_ctx *ctx, grid_gptq *gg)
{
    mxq_status status = MXQ_OK;
    const size_t n = gg->n;
    memset(gg->diag, 0, n * sizeof(double));
    for (size_t l = 0; l < gg->n_loc; l++) {
        const size_t g = global_row(gg, gg->me, l);
        gg->diag[n - 1 - g] = gg->hd[l + g * gg->lld];
    }
    CALL_MPI(ctx, gg->dist->comm, MPI_Allreduce(MPI_IN_PLACE, gg->diag, (int)n, MPI_DOUBLE, MPI_SUM, gg->dist->comm));
    memcpy(gg->spread->diag, gg->diag, n * sizeof(double));
fail:
    return status;
}

/* diag(H) on every rank, then what follows from it alone: the processing
 * order (act-order), the dead channels and the damping. */
static mxq_status agree_diagonal(mxq_ctx *ctx, grid_gptq *gg, int root, const double *hessian,
                                 mxq_hessian_source source, const mxq_gptq_options *o, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t n = gg->n;
    if (hessian)
        for (size_t c = 0; c < n; c++)
            gg->diag[c] = hessian[c * n + c];
    if (gg->spread && gg->spread->factored)
        memcpy(gg->diag, gg->spread->diag, n * sizeof(double));
    else if (gg->spread)
        CALL(ctx, spread_diagonal(ctx, gg));
    else if (source == MXQ_HESSIAN_PARTIAL)
        CALL_MPI(ctx, gg->dist->comm, MPI_Allreduce(MPI_IN_PLACE, gg->diag, (int)n, MPI_DOUBLE, MPI_SUM, gg->dist->comm));
    else
        CALL_MPI(ctx, gg->dist->comm, MPI_Bcast(gg->diag, (int)n, MPI_DOUBLE, root, gg->dist->comm));
    mxq_gptq_block_order(gg->diag, 1, n, gg->view.B, o->act_order, gg->order, gg->nblocks, gg->mass);
    for (size_t p = 0, b = 0; b < gg->nblocks; b++)
        for (size_t c = (size_t)gg->order[b] * gg->view.B; c < (size_t)(gg->order[b] + 1) * gg->view.B && c < n; c++)
            gg->col_of[p++] = c;
    double mean_diag = 0;
    for (size_t p = 0; p < n; p++) {
        double hd = gg->scale * gg->diag[gg->col_of[p]];
        if (hd == 0.0) {
            hd = 1.0;
            gg->dead[p] = 1;
            stats->dead_channels++;
        }
        mean_diag += hd;
    }
    gg->lambda = o->damp * mean_diag / (double)n;
    if (gg->spread) { /* what the later linears of the input and its losses need */
        gg->spread->scale = gg->scale;
        gg->spread->lambda = gg->lambda;
        for (size_t p = 0; p < n; p++)
            gg->spread->dead[gg->col_of[p]] = gg->dead[p];
    }
fail:
    return status;
}

/* Block row gb of M from the H rows in `rows` [nb, n] (original order):
 * M(g', c') = H'[col_of[n-1-g'], col_of[n-1-c']], damped on the diagonal. */
static void hessian_block_to_local(grid_gptq *gg, size_t gb, const double *rows)
{
    const size_t n = gg->n, nb = (size_t)gg->nb, lb = (gb / (size_t)gg->P) * nb;
    for (size_t cr = 0; cr < n; cr++) {
        const size_t src_col = gg->col_of[n - 1 - cr];
        double *dst = gg->hd + lb + cr * gg->lld;
        for (size_t t = 0; t < nb; t++)
            dst[t] = gg->scale * rows[t * n + src_col];
    }
    for (size_t t = 0; t < nb; t++) {
        const size_t g = gb * nb + t, p = n - 1 - g;
        double hd = gg->dead[p] ? 1.0 : gg->scale * gg->diag[gg->col_of[p]];
        gg->hd[lb + t + g * gg->lld] = hd + gg->lambda;
    }
}

/* A spread H's block rows made M in place: scaled, the diagonal damped, as
 * hessian_block_to_local does (the same operations, so the same values). */
static void spread_to_local(grid_gptq *gg)
{
    for (size_t c = 0; c < gg->n; c++)
        for (size_t l = 0; l < gg->n_loc; l++)
            gg->hd[l + c * gg->lld] *= gg->scale;
    for (size_t l = 0; l < gg->n_loc; l++) {
        const size_t g = global_row(gg, gg->me, l), p = gg->n - 1 - g;
        double hd = gg->dead[p] ? 1.0 : gg->scale * gg->diag[gg->col_of[p]];
        gg->hd[l + g * gg->lld] = hd + gg->lambda;
    }
}

/* The Hessian into the grid, one block row at a time: summed from every
 * rank's part straight onto the block's owner (a reduce-scatter in the
 * grid's distribution), or sent there from root. */
static mxq_status distribute_hessian(mxq_ctx *ctx, grid_gptq *gg, int root, const double *hessian,
                                     mxq_hessian_source source)
{
    mxq_status status = MXQ_OK;
    const size_t n = gg->n, nb = (size_t)gg->nb;
    if (gg->spread) {
        if (!gg->spread->factored)
            spread_to_local(gg);
        return MXQ_OK;
    }
    double *send = gg->staging, *recv = gg->staging + nb * n;
    const int count = (int)(nb * n);
    for (size_t gb = 0; gb < gg->nblk; gb++) {
        const int owner = (int)(gb % (size_t)gg->P), me = gg->dist->rank;
        if (hessian)
            for (size_t t = 0; t < nb; t++)
                memcpy(send + t * n, hessian + gg->col_of[n - 1 - (gb * nb + t)] * n, n * sizeof(double));
        if (source == MXQ_HESSIAN_PARTIAL) {
            CALL_MPI(ctx, gg->dist->comm,
                     MPI_Reduce(send, recv, count, MPI_DOUBLE, MPI_SUM, owner, gg->dist->comm));
        } else if (owner != root && (me == root || me == owner)) {
            if (me == root)
                CALL_MPI(ctx, gg->dist->comm, MPI_Send(send, count, MPI_DOUBLE, owner, 8, gg->dist->comm));
            else
                CALL_MPI(ctx, gg->dist->comm,
                         MPI_Recv(recv, count, MPI_DOUBLE, root, 8, gg->dist->comm, MPI_STATUS_IGNORE));
        } else if (me == owner) {
            memcpy(recv, send, (size_t)count * sizeof(double));
        }
        if (me == owner)
            hessian_block_to_local(gg, gb, recv);
    }
fail:
    return status;
}

/* Rank p's block rows of W' ([rows_of(p), m] col-major) from W [m, n] on
 * root, and back. */
static void pack_weights(const grid_gptq *gg, int p, float *weight, float *local, int to_local)
{
    const size_t rows = rows_of(gg, p), n = gg->n;
    for (size_t r = 0; r < gg->m; r++)
        for (size_t l = 0; l < rows; l++) {
            const size_t c = gg->col_of[n - 1 - global_row(gg, p, l)];
            if (to_local)
                local[l + r * rows] = weight[r * n + c];
            else
                weight[r * n + c] = local[l + r * rows];
        }
}

/* W from root into W' on the grid; dead channels zeroed (orig keeps them). */
static mxq_status distribute_weights(mxq_ctx *ctx, grid_gptq *gg, int root, float *weight, float *buf)
{
    mxq_status status = MXQ_OK;
    const int me = gg->dist->rank;
    if (me == root) {
        for (int p = 0; p < gg->P; p++) {
            if (p == me) {
                pack_weights(gg, p, weight, gg->w, 1);
            } else {
                pack_weights(gg, p, weight, buf, 1);
                CALL(ctx, send_floats(ctx, gg->dist, buf, rows_of(gg, p) * gg->m, p));
            }
        }
    } else {
        CALL(ctx, recv_floats(ctx, gg->dist, gg->w, gg->n_loc * gg->m, root));
    }
    if (gg->orig)
        memcpy(gg->orig, gg->w, gg->n_loc * gg->m * sizeof(float));
    for (size_t l = 0; l < gg->n_loc; l++)
        if (gg->dead[gg->n - 1 - global_row(gg, me, l)])
            for (size_t r = 0; r < gg->m; r++)
                gg->w[l + r * gg->lld] = 0.0f;
fail:
    return status;
}

/* Q from the grid into W [m, n] on root; the scales ORed together (each
 * block's were written by its batch's owner alone). */
static mxq_status collect_results(mxq_ctx *ctx, grid_gptq *gg, int root, float *weight, uint8_t *scales, float *buf)
{
    mxq_status status = MXQ_OK;
    const int me = gg->dist->rank;
    const size_t scale_bytes = gg->m * gg->nblocks;
    if (me == root) {
        for (int p = 0; p < gg->P; p++) {
            if (p != me)
                CALL(ctx, recv_floats(ctx, gg->dist, buf, rows_of(gg, p) * gg->m, p));
            pack_weights(gg, p, weight, p == me ? gg->w : buf, 0);
        }
    } else {
        CALL(ctx, send_floats(ctx, gg->dist, gg->w, gg->n_loc * gg->m, root));
    }
    CALL_MPI(ctx, gg->dist->comm,
             MPI_Reduce(me == root ? MPI_IN_PLACE : gg->scales, me == root ? gg->scales : NULL, (int)scale_bytes,
                        MPI_UINT8_T, MPI_BOR, root, gg->dist->comm));
    if (me == root && scales)
        memcpy(scales, gg->scales, scale_bytes);
fail:
    return status;
}

/* The owner's part of batch k: into the row-major view in processing
 * order, the local sweep, and back (Q into W', the batch's D into dpan). */
static mxq_status sweep_batch_here(mxq_ctx *ctx, grid_gptq *gg, size_t k, int want_loss)
{
    mxq_status status = MXQ_OK;
    mxq_gptq_work *v = &gg->view;
    const size_t m = gg->m, nb = (size_t)gg->nb, gb = gg->nblk - 1 - k;
    const size_t lb = (gb / (size_t)gg->P) * nb, base = gb * nb, ld = gg->lld;
    v->order = gg->order + k * nb / (size_t)v->B;
    v->scales = gg->scales;
    for (size_t r = 0; r < m; r++)
        for (size_t t = 0; t < nb; t++) {
            v->w[r * nb + t] = gg->w[lb + nb - 1 - t + r * ld];
            v->acc[r * nb + t] = gg->acc[lb + nb - 1 - t + r * ld];
        }
    memset(v->r, 0, nb * nb * sizeof(float));
    for (size_t a = 0; a < nb; a++) /* R[i0+a, i0+b] = U'(base+nb-1-b, base+nb-1-a), b >= a */
        for (size_t b = a; b < nb; b++)
            v->r[a * nb + b] = gg->h[(lb + nb - 1 - b) + (base + nb - 1 - a) * ld];
    CALL(ctx, mxq_gptq_sweep_batch(ctx, v, 0, nb, want_loss));
    for (size_t r = 0; r < m; r++)
        for (size_t t = 0; t < nb; t++) {
            gg->w[lb + nb - 1 - t + r * ld] = v->w[r * nb + t];
            gg->dpan[t + r * nb] = v->d[r * nb + t];
        }
fail:
    return status;
}

/* The trailing update after the batch in global block row gb: every rank's
 * rows of later columns (its local rows before block gb: a prefix),
 * A' += U'(rows, batch) D', the batch's D (processing order) broadcast
 * from its owner. One sgemm whose sum runs over the batch in processing
 * order, as the local path's does (the factor's columns are reversed into
 * a panel for it): the same values bit for bit, which psgemm, summing in
 * reversed order, did not give (0.03% of a 70B down_proj's values). */
static mxq_status trailing_update(mxq_ctx *ctx, grid_gptq *gg, size_t gb, int owner, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t m = gg->m, nb = (size_t)gg->nb, me = (size_t)gg->me, P = (size_t)gg->P;
    const size_t rows = gb > me ? (gb - me + P - 1) / P * nb : 0, base = gb * nb;
    float *apan = (float *)gg->staging; /* [rows, nb], free after the factor */
    double tg = mxq_time_now();
    CALL(ctx, mxq_bcast_floats(ctx, gg->dist, gg->dpan, nb * m, owner));
    for (size_t k = 0; k < nb; k++)
        memcpy(apan + k * rows, gg->h + (base + nb - 1 - k) * gg->lld, rows * sizeof(float));
    if (rows > 0)
        cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)m, (int)nb, 1.0f, apan, (int)rows,
                    gg->dpan, (int)nb, 1.0f, gg->acc, (int)gg->lld);
    stats->seconds_gemm += mxq_time_now() - tg;
    stats->gemm_flops += 2.0 * (double)m * (double)(gb * nb) * (double)nb;
fail:
    return status;
}

/* The lazy batches in processing order: each swept where it lives, then
 * the trailing update of every later column. */
static mxq_status grid_sweep(mxq_ctx *ctx, grid_gptq *gg, int want_loss, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    for (size_t k = 0; k < gg->nblk; k++) {
        const size_t gb = gg->nblk - 1 - k;
        const int owner = (int)(gb % (size_t)gg->P);
        double tq = mxq_time_now();
        mxq_status local = owner == gg->me ? sweep_batch_here(ctx, gg, k, want_loss) : MXQ_OK;
        stats->seconds_quant += mxq_time_now() - tq;
        AGREE(ctx, gg->dist, "gptq.grid.batch", local);
        if (gb > 0)
            CALL(ctx, trailing_update(ctx, gg, gb, owner, stats));
    }
fail:
    return status;
}

/* Block step k of mxq_chol_blocked on the grid: block row k's owner
 * factors its panel (the local path's calls), which is agreed, the panel
 * goes to every rank, and each updates its own later block rows with the
 * local path's dgemm. */
static mxq_status factor_step(mxq_ctx *ctx, grid_gptq *gg, size_t k, double *panel, const mxq_gptq_options *o)
{
    mxq_status status = MXQ_OK;
    const size_t nb = (size_t)gg->nb, n = gg->n, width = n - k * nb;
    const int owner = (int)(k % (size_t)gg->P);
    int info = 0;
    if (gg->me == owner) {
        double *row = gg->hd + (k / (size_t)gg->P) * nb + k * nb * gg->lld; /* block row k from its diagonal on */
        for (size_t c = 0; c < width; c++)
            memcpy(panel + c * nb, row + c * gg->lld, nb * sizeof(double));
        info = mxq_chol_panel(panel, gg->nb, width);
        for (size_t d = 0; info == 0 && d < nb; d++) /* dpotrf lets a NaN through */
            info = isfinite(panel[d + d * nb]) ? 0 : (int)d + 1;
        for (size_t c = 0; info == 0 && c < width; c++)
            memcpy(row + c * gg->lld, panel + c * nb, nb * sizeof(double));
    }
    CHECK_AGREED(ctx, gg->dist, "gptq.grid.factor", info == 0, MXQ_ERR_LAPACK,
                 "GPTQ: Cholesky factorization of the damped Hessian on the grid failed (at row %zu of %zu): it is "
                 "not positive definite; raise gptq.damp (now %g; a rank-deficient Hessian, e.g. fewer tokens than "
                 "inputs, needs about 1e-5 or more)",
                 k * nb + (size_t)info, n, o->damp);
    CALL_MPI(ctx, gg->dist->comm, MPI_Bcast(panel, (int)(nb * width), MPI_DOUBLE, owner, gg->dist->comm));
    for (size_t lb = 0; lb * nb < gg->n_loc; lb++) {
        const size_t i = lb * (size_t)gg->P + (size_t)gg->me; /* global block row */
        if (i > k)
            mxq_chol_update(panel, gg->nb, (i - k) * nb, gg->nb, n - i * nb, gg->hd + lb * nb + i * nb * gg->lld,
                            gg->lld);
    }
fail:
    return status;
}

/* The factor U' of M (as the local path computes it, bit for bit), then
 * rounded to float32 in place. The panel is the staging buffer (nb x n
 * doubles of its 2 nb x n), free once the Hessian is distributed. */
static mxq_status factor(mxq_ctx *ctx, grid_gptq *gg, const mxq_gptq_options *o)
{
    mxq_status status = MXQ_OK;
    gg->h = (float *)gg->hd;
    if (gg->spread && gg->spread->factored) /* an earlier linear of the input factored it */
        return MXQ_OK;
    for (size_t k = 0; k < gg->nblk; k++)
        CALL(ctx, factor_step(ctx, gg, k, gg->staging, o));
    for (size_t i = 0; gg->n_loc && i < gg->lld * gg->n; i++) /* float i lies within double i / 2: never ahead of the reads */
        gg->h[i] = (float)gg->hd[i];
    if (gg->spread)
        gg->spread->factored = 1;
fail:
    return status;
}

/* As the local path's losses: GPTQ's from the batch owners' ||D R||^2,
 * round-to-nearest's as ||E R||^2 with E' = U' E' (pstrmm, into acc). */
static mxq_status grid_losses(mxq_ctx *ctx, grid_gptq *gg, double n_tokens, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t m = gg->m, n = gg->n, ld = gg->lld;
    double sums[4] = {gg->view.sum_e2, 0, 0, 0}; /* ||D R||^2, ||D||^2, ||E R||^2, ||E||^2 */
    double tl = mxq_time_now();
    AGREE(ctx, gg->dist, "gptq.grid.losses",
          gg->n_loc ? mxq_mx_quantize_rows(ctx, gg->view.spec, gg->orig, m, gg->n_loc, NULL, NULL, gg->acc) : MXQ_OK);
    for (size_t l = 0; l < gg->n_loc; l++) {
        const int dead = gg->dead[n - 1 - global_row(gg, gg->me, l)];
        for (size_t r = 0; r < m; r++) {
            const size_t i = l + r * ld;
            double dv = dead ? 0.0 : (double)gg->orig[i] - (double)gg->w[i];
            double ev = dead ? 0.0 : (double)gg->orig[i] - (double)gg->acc[i];
            gg->acc[i] = (float)ev;
            sums[1] += dv * dv;
            sums[3] += ev * ev;
        }
    }
    const int mi = (int)m, ni = (int)n, ione = 1;
    const float one = 1.0f;
    pstrmm_("L", "U", "N", "N", &ni, &mi, &one, gg->h, &ione, &ione, gg->desc_h, gg->acc, &ione, &ione, gg->desc_a, 1,
            1, 1, 1);
    for (size_t l = 0; l < gg->n_loc; l++)
        for (size_t r = 0; r < m; r++)
            sums[2] += (double)gg->acc[l + r * ld] * (double)gg->acc[l + r * ld];
    CALL_MPI(ctx, gg->dist->comm, MPI_Allreduce(MPI_IN_PLACE, sums, 4, MPI_DOUBLE, MPI_SUM, gg->dist->comm));
    stats->loss = fmax(0.0, 0.5 * n_tokens * (sums[0] - gg->lambda * sums[1]));
    stats->loss_rtn = fmax(0.0, 0.5 * n_tokens * (sums[2] - gg->lambda * sums[3]));
    stats->seconds_loss = mxq_time_now() - tl;
fail:
    return status;
}

/* Root's checks of what only it holds, agreed: the local path's messages. */
static mxq_status check_root_input(mxq_ctx *ctx, const mxq_dist *dist, int root, const mxq_mx_spec *spec,
                                   const mxq_gptq_options *o, const float *weight, size_t m, size_t n,
                                   double n_tokens)
{
    mxq_status status = MXQ_OK, local = mxq_gptq_check(ctx, o, spec);
    unsigned long long root_shape[2] = {m, n};
    CALL_MPI(ctx, dist->comm, MPI_Bcast(root_shape, 2, MPI_UNSIGNED_LONG_LONG, root, dist->comm));
    if (local == MXQ_OK && (root_shape[0] != m || root_shape[1] != n)) {
        mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__, "GPTQ on a grid: this rank has [%zu, %zu], root [%llu, %llu]",
                      m, n, root_shape[0], root_shape[1]);
        local = MXQ_ERR_ARG;
    }
    if (local == MXQ_OK && !mxq_gptq_grid_applies(spec, o, n, dist->size)) {
        mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__,
                      "GPTQ on a grid: %zu inputs are not a whole number of gptq.block batches (%d)", n,
                      mxq_gptq_batch_width(spec, o));
        local = MXQ_ERR_ARG;
    }
    /* the scales gathered on root are one MPI message */
    if (local == MXQ_OK &&
        (m == 0 || m >= (1u << 24) || !(n_tokens > 0) || m * mxq_mx_blocks_per_row(n, spec->block) >= INT_MAX)) {
        mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__, "GPTQ: bad weight shape [%zu, %zu] or no tokens", m, n);
        local = MXQ_ERR_ARG;
    }
    for (size_t i = 0; local == MXQ_OK && dist->rank == root && i < m * n; i++)
        if (!isfinite(weight[i])) {
            mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__, "GPTQ: weight [%zu, %zu] is not finite (%g)", i / n,
                          i % n, (double)weight[i]);
            local = MXQ_ERR_ARG;
        }
    AGREE(ctx, dist, "gptq.grid.input", local);
fail:
    return status;
}

static mxq_status grid_prepare(mxq_ctx *ctx, grid_gptq *gg, int root, const mxq_mx_spec *spec,
                               const mxq_gptq_options *o, float *weight, const double *hessian,
                               mxq_hessian_source source, float **buf, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    double t0 = mxq_time_now();
    const size_t most_rows = rows_of(gg, 0); /* rank 0's share is the largest */
    mxq_status local = grid_open(ctx, gg);
    if (local == MXQ_OK)
        local = grid_alloc(ctx, gg, spec, o);
    if (local == MXQ_OK && gg->dist->rank == root) {
        *buf = mxq_alloc_floats((most_rows ? most_rows : 1) * gg->m);
        if (!*buf) {
            mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__,
                          "out of memory allocating %zu bytes for the weights on their way to the grid",
                          most_rows * gg->m * sizeof(float));
            local = MXQ_ERR_NOMEM;
        }
    }
    AGREE(ctx, gg->dist, "gptq.grid.alloc", local);
    CALL(ctx, agree_diagonal(ctx, gg, root, hessian, source, o, stats));
    CALL(ctx, distribute_hessian(ctx, gg, root, hessian, source));
    CALL(ctx, distribute_weights(ctx, gg, root, weight, *buf));
    CALL(ctx, factor(ctx, gg, o));
    stats->seconds_factor = mxq_time_now() - t0;
fail:
    return status;
}

static mxq_status grid_run(mxq_ctx *ctx, const mxq_dist *dist, int root, const mxq_mx_spec *spec,
                           const mxq_gptq_options *o, float *weight, size_t m, size_t n, const double *hessian,
                           mxq_hessian_source source, mxq_grid_hessian *spread, double n_tokens, uint8_t *scales,
                           mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    grid_gptq gg = {.dist = dist, .P = dist->size, .m = m, .n = n, .spread = spread};
    float *buf = NULL;
    memset(stats, 0, sizeof(*stats));
    if (source == MXQ_HESSIAN_ON_ROOT) /* root's count is the one that goes with its H */
        CALL_MPI(ctx, dist->comm, MPI_Bcast(&n_tokens, 1, MPI_DOUBLE, root, dist->comm));
    CALL(ctx, check_root_input(ctx, dist, root, spec, o, weight, m, n, n_tokens));
    gg.nb = mxq_gptq_batch_width(spec, o);
    gg.nblk = n / (size_t)gg.nb;
    gg.nblocks = mxq_mx_blocks_per_row(n, spec->block);
    gg.scale = 2.0 / n_tokens;
    CALL(ctx, grid_prepare(ctx, &gg, root, spec, o, weight, hessian, source, &buf, stats));
    CALL(ctx, grid_sweep(ctx, &gg, !o->skip_losses, stats));
    if (!o->skip_losses)
        CALL(ctx, grid_losses(ctx, &gg, n_tokens, stats));
    CALL(ctx, collect_results(ctx, &gg, root, weight, scales, buf));
fail:
    free(buf);
    grid_free(&gg);
    return status;
}

mxq_status mxq_gptq_grid(mxq_ctx *ctx, const mxq_dist *dist, int root, const mxq_mx_spec *spec,
                         const mxq_gptq_options *o, float *weight, size_t m, size_t n, const double *hessian,
                         mxq_hessian_source source, double n_tokens, uint8_t *scales, mxq_gptq_stats *stats)
{
    return grid_run(ctx, dist, root, spec, o, weight, m, n, hessian, source, NULL, n_tokens, scales, stats);
}

mxq_status mxq_gptq_grid_spread(mxq_ctx *ctx, const mxq_dist *dist, int root, const mxq_mx_spec *spec,
                                const mxq_gptq_options *o, float *weight, size_t m, size_t n, mxq_grid_hessian *h,
                                double n_tokens, uint8_t *scales, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    /* the block rows are laid out in input order: act-order would permute them across ranks */
    CHECK(ctx, !o->act_order, MXQ_ERR_ARG, "GPTQ on a spread Hessian needs gptq.act_order: false");
    CALL(ctx, grid_run(ctx, dist, root, spec, o, weight, m, n, NULL, MXQ_HESSIAN_PARTIAL, h, n_tokens, scales, stats));
fail:
    return status;
}
