/* Hessians spread over a group in block rows (see hessian_split.h).
 *
 * Layout, as parallel/gptq_grid.c factors it: with n inputs and blocks of
 * nb, M = J H J (J the index reversal) is cut into block rows, block row gb
 * on rank gb % P as local block gb / P; local row l of it is M's row g =
 * global_row(l), i.e. H's row n-1-g, and column c' is H's column n-1-c',
 * column-major [n_loc, n]. Only M's upper triangle is filled (c' >= the
 * block's first row: H's lower triangle and whole diagonal blocks); the
 * rest stays zero. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "algo/calib_stats.h"
#include "algo/layer_quant.h"
#include "core/alloc.h"
#include "parallel/hessian_split.h"

/* floats of activations gathered per exchange: 256 MB */
#define GATHER_FLOATS ((size_t)1 << 26)

int mxq_hsplit_applies(int features, int nb, int block)
{
    return nb > 0 && block > 0 && features > 0 && features % nb == 0 && nb % block == 0;
}


double mxq_hsplit_bytes(int features, int nb, int ranks, int r)
{
    const double rows = (double)mxq_grid_local_rows((size_t)features, (size_t)nb, ranks, r);
    return rows * features * sizeof(double) + rows * nb * sizeof(double) + 4.0 * features * sizeof(double) +
           (double)features;
}

mxq_status mxq_hsplit_init(mxq_ctx *ctx, const mxq_dist *dist, int features, int nb, mxq_hsplit *hs)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)features;
    memset(hs, 0, sizeof(*hs));
    CHECK(ctx, nb > 0 && features % nb == 0, MXQ_ERR_INTERNAL, "%d inputs are not whole blocks of %d", features, nb);
    hs->features = features;
    hs->nb = nb;
    hs->nblk = f / (size_t)nb;
    hs->n_loc = mxq_grid_local_rows(f, (size_t)nb, dist->size, dist->rank);
    hs->grid.rows = mxq_alloc((hs->n_loc ? hs->n_loc : 1) * f * sizeof(double));
    hs->saved_blocks = malloc((hs->n_loc ? hs->n_loc : 1) * (size_t)nb * sizeof(double));
    hs->grid.diag = malloc(f * sizeof(double));
    hs->grid.dead = malloc(f);
    hs->abs.features = features;
    hs->abs.abs_max = calloc(f, sizeof(double));
    hs->abs.abs_sum = calloc(f, sizeof(double));
    CHECK_ALLOC(ctx,
                hs->grid.rows && hs->saved_blocks && hs->grid.diag && hs->grid.dead && hs->abs.abs_max &&
                    hs->abs.abs_sum,
                hs->n_loc * f * sizeof(double), "this rank's block rows of a spread Hessian");
    mxq_hsplit_zero(hs);
    return MXQ_OK;
fail:
    mxq_hsplit_free(hs);
    return status;
}

void mxq_hsplit_zero(mxq_hsplit *hs)
{
    const size_t f = (size_t)hs->features;
    memset(hs->grid.rows, 0, hs->n_loc * f * sizeof(double));
    memset(hs->abs.abs_max, 0, f * sizeof(double));
    memset(hs->abs.abs_sum, 0, f * sizeof(double));
    hs->abs.n_tokens = 0;
    hs->grid.factored = 0;
}

void mxq_hsplit_free(mxq_hsplit *hs)
{
    free(hs->grid.rows);
    free(hs->saved_blocks);
    free(hs->grid.diag);
    free(hs->grid.dead);
    free(hs->abs.abs_max);
    free(hs->abs.abs_sum);
    memset(hs, 0, sizeof(*hs));
}

/* Tokens a rank adds per exchange: a micro-batch's, up to GATHER_FLOATS
 * gathered. */
static size_t slab_tokens(int widest, int ranks, size_t most_tokens)
{
    size_t t = GATHER_FLOATS / ((size_t)widest * (size_t)ranks);
    t = t < most_tokens ? t : most_tokens;
    return t ? t : 1;
}

double mxq_hsplit_work_bytes(int widest, int nb, int ranks, size_t most_tokens)
{
    return (double)slab_tokens(widest, ranks, most_tokens) * ranks * widest * sizeof(float) +
           (double)widest * nb * sizeof(float);
}

mxq_status mxq_hsplit_work_init(mxq_ctx *ctx, const mxq_dist *dist, int widest, int nb, size_t most_tokens,
                                mxq_hsplit_work *w)
{
    mxq_status status = MXQ_OK;
    memset(w, 0, sizeof(*w));
    w->slab = slab_tokens(widest, dist->size, most_tokens);
    w->gathered = mxq_alloc_floats(w->slab * (size_t)dist->size * (size_t)widest);
    w->panel = mxq_alloc_floats((size_t)widest * (size_t)nb);
    w->counts = malloc(2 * (size_t)dist->size * sizeof(int));
    w->displs = malloc((size_t)dist->size * sizeof(int));
    CHECK_ALLOC(ctx, w->gathered && w->panel && w->counts && w->displs,
                mxq_hsplit_work_bytes(widest, nb, dist->size, most_tokens),
                "the exchange of activations for the spread Hessians");
fail:
    return status;
}

void mxq_hsplit_work_free(mxq_hsplit_work *w)
{
    free(w->gathered);
    free(w->panel);
    free(w->counts);
    free(w->displs);
    memset(w, 0, sizeof(*w));
}

/* Local row l's global row of M on rank r. */
static size_t global_row(const mxq_hsplit *hs, int ranks, int r, size_t l)
{
    return mxq_grid_global_row((size_t)hs->nb, ranks, r, l);
}

/* This rank's block rows += the Gram product of xg [T, n] (every rank's
 * tokens): for block row gb, H rows [r0, r1) against columns [0, r1), in
 * float32 over the slab (the local path sums chunks of up to 8192 tokens
 * so), then added in double. */
static void gram_rows(mxq_hsplit *hs, const mxq_dist *dist, mxq_hsplit_work *w, const float *xg, size_t T)
{
    const size_t n = (size_t)hs->features, nb = (size_t)hs->nb;
    for (size_t lb = 0; lb * nb < hs->n_loc; lb++) {
        const size_t gb = lb * (size_t)dist->size + (size_t)dist->rank, r1 = n - gb * nb, r0 = r1 - nb;
        /* panel [r1, nb]: panel[c][j] = H(c, r0 + j) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)r1, (int)nb, (int)T, 1.0f, xg, (int)n, xg + r0,
                    (int)n, 0.0f, w->panel, (int)nb);
        for (size_t cc = gb * nb; cc < n; cc++) {
            double *dst = hs->grid.rows + cc * hs->n_loc + lb * nb;
            const float *src = w->panel + (n - 1 - cc) * nb;
            for (size_t t = 0; t < nb; t++)
                dst[t] += (double)src[nb - 1 - t];
        }
    }
}

/* One exchange: agreed first (a rank that failed stops every rank here),
 * then every rank's count and whether it has more. */
static mxq_status exchange_counts(mxq_ctx *ctx, const mxq_dist *dist, mxq_hsplit_work *w, int count, int more,
                                  mxq_status local, size_t *total, int *any_more)
{
    mxq_status status = MXQ_OK;
    int mine[2] = {count, more};
    AGREE(ctx, dist, "spread.exchange", local);
    CALL_MPI(ctx, dist->comm, MPI_Allgather(mine, 2, MPI_INT, w->counts, 2, MPI_INT, dist->comm));
    *total = 0;
    *any_more = 0;
    for (int r = 0; r < dist->size; r++) {
        *any_more |= w->counts[2 * r + 1];
        *total += (size_t)w->counts[2 * r];
    }
fail:
    return status;
}

mxq_status mxq_hsplit_add(mxq_ctx *ctx, const mxq_dist *dist, mxq_hsplit *hs, mxq_hsplit_work *w, const float *x,
                          size_t tokens, mxq_status local)
{
    mxq_status status = MXQ_OK;
    const size_t n = (size_t)hs->features;
    size_t at = 0, total;
    int any_more = 1;
    if (local == MXQ_OK && tokens > 0)
        mxq_input_stats_add_abs(&hs->abs, x, tokens);
    while (any_more) {
        const size_t count = tokens - at < w->slab ? tokens - at : w->slab;
        CALL(ctx, exchange_counts(ctx, dist, w, (int)count, at + count < tokens, local, &total, &any_more));
        for (int r = 0, off = 0; r < dist->size; r++) {
            w->displs[r] = off;
            w->counts[r] = w->counts[2 * r] * (int)n; /* slot 2r is read before slot r is overwritten */
            off += w->counts[r];
        }
        CALL_MPI(ctx, dist->comm,
                 MPI_Allgatherv(count ? x + at * n : w->panel, (int)(count * n), MPI_FLOAT, w->gathered, w->counts,
                                w->displs, MPI_FLOAT, dist->comm));
        if (total > 0)
            gram_rows(hs, dist, w, w->gathered, total);
        at += count;
    }
fail:
    return status;
}

mxq_status mxq_hsplit_finish(mxq_ctx *ctx, const mxq_dist *dist, mxq_hsplit *hs, int root, const char *input_name)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)hs->features;
    double *mine = dist->rank == root ? MPI_IN_PLACE : NULL;
    CALL_MPI(ctx, dist->comm,
             MPI_Reduce(mine ? mine : hs->abs.abs_sum, hs->abs.abs_sum, (int)f, MPI_DOUBLE, MPI_SUM, root, dist->comm));
    CALL_MPI(ctx, dist->comm,
             MPI_Reduce(mine ? mine : hs->abs.abs_max, hs->abs.abs_max, (int)f, MPI_DOUBLE, MPI_MAX, root, dist->comm));
    CALL_MPI(ctx, dist->comm,
             MPI_Reduce(mine ? mine : &hs->abs.n_tokens, &hs->abs.n_tokens, 1, MPI_DOUBLE, MPI_SUM, root, dist->comm));
    size_t bad = f;
    double value = 0;
    for (size_t l = 0; l < hs->n_loc && bad == f; l++) {
        const size_t g = global_row(hs, dist->size, dist->rank, l);
        value = hs->grid.rows[l + g * hs->n_loc];
        bad = isfinite(value) ? f : f - 1 - g;
    }
    CHECK_AGREED(ctx, dist, "spread.statistics", bad == f, MXQ_ERR_FORMAT,
                 "the calibration statistics of %s channel %zu are not finite (H = %g): the activations overflow "
                 "float32",
                 input_name, bad, value);
fail:
    return status;
}

/* ---- the owner's requests, and the other ranks serving them ------------ */

enum { REQ_END, REQ_QUADRATIC, REQ_BLOCKS, REQ_RESCALE, REQ_GPTQ };

typedef struct {
    int op, input, li, block, status;
    long long rows, per, m, n;
    double n_tokens;
} request;

/* The diagonal blocks of this rank's block rows, [n_loc / nb][nb][nb] in H's
 * order: out[lb][j][k] = H(r0 + j, r0 + k). */
static void own_blocks(const mxq_hsplit *hs, const mxq_dist *dist, double *out)
{
    const size_t nb = (size_t)hs->nb;
    for (size_t lb = 0; lb * nb < hs->n_loc; lb++) {
        const size_t gb = lb * (size_t)dist->size + (size_t)dist->rank;
        for (size_t j = 0; j < nb; j++)
            for (size_t k = 0; k < nb; k++)
                out[(lb * nb + j) * nb + k] = hs->grid.rows[(gb * nb + nb - 1 - k) * hs->n_loc + lb * nb + nb - 1 - j];
    }
}

/* part[k / per] += d_k H d_k^T over this rank's block rows, from H's lower
 * triangle: 2 d_b (L_b d_<b^T + D_b/2 d_b^T) for each block row b. */
static void quadratic_of_h(const mxq_hsplit *hs, const mxq_dist *dist, const float *d, size_t rows, size_t per,
                           float *gf, float *z, double *part)
{
    const size_t n = (size_t)hs->features, nb = (size_t)hs->nb;
    for (size_t lb = 0; lb * nb < hs->n_loc; lb++) {
        const size_t gb = lb * (size_t)dist->size + (size_t)dist->rank, r1 = n - gb * nb, r0 = r1 - nb;
        for (size_t cc = gb * nb; cc < n; cc++) { /* gf [nb, r1]: H rows r0.., the diagonal block halved */
            const double *src = hs->grid.rows + cc * hs->n_loc + lb * nb, half = cc < (gb + 1) * nb ? 0.5 : 1.0;
            for (size_t t = 0; t < nb; t++)
                gf[(nb - 1 - t) * r1 + n - 1 - cc] = (float)(src[t] * half);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)nb, (int)r1, 1.0f, d, (int)n, gf, (int)r1,
                    0.0f, z, (int)nb);
        for (size_t k = 0; k < rows; k++) {
            double acc = 0;
            for (size_t j = 0; j < nb; j++)
                acc += (double)d[k * n + r0 + j] * (double)z[k * nb + j];
            part[k / per] += 2.0 * acc;
        }
    }
}

/* part[k / per] += ||U' d'_k||^2 over this rank's rows of the float32
 * factor (d' = d reversed, dead channels zeroed: into dr [rows, n]). */
static void quadratic_of_factor(const mxq_hsplit *hs, const mxq_dist *dist, const float *d, size_t rows, size_t per,
                                float *dr, float *y, double *part)
{
    const size_t n = (size_t)hs->features, nb = (size_t)hs->nb;
    const float *u = (const float *)hs->grid.rows;
    for (size_t k = 0; k < rows; k++)
        for (size_t cc = 0; cc < n; cc++)
            dr[k * n + cc] = hs->grid.dead[n - 1 - cc] ? 0.0f : d[k * n + n - 1 - cc];
    for (size_t lb = 0; lb * nb < hs->n_loc; lb++) {
        const size_t gb = lb * (size_t)dist->size + (size_t)dist->rank;
        cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, (int)nb, (int)rows, (int)(n - gb * nb), 1.0f,
                    u + gb * nb * hs->n_loc + lb * nb, (int)hs->n_loc, dr + gb * nb, (int)n, 0.0f, y, (int)nb);
        for (size_t k = 0; k < rows; k++)
            for (size_t t = 0; t < nb; t++)
                part[k / per] += (double)y[k * nb + t] * (double)y[k * nb + t];
    }
}

/* From the factor's sums back to H's: d H d^T = (||U' d'||^2 - lambda ||d||^2) / scale
 * over the live channels (root). */
static void factor_sums_to_h(const mxq_hsplit *hs, const float *d, size_t rows, size_t per, double *sums)
{
    const size_t n = (size_t)hs->features;
    for (size_t g = 0; g < rows / per; g++) {
        double dd = 0;
        for (size_t k = g * per; k < (g + 1) * per; k++)
            for (size_t c = 0; c < n; c++)
                dd += hs->grid.dead[c] ? 0.0 : (double)d[k * n + c] * (double)d[k * n + c];
        sums[g] = (sums[g] - hs->grid.lambda * dd) / hs->grid.scale;
    }
}

/* A request's allocations: whether they all succeeded (agreed after). */
static mxq_status allocated(mxq_ctx *ctx, int ok, size_t bytes, const char *what)
{
    if (ok)
        return MXQ_OK;
    mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory allocating %zu bytes for %s", bytes, what);
    return MXQ_ERR_NOMEM;
}

/* REQ_QUADRATIC: d [rows, n] from root to every rank, each one's share of
 * the sums reduced onto root (sums[rows / per] there). */
static mxq_status serve_quadratic(mxq_ctx *ctx, mxq_hsplit_server *sv, const request *rq, const float *d_root,
                                  double *sums)
{
    mxq_status status = MXQ_OK;
    const mxq_hsplit *hs = &sv->inputs[rq->input];
    const size_t n = (size_t)hs->features, nb = (size_t)hs->nb, rows = (size_t)rq->rows, per = (size_t)rq->per;
    const int is_root = sv->dist->rank == sv->root, factored = hs->grid.factored;
    float *d = is_root ? (float *)d_root : mxq_alloc_floats(rows * n);
    float *a = mxq_alloc_floats(factored ? rows * n : nb * n), *b = mxq_alloc_floats(rows * nb);
    double *part = calloc(rows / per, sizeof(double));
    AGREE(ctx, sv->dist, "spread.quadratic",
          allocated(ctx, d && a && b && part, (2 * rows * n + nb * n) * sizeof(float),
                    "a loss over a spread Hessian"));
    CALL(ctx, mxq_bcast_floats(ctx, sv->dist, d, rows * n, sv->root));
    if (factored)
        quadratic_of_factor(hs, sv->dist, d, rows, per, a, b, part);
    else
        quadratic_of_h(hs, sv->dist, d, rows, per, a, b, part);
    CALL_MPI(ctx, sv->dist->comm,
             MPI_Reduce(part, sums, (int)(rows / per), MPI_DOUBLE, MPI_SUM, sv->root, sv->dist->comm));
    if (is_root && factored)
        factor_sums_to_h(hs, d, rows, per, sums);
fail:
    if (!is_root)
        free(d);
    free(a);
    free(b);
    free(part);
    return status;
}

/* REQ_BLOCKS: every rank's diagonal blocks gathered onto root, which cuts
 * them into MX blocks of rq->block: out [n / block][block][block]. */
static mxq_status serve_blocks(mxq_ctx *ctx, mxq_hsplit_server *sv, const request *rq, double *out)
{
    mxq_status status = MXQ_OK;
    const mxq_hsplit *hs = &sv->inputs[rq->input];
    const size_t nb = (size_t)hs->nb, B = (size_t)rq->block, P = (size_t)sv->dist->size;
    const int is_root = sv->dist->rank == sv->root;
    double *mine = malloc((hs->n_loc ? hs->n_loc : 1) * nb * sizeof(double));
    double *all = is_root ? malloc(hs->nblk * nb * nb * sizeof(double)) : NULL;
    int *counts = malloc(2 * P * sizeof(int));
    AGREE(ctx, sv->dist, "spread.blocks",
          allocated(ctx, mine && (all || !is_root) && counts, hs->nblk * nb * nb * sizeof(double),
                    "a spread Hessian's diagonal blocks"));
    if (hs->grid.factored)
        memcpy(mine, hs->saved_blocks, hs->n_loc * nb * sizeof(double));
    else
        own_blocks(hs, sv->dist, mine);
    for (size_t r = 0, off = 0; r < P; r++) {
        counts[r] = (int)(mxq_grid_local_rows((size_t)hs->features, nb, (int)P, (int)r) * nb);
        counts[P + r] = (int)off;
        off += (size_t)counts[r];
    }
    CALL_MPI(ctx, sv->dist->comm,
             MPI_Gatherv(mine, (int)(hs->n_loc * nb), MPI_DOUBLE, all, counts, counts + P, MPI_DOUBLE, sv->root,
                         sv->dist->comm));
    for (size_t r = 0; is_root && r < P; r++) /* rank r's local block lb is block row lb P + r: H's block nblk-1-that */
        for (size_t lb = 0; lb * nb < (size_t)counts[r] / nb; lb++) {
            const size_t hb = hs->nblk - 1 - (lb * P + r);
            const double *src = all + (size_t)counts[P + r] + lb * nb * nb;
            for (size_t j = 0; j < nb; j++)
                for (size_t k = 0; k < nb; k++)
                    if (j / B == k / B)
                        out[((hb * nb + j) / B) * B * B + (j % B) * B + k % B] = src[j * nb + k];
        }
fail:
    free(mine);
    free(all);
    free(counts);
    return status;
}

/* REQ_RESCALE: H_ij /= s_i s_j on every rank's block rows (s from root). */
static mxq_status serve_rescale(mxq_ctx *ctx, mxq_hsplit_server *sv, const request *rq, const double *s_root)
{
    mxq_status status = MXQ_OK;
    mxq_hsplit *hs = &sv->inputs[rq->input];
    const size_t n = (size_t)hs->features;
    const int is_root = sv->dist->rank == sv->root;
    double *s = is_root ? (double *)s_root : malloc(n * sizeof(double));
    AGREE(ctx, sv->dist, "spread.rescale", allocated(ctx, s != NULL, n * sizeof(double), "scales"));
    CHECK_AGREED(ctx, sv->dist, "spread.rescale.order", !hs->grid.factored, MXQ_ERR_INTERNAL,
                 "a scale step after GPTQ factored the input's Hessian");
    CALL_MPI(ctx, sv->dist->comm, MPI_Bcast(s, (int)n, MPI_DOUBLE, sv->root, sv->dist->comm));
    for (size_t cc = 0; cc < n; cc++)
        for (size_t l = 0; l < hs->n_loc; l++) {
            const size_t i = n - 1 - global_row(hs, sv->dist->size, sv->dist->rank, l), j = n - 1 - cc;
            hs->grid.rows[cc * hs->n_loc + l] /= s[i] * s[j];
        }
fail:
    if (!is_root)
        free(s);
    return status;
}

/* After the first factor: the diagonal blocks' strictly lower parts (H's
 * values, which the factor leaves) zeroed, so that the factor's rows are
 * U' alone for the losses. */
static void clear_below_diagonal(mxq_hsplit *hs, const mxq_dist *dist)
{
    const size_t nb = (size_t)hs->nb;
    float *u = (float *)hs->grid.rows;
    for (size_t lb = 0; lb * nb < hs->n_loc; lb++) {
        const size_t gb = lb * (size_t)dist->size + (size_t)dist->rank;
        for (size_t c = 0; c < nb; c++)
            for (size_t t = c + 1; t < nb; t++)
                u[(gb * nb + c) * hs->n_loc + lb * nb + t] = 0.0f;
    }
}

/* REQ_GPTQ: linear rq->li on the grid of all ranks, its weight on root;
 * the input's first GPTQ keeps the diagonal blocks and factors H in place. */
static mxq_status serve_gptq(mxq_ctx *ctx, mxq_hsplit_server *sv, const request *rq, float *weight, uint8_t *scales,
                             int *dead)
{
    mxq_status status = MXQ_OK;
    mxq_hsplit *hs = &sv->inputs[rq->input];
    const int first = !hs->grid.factored;
    mxq_gptq_options o = *mxq_recipe_gptq(sv->recipe);
    o.skip_losses = 1; /* the report's losses include clipping: the layer's code */
    mxq_gptq_stats st;
    if (first)
        own_blocks(hs, sv->dist, hs->saved_blocks);
    CALL(ctx, mxq_gptq_grid_spread(ctx, sv->dist, sv->root, &sv->recipe->weights, &o, weight, (size_t)rq->m,
                                   (size_t)rq->n, &hs->grid, rq->n_tokens, scales, &st));
    if (first)
        clear_below_diagonal(hs, sv->dist);
    if (dead)
        *dead = st.dead_channels;
fail:
    return status;
}

static mxq_status serve_one(mxq_ctx *ctx, mxq_hsplit_server *sv, const request *rq)
{
    switch (rq->op) {
    case REQ_QUADRATIC:
        return serve_quadratic(ctx, sv, rq, NULL, NULL);
    case REQ_BLOCKS:
        return serve_blocks(ctx, sv, rq, NULL);
    case REQ_RESCALE:
        return serve_rescale(ctx, sv, rq, NULL);
    case REQ_GPTQ:
        return serve_gptq(ctx, sv, rq, NULL, NULL, NULL);
    default: /* the owner sends only the requests above */
        mxq_error_set(ctx, MXQ_ERR_INTERNAL, __FILE__, __LINE__, "unknown Hessian request %d", rq->op);
        return MXQ_ERR_INTERNAL;
    }
}

mxq_status mxq_hsplit_serve(mxq_ctx *ctx, mxq_hsplit_server *sv)
{
    mxq_status status = MXQ_OK;
    for (;;) {
        request rq;
        CALL_MPI(ctx, sv->dist->comm, MPI_Bcast(&rq, (int)sizeof(rq), MPI_BYTE, sv->root, sv->dist->comm));
        if (rq.op == REQ_END)
            break;
        mxq_status st = serve_one(ctx, sv, &rq); /* agreed inside: the owner stops too, and ends */
        if (st != MXQ_OK && sv->failed == MXQ_OK) {
            sv->failed = st;
            mxq_error_context(ctx, "layer %d %s: serving the owner's (rank %d's) request", sv->layer,
                              mxq_input_name((mxq_input_id)rq.input), sv->root);
        }
    }
    return sv->failed;
fail:
    return status;
}

mxq_status mxq_hsplit_end(mxq_ctx *ctx, mxq_hsplit_server *sv)
{
    mxq_status status = MXQ_OK;
    request rq = {.op = REQ_END};
    CALL_MPI(ctx, sv->dist->comm, MPI_Bcast(&rq, (int)sizeof(rq), MPI_BYTE, sv->root, sv->dist->comm));
fail:
    return status;
}

/* ---- the owner's side: mxq_remote_hessian --------------------------------- */

static mxq_status send_request(mxq_ctx *ctx, mxq_hsplit_server *sv, request *rq)
{
    mxq_status status = MXQ_OK;
    CALL_MPI(ctx, sv->dist->comm, MPI_Bcast(rq, (int)sizeof(*rq), MPI_BYTE, sv->root, sv->dist->comm));
fail:
    return status;
}

static mxq_status ask_quadratic(mxq_ctx *ctx, void *user, mxq_input_id input, const float *d, size_t rows, size_t per,
                                double *sums)
{
    mxq_status status = MXQ_OK;
    request rq = {.op = REQ_QUADRATIC, .input = input, .rows = (long long)rows, .per = (long long)per};
    /* the owner's own mistake, before any rank is asked: it still ends the serving */
    CHECK(ctx, per > 0 && rows % per == 0 && rows / per <= 8, MXQ_ERR_INTERNAL,
          "a loss request of %zu rows in groups of %zu", rows, per);
    CALL(ctx, send_request(ctx, user, &rq));
    CALL(ctx, serve_quadratic(ctx, user, &rq, d, sums));
fail:
    return status;
}

static mxq_status ask_blocks(mxq_ctx *ctx, void *user, mxq_input_id input, int block, double *blocks)
{
    mxq_status status = MXQ_OK;
    request rq = {.op = REQ_BLOCKS, .input = input, .block = block};
    CALL(ctx, send_request(ctx, user, &rq));
    CALL(ctx, serve_blocks(ctx, user, &rq, blocks));
fail:
    return status;
}

static mxq_status ask_rescale(mxq_ctx *ctx, void *user, mxq_input_id input, const double *s)
{
    mxq_status status = MXQ_OK;
    request rq = {.op = REQ_RESCALE, .input = input};
    CALL(ctx, send_request(ctx, user, &rq));
    CALL(ctx, serve_rescale(ctx, user, &rq, s));
fail:
    return status;
}

static mxq_status ask_gptq(mxq_ctx *ctx, void *user, mxq_linear_id li, float *weight, size_t m, size_t n,
                           double n_tokens, uint8_t *scales, int *dead)
{
    mxq_status status = MXQ_OK;
    request rq = {.op = REQ_GPTQ,
                  .input = mxq_linear_input(li),
                  .li = li,
                  .m = (long long)m,
                  .n = (long long)n,
                  .n_tokens = n_tokens};
    CALL(ctx, send_request(ctx, user, &rq));
    CALL(ctx, serve_gptq(ctx, user, &rq, weight, scales, dead));
fail:
    return status;
}

void mxq_hsplit_server_init(mxq_hsplit_server *sv, const mxq_dist *dist, int root, int layer,
                            const mxq_recipe *recipe, mxq_hsplit *inputs)
{
    *sv = (mxq_hsplit_server){.dist = dist, .root = root, .layer = layer, .recipe = recipe, .inputs = inputs};
    sv->ops = (mxq_remote_hessian){
        .user = sv, .quadratic = ask_quadratic, .diagonal_blocks = ask_blocks, .rescale = ask_rescale, .gptq = ask_gptq};
}
