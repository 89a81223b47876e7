/* Micro-block GPTQ for MX formats (Sharify et al. 2024, Algorithm 1).
 *
 * Work is in double precision: W is copied to double, H is scaled to
 * H' = 2 H / N, dead channels (H_dd = 0) get H'_dd = 1 and zero weights, then
 * H' += lambda I with lambda = damp * mean(diag H'). U is the upper Cholesky
 * factor of H'^-1 (LAPACK dpotrf + dtrtri on the index-reversed H'). Columns are processed in
 * lazy-batch blocks of b1; inside, micro-blocks of b2 columns are
 * MX-quantized as a whole from the already error-compensated weights
 * (converted to float32, the element type being quantized), and the error
 *   E = (W - Q) U[j:k, j:k]^-1
 * is pushed to the rest of the b1 block with W[:, k:i1] -= E U[j:k, k:i1].
 * After each b1 block the trailing columns get W[:, i1:] -= E_blk U[i0:i1, i1:]
 * (one dgemm). With b2 = 1 each MX block's shared exponent is fixed when its
 * first column is reached, from that block's values at that moment.
 *
 * Act-order permutes whole MX blocks (a partial last block stays last), so
 * that blocks and micro-blocks stay aligned with the MX grid. */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "mxq/gptq.h"

void mxq_gptq_defaults(mxq_gptq_options *o)
{
    o->lazy_block = 128;
    o->microblock = 128;
    o->damp = 0.01;
    o->act_order = 0;
    o->skip_losses = 0;
}

mxq_status mxq_gptq_check(mxq_ctx *ctx, const mxq_gptq_options *o, const mxq_mx_spec *spec)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_mx_spec_check(ctx, spec));
    CHECK(ctx, o->lazy_block >= 1, MXQ_ERR_ARG, "gptq.block must be >= 1, got %d", o->lazy_block);
    CHECK(ctx, o->microblock >= 1, MXQ_ERR_ARG, "gptq.microblock must be >= 1, got %d", o->microblock);
    CHECK(ctx, o->damp >= 0 && isfinite(o->damp), MXQ_ERR_ARG, "gptq.damp must be a finite number >= 0, got %g",
          o->damp);
    if (o->microblock > 1) {
        CHECK(ctx, o->microblock % spec->block == 0, MXQ_ERR_ARG,
              "gptq.microblock %d must be 1 or a multiple of the weight MX block %d", o->microblock, spec->block);
        CHECK(ctx, o->lazy_block % o->microblock == 0, MXQ_ERR_ARG,
              "gptq.block %d must be a multiple of gptq.microblock %d", o->lazy_block, o->microblock);
    }
fail:
    return status;
}

mxq_status mxq_quant_loss(mxq_ctx *ctx, const float *a, const float *b, size_t m, size_t n, const double *h,
                          double *loss)
{
    mxq_status status = MXQ_OK;
    double *d = calloc(m * n, sizeof(double)), *dh = malloc(m * n * sizeof(double));
    *loss = 0.0;
    CHECK_ALLOC(ctx, d && dh, 2 * m * n * sizeof(double), "the loss computation");
    for (size_t i = 0; i < m * n; i++)
        d[i] = (double)a[i] - (double)b[i];
    cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, (int)m, (int)n, 1.0, h, (int)n, d, (int)n, 0.0, dh, (int)n);
    double total = 0.0;
    for (size_t i = 0; i < m * n; i++)
        total += d[i] * dh[i];
    *loss = total;
fail:
    free(d);
    free(dh);
    return status;
}

static void reverse_doubles(double *a, size_t count)
{
    for (size_t i = 0, j = count - 1; i < j; i++, j--) {
        double t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* Block order for act-order: full blocks by descending sum of diag(H),
 * stable; a partial last block stays last. order[p] = original block of
 * processing position p. `mass` is scratch of nblocks doubles. */
static void block_order(const double *h, size_t n, int block, int act_order, int *order, size_t nblocks, double *mass)
{
    for (size_t b = 0; b < nblocks; b++)
        order[b] = (int)b;
    if (!act_order)
        return;
    size_t full = n / (size_t)block;
    for (size_t b = 0; b < nblocks; b++) {
        mass[b] = 0;
        for (size_t c = b * block; c < (b + 1) * (size_t)block && c < n; c++)
            mass[b] += h[c * n + c];
    }
    for (size_t i = 1; i < full; i++) { /* insertion sort: stable, nblocks is small */
        int key = order[i];
        size_t j = i;
        while (j > 0 && mass[order[j - 1]] < mass[key]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = key;
    }
}

/* Everything one GPTQ run works on. Columns are in processing order (p);
 * col_of[p] is the original column. */
typedef struct {
    const mxq_mx_spec *spec;
    size_t m, n, nblocks;
    int B, b1, b2;
    double *w;        /* [m, n] weights being quantized, double */
    double *hp;       /* [n, n] H', then U (upper triangle), H'^-1 = U^T U */
    double *eblk;     /* [m, b1] scaled errors of the current lazy batch */
    double *mass;     /* [nblocks] act-order scratch */
    float *scratch, *scratch_q; /* [m, micro-block] */
    uint8_t *mb_scales, *scales; /* micro-block scales; [m, nblocks] chosen scales */
    int *order, *se;  /* [nblocks] block order; [m] exponents of the current block */
    size_t *col_of;   /* [n] */
} gptq_work;

static void gptq_work_free(gptq_work *g)
{
    free(g->w);
    free(g->hp);
    free(g->eblk);
    free(g->mass);
    free(g->scratch);
    free(g->scratch_q);
    free(g->mb_scales);
    free(g->scales);
    free(g->order);
    free(g->se);
    free(g->col_of);
}

static mxq_status gptq_work_alloc(mxq_ctx *ctx, gptq_work *g)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n;
    size_t mb_cols = (size_t)(g->b2 > 1 ? g->b2 : g->B);
    g->w = malloc(m * n * sizeof(double));
    g->hp = malloc(n * n * sizeof(double));
    g->eblk = malloc(m * (size_t)g->b1 * sizeof(double));
    g->mass = malloc(g->nblocks * sizeof(double));
    g->order = malloc(g->nblocks * sizeof(int));
    g->col_of = malloc(n * sizeof(size_t));
    g->scales = malloc(m * g->nblocks);
    g->se = malloc(m * sizeof(int));
    g->scratch = malloc(m * mb_cols * sizeof(float));
    g->scratch_q = malloc(m * mb_cols * sizeof(float));
    g->mb_scales = malloc(m * mxq_mx_blocks_per_row(mb_cols, g->B));
    CHECK_ALLOC(ctx,
                g->w && g->hp && g->eblk && g->mass && g->order && g->col_of && g->scales && g->se && g->scratch &&
                    g->scratch_q && g->mb_scales,
                (m * n + n * n) * sizeof(double), "GPTQ work arrays");
fail:
    return status;
}

/* H' = 2 H / N in processing order, dead channels (their weights zeroed),
 * damping; then U, the upper Cholesky factor of H'^-1, without forming the
 * inverse: with J the index reversal, J H' J = L L^T gives H'^-1 = U^T U for
 * U = J L^-1 J. Reversing a row-major square matrix's storage is exactly
 * J A J. Cost n^3/3 + n^3/3 instead of inverse + refactor. */
static mxq_status prepare_hessian(mxq_ctx *ctx, gptq_work *g, const mxq_gptq_options *o, const double *hessian,
                                  double n_tokens, float *weight, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n;
    double *hp = g->hp;
    const double scale = 2.0 / n_tokens;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            hp[i * n + j] = scale * hessian[g->col_of[i] * n + g->col_of[j]];
    for (size_t i = 0; i < n; i++) {
        if (hp[i * n + i] == 0.0) {
            hp[i * n + i] = 1.0;
            stats->dead_channels++;
            for (size_t r = 0; r < m; r++)
                weight[r * n + g->col_of[i]] = 0.0f;
        }
    }
    double mean_diag = 0;
    for (size_t i = 0; i < n; i++)
        mean_diag += hp[i * n + i];
    mean_diag /= (double)n;
    for (size_t i = 0; i < n; i++)
        hp[i * n + i] += o->damp * mean_diag;
    reverse_doubles(hp, n * n);
    /* Row-major lower triangle = column-major upper triangle of the same
     * memory: calling the column-major routines directly avoids LAPACKE's
     * two transposed copies (measured 2x faster here). */
    lapack_int info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', (lapack_int)n, hp, (lapack_int)n);
    CHECK(ctx, info == 0, MXQ_ERR_LAPACK,
          "GPTQ: Cholesky factorization of the damped Hessian failed (LAPACK info=%d): it is not positive definite; "
          "raise gptq.damp (now %g)",
          (int)info, o->damp);
    CALL_LAPACK(ctx, LAPACKE_dtrtri_work(LAPACK_COL_MAJOR, 'U', 'N', (lapack_int)n, hp, (lapack_int)n),
                "GPTQ: inversion of the Hessian's Cholesky factor");
    reverse_doubles(hp, n * n);
fail:
    return status;
}

/* b2 = 1: column j, against the shared exponents fixed when its MX block
 * was reached; the error goes to the rest of the lazy batch [j+1, i1). */
static void quantize_column(gptq_work *g, size_t j, size_t i0, size_t i1)
{
    const size_t m = g->m, n = g->n, B = (size_t)g->B;
    const double *u = g->hp;
    if (j % B == 0) {
        /* the block starts here: fix each row's shared exponent */
        size_t len = n - j < B ? n - j : B;
        for (size_t r = 0; r < m; r++) {
            for (size_t c = 0; c < len; c++)
                g->scratch[c] = (float)g->w[r * n + j + c];
            g->se[r] = mxq_mx_shared_exponent(g->spec->format, g->scratch, len, 1);
            g->scales[r * g->nblocks + (size_t)g->order[j / B]] =
                g->se[r] == MXQ_SE_NAN ? MXQ_E8M0_NAN : (uint8_t)(g->se[r] + 127);
        }
    }
    double ujj = u[j * n + j];
    double *e = g->eblk + (j - i0); /* column j - i0 of E_blk, stride b1 */
    for (size_t r = 0; r < m; r++) {
        double wv = g->w[r * n + j];
        double q = (double)mxq_mx_quantize_value(g->spec->format, g->spec->rounding, (float)wv, g->se[r]);
        e[r * (size_t)g->b1] = (wv - q) / ujj;
        g->w[r * n + j] = q;
    }
    if (j + 1 < i1)
        cblas_dger(CblasRowMajor, (int)m, (int)(i1 - j - 1), -1.0, e, g->b1, u + j * n + j + 1, 1, g->w + j + 1,
                   (int)n);
}

/* b2 > 1: micro-block [j, k) MX-quantized as a whole from the already
 * error-compensated weights; E = (W - Q) U[j:k, j:k]^-1 goes to [k, i1). */
static mxq_status quantize_micro_block(mxq_ctx *ctx, gptq_work *g, size_t j, size_t k, size_t i0, size_t i1)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n, len = k - j, B = (size_t)g->B;
    const double *u = g->hp;
    for (size_t r = 0; r < m; r++)
        for (size_t c = 0; c < len; c++)
            g->scratch[r * len + c] = (float)g->w[r * n + j + c];
    CALL(ctx, mxq_mx_quantize_rows(ctx, g->spec, g->scratch, m, len, NULL, g->mb_scales, g->scratch_q));
    size_t mb_nblocks = mxq_mx_blocks_per_row(len, g->B);
    for (size_t r = 0; r < m; r++)
        for (size_t b = 0; b < mb_nblocks; b++)
            g->scales[r * g->nblocks + (size_t)g->order[j / B + b]] = g->mb_scales[r * mb_nblocks + b];
    double *e = g->eblk + (j - i0);
    for (size_t r = 0; r < m; r++)
        for (size_t c = 0; c < len; c++) {
            double q = (double)g->scratch_q[r * len + c];
            e[r * (size_t)g->b1 + c] = g->w[r * n + j + c] - q;
            g->w[r * n + j + c] = q;
        }
    cblas_dtrsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, (int)m, (int)len, 1.0,
                u + j * n + j, (int)n, e, g->b1);
    if (k < i1)
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)(i1 - k), (int)len, -1.0, e, g->b1,
                    u + j * n + k, (int)n, 1.0, g->w + k, (int)n);
fail:
    return status;
}

/* The lazy batches of b1 columns, each followed by the trailing update
 * W[:, i1:] -= E_blk U[i0:i1, i1:] (one dgemm). */
static mxq_status sweep_columns(mxq_ctx *ctx, gptq_work *g, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n;
    for (size_t i0 = 0; i0 < n; i0 += (size_t)g->b1) {
        size_t i1 = i0 + (size_t)g->b1 < n ? i0 + (size_t)g->b1 : n;
        double tq = mxq_time_now();
        for (size_t j = i0; j < i1; j += (size_t)g->b2) {
            size_t k = j + (size_t)g->b2 < i1 ? j + (size_t)g->b2 : i1;
            if (g->b2 == 1)
                quantize_column(g, j, i0, i1);
            else
                CALL(ctx, quantize_micro_block(ctx, g, j, k, i0, i1));
        }
        stats->seconds_quant += mxq_time_now() - tq;
        if (i1 < n) {
            double tg = mxq_time_now();
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)(n - i1), (int)(i1 - i0), -1.0,
                        g->eblk, g->b1, g->hp + i0 * n + i1, (int)n, 1.0, g->w + i1, (int)n);
            stats->seconds_gemm += mxq_time_now() - tg;
            stats->gemm_flops += 2.0 * (double)m * (double)(n - i1) * (double)(i1 - i0);
        }
    }
fail:
    return status;
}

/* Losses against the undamped Hessian, for the report and the tests. */
static mxq_status gptq_losses(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *original, const float *weight,
                              size_t m, size_t n, const double *hessian, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    double tl = mxq_time_now();
    float *rtn = malloc(m * n * sizeof(float));
    CHECK_ALLOC(ctx, rtn, m * n * sizeof(float), "the round-to-nearest copy");
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, original, m, n, NULL, NULL, rtn));
    CALL(ctx, mxq_quant_loss(ctx, original, rtn, m, n, hessian, &stats->loss_rtn));
    CALL(ctx, mxq_quant_loss(ctx, original, weight, m, n, hessian, &stats->loss));
    stats->seconds_loss = mxq_time_now() - tl;
fail:
    free(rtn);
    return status;
}

static mxq_status check_gptq_input(mxq_ctx *ctx, const float *weight, size_t m, size_t n, double n_tokens)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, m > 0 && n > 0 && n < (1u << 30) && m < (1u << 30), MXQ_ERR_ARG, "GPTQ: bad weight shape [%zu, %zu]", m,
          n);
    CHECK(ctx, n_tokens > 0, MXQ_ERR_ARG, "GPTQ: the Hessian must come from at least one token");
    for (size_t i = 0; i < m * n; i++)
        CHECK(ctx, isfinite(weight[i]), MXQ_ERR_ARG, "GPTQ: weight [%zu, %zu] is not finite (%g)", i / n, i % n,
              (double)weight[i]);
fail:
    return status;
}

mxq_status mxq_gptq_quantize(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_gptq_options *o, float *weight,
                             size_t m, size_t n, const double *hessian, double n_tokens, uint8_t *scales_out,
                             mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    gptq_work g = {0};
    float *original = NULL;
    memset(stats, 0, sizeof(*stats));
    CALL(ctx, mxq_gptq_check(ctx, o, spec));
    CALL(ctx, check_gptq_input(ctx, weight, m, n, n_tokens));
    g.spec = spec;
    g.m = m;
    g.n = n;
    g.B = spec->block;
    g.nblocks = mxq_mx_blocks_per_row(n, g.B);
    g.b2 = o->microblock;
    /* An MX block's exponent is chosen from the up-to-date values of all its
     * columns, so a block must not straddle a lazy batch (whose trailing
     * update is deferred). Rounding b1 up to whole MX blocks changes only
     * the order of floating-point work, not the algorithm. */
    g.b1 = g.b2 == 1 ? (o->lazy_block + g.B - 1) / g.B * g.B : o->lazy_block;
    double t0 = mxq_time_now();
    CALL(ctx, gptq_work_alloc(ctx, &g));
    original = malloc(m * n * sizeof(float));
    CHECK_ALLOC(ctx, original, m * n * sizeof(float), "a copy of the weights");
    memcpy(original, weight, m * n * sizeof(float));
    block_order(hessian, n, g.B, o->act_order, g.order, g.nblocks, g.mass);
    for (size_t p = 0, b = 0; b < g.nblocks; b++)
        for (size_t c = (size_t)g.order[b] * g.B; c < (size_t)(g.order[b] + 1) * g.B && c < n; c++)
            g.col_of[p++] = c;
    CALL(ctx, prepare_hessian(ctx, &g, o, hessian, n_tokens, weight, stats));
    for (size_t r = 0; r < m; r++)
        for (size_t p = 0; p < n; p++)
            g.w[r * n + p] = (double)weight[r * n + g.col_of[p]];
    stats->seconds_factor = mxq_time_now() - t0;
    CALL(ctx, sweep_columns(ctx, &g, stats));
    for (size_t r = 0; r < m; r++)
        for (size_t p = 0; p < n; p++)
            weight[r * n + g.col_of[p]] = (float)g.w[r * n + p];
    if (scales_out)
        memcpy(scales_out, g.scales, m * g.nblocks);
    if (!o->skip_losses)
        CALL(ctx, gptq_losses(ctx, spec, original, weight, m, n, hessian, stats));
fail:
    gptq_work_free(&g);
    free(original);
    return status;
}
