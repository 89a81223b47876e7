/* Micro-block GPTQ for MX formats (Sharify et al. 2024, Algorithm 1), in
 * float32 working precision (the Cholesky factor of H, its one input, is
 * computed in double).
 *
 * H' = 2 H / N; dead channels (H_dd = 0) get H'_dd = 1 and zero weights;
 * H' += lambda I with lambda = damp * mean(diag H'). GPTQ as usually written
 * uses U, the upper Cholesky factor of H'^-1, and pushes each quantization
 * error e = (w~ - q) / U_jj into the later columns. With R = U^-1 (upper,
 * H' = R R^T: one potrf on the index-reversed H', no inverse) the same
 * algorithm reads, for D = W - Q against the ORIGINAL weights:
 *   e = D R,  and the value quantized for a micro-block [j, k) is
 *   w~[j:k] = W[j:k] + A[j:k] R[j:k, j:k]^-1,  A = D[:, :j] R[:j, :]
 * (from R U = I blockwise: R11 U12 = -R12 U22). A, the error feedback, is
 * accumulated right-looking: inside a lazy batch of b1 columns after each
 * micro-block (sgemm), and for the trailing columns once per batch. The
 * flops are n^3/3 (dpotrf) + m n^2 (updates) + m n b2 (solves), against
 * 2n^3/3 + m n^2 + m n b2 for the inverse-based form.
 *
 * With b2 = 1 each MX block's shared exponent is fixed when its first column
 * is reached, from that block's current values w~. Micro-blocks (b2 > 1) are
 * MX-quantized as a whole from w~.
 *
 * Since e = D R, the GPTQ loss comes for free:
 *   tr(D H D^T) = N/2 (||D R||^2 - lambda ||D||^2)
 * and the round-to-nearest loss for the report costs one strmm.
 *
 * Act-order permutes whole MX blocks (a partial last block stays last), so
 * that blocks and micro-blocks stay aligned with the MX grid. */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/check.h"
#include "algo/gptq_internal.h"
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
    /* float GEMM, double sums: rows a chunk at a time keep the scratch small */
    const size_t chunk = m < 256 ? (m ? m : 1) : 256;
    float *hf = malloc(n * n * sizeof(float) + 1), *d = malloc(chunk * n * sizeof(float) + 1),
          *dh = malloc(chunk * n * sizeof(float) + 1);
    *loss = 0.0;
    CHECK_ALLOC(ctx, hf && d && dh, (n * n + 2 * chunk * n) * sizeof(float), "the loss computation");
    for (size_t i = 0; i < n * n; i++)
        hf[i] = (float)h[i];
    double total = 0.0;
    for (size_t r0 = 0; r0 < m; r0 += chunk) {
        size_t rows = m - r0 < chunk ? m - r0 : chunk;
        for (size_t i = 0; i < rows * n; i++)
            d[i] = (float)((double)a[r0 * n + i] - (double)b[r0 * n + i]);
        cblas_ssymm(CblasRowMajor, CblasRight, CblasUpper, (int)rows, (int)n, 1.0f, hf, (int)n, d, (int)n, 0.0f, dh,
                    (int)n);
        for (size_t i = 0; i < rows * n; i++)
            total += (double)d[i] * (double)dh[i];
    }
    *loss = total;
fail:
    free(hf);
    free(d);
    free(dh);
    return status;
}

static void reverse_floats(float *a, size_t count)
{
    for (size_t i = 0, j = count - 1; i < j; i++, j--) {
        float t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

void mxq_gptq_block_order(const double *diag, size_t diag_stride, size_t n, int block, int act_order, int *order,
                          size_t nblocks, double *mass)
{
    for (size_t b = 0; b < nblocks; b++)
        order[b] = (int)b;
    if (!act_order)
        return;
    size_t full = n / (size_t)block;
    for (size_t b = 0; b < nblocks; b++) {
        mass[b] = 0;
        for (size_t c = b * block; c < (b + 1) * (size_t)block && c < n; c++)
            mass[b] += diag[c * diag_stride];
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

static void mxq_gptq_work_free(mxq_gptq_work *g)
{
    free(g->w);
    free(g->acc);
    free(g->r);
    free(g->d);
    free(g->cur);
    free(g->q);
    free(g->mass);
    free(g->mb_scales);
    free(g->scales);
    free(g->order);
    free(g->se);
    free(g->col_of);
    free(g->dead);
}

static mxq_status mxq_gptq_work_alloc(mxq_ctx *ctx, mxq_gptq_work *g)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n;
    g->wide = (size_t)(g->b2 > 1 ? g->b2 : g->B);
    g->w = mxq_alloc(m * n * sizeof(float));
    g->acc = mxq_alloc(m * n * sizeof(float));
    g->r = mxq_alloc(n * n * sizeof(double)); /* factored in double, then float32 in its first half */
    g->d = malloc(m * (size_t)g->b1 * sizeof(float));
    g->cur = malloc(m * g->wide * sizeof(float));
    g->q = malloc(m * g->wide * sizeof(float));
    g->mass = malloc(g->nblocks * sizeof(double));
    g->order = malloc(g->nblocks * sizeof(int));
    g->col_of = malloc(n * sizeof(size_t));
    g->dead = calloc(n, 1);
    g->scales = malloc(m * g->nblocks);
    g->se = malloc(m * sizeof(int));
    g->mb_scales = malloc(m * mxq_mx_blocks_per_row(g->wide, g->B));
    CHECK_ALLOC(ctx,
                g->w && g->acc && g->r && g->d && g->cur && g->q && g->mass && g->order && g->col_of && g->scales &&
                    g->se && g->mb_scales && g->dead,
                2 * m * n * sizeof(float) + n * n * sizeof(double), "GPTQ work arrays");
    /* written, not calloc'ed: the first sgemm would otherwise read the zero
     * page and then fault every page again, with a TLB shootdown each */
    memset(g->acc, 0, m * n * sizeof(float));
fail:
    return status;
}

/* Rounds a factor computed in double to float32 in place: float i lies in
 * the bytes of double i / 2, so walking up never overwrites a double not
 * yet read. */
static float *doubles_to_floats(double *a, size_t count)
{
    float *f = (float *)a;
    for (size_t i = 0; i < count; i++)
        f[i] = (float)a[i];
    return f;
}

int mxq_chol_panel(double *panel, int nbk, size_t width)
{
    lapack_int info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', nbk, panel, nbk);
    if (info == 0 && width > (size_t)nbk)
        cblas_dtrsm(CblasColMajor, CblasLeft, CblasUpper, CblasTrans, CblasNonUnit, nbk, (int)(width - (size_t)nbk),
                    1.0, panel, nbk, panel + (size_t)nbk * nbk, nbk);
    return (int)info;
}

void mxq_chol_update(const double *panel, int nbk, size_t off, int nbi, size_t width, double *c, size_t ldc)
{
    cblas_dgemm(CblasColMajor, CblasTrans, CblasNoTrans, nbi, (int)width, nbk, -1.0, panel + off * (size_t)nbk, nbk,
                panel + off * (size_t)nbk, nbk, 1.0, c, (int)ldc);
}

/* Block row [k0, k0 + rows) of m (ld n) from column k0 on, into or out of
 * the panel (ld rows). */
static void panel_copy(double *m, size_t n, size_t k0, size_t rows, double *panel, int into)
{
    for (size_t c = k0; c < n; c++)
        for (size_t r = 0; r < rows; r++) {
            double *a = &m[(k0 + r) + c * n], *p = &panel[r + (c - k0) * rows];
            if (into)
                *p = *a;
            else
                *a = *p;
        }
}

enum { CHOL_ROWS = 8 };

int mxq_chol_blocked(double *m, size_t n, int nb, double *panel)
{
    for (size_t k0 = 0; k0 < n; k0 += (size_t)nb) {
        const int nbk = (int)(n - k0 < (size_t)nb ? n - k0 : (size_t)nb);
        panel_copy(m, n, k0, (size_t)nbk, panel, 1);
        const int info = mxq_chol_panel(panel, nbk, n - k0);
        if (info != 0)
            return (int)k0 + info;
        for (int d = 0; d < nbk; d++) /* dpotrf lets a NaN through */
            if (!isfinite(panel[(size_t)d + (size_t)d * nbk]))
                return (int)k0 + d + 1;
        panel_copy(m, n, k0, (size_t)nbk, panel, 0);
        /* CHOL_ROWS block rows per dgemm, from the first one's diagonal on
         * (a few lower-triangle entries computed for nothing): the grid
         * updates one block row per call, with the same sums per entry */
        const size_t step = (size_t)nb * CHOL_ROWS;
        for (size_t i0 = k0 + (size_t)nbk; i0 < n; i0 += step) {
            const int rows = (int)(n - i0 < step ? n - i0 : step);
            mxq_chol_update(panel, nbk, i0 - k0, rows, n - i0, m + i0 + i0 * n, n);
        }
    }
    return 0;
}

/* H' = 2 H / N in processing order, dead channels (their weights zeroed),
 * damping; then R, upper with H' = R R^T: with J the index reversal,
 * J H' J = L L^T gives R = J L J. Reversing a row-major square matrix's
 * storage is exactly J A J, and a row-major lower triangle is the
 * column-major upper one of the same memory, so LAPACK runs on it directly
 * (no transposed copies). The factor is computed in double and rounded to
 * float32 for the sweep: a float32 Cholesky's rounding (about cond(H') eps,
 * 1e-2 here) depends on its blocking, i.e. on the thread count and on the
 * grid, and GPTQ amplifies it (0.4% of the values of a [1024, 4096] linear
 * changed between 1 and 2 OpenBLAS threads). In double, factors of
 * different blockings mostly round alike, but not always (a [1024, 4096]
 * linear on a 2-rank grid under pdpotrf: 0.0021% of the values moved); so the
 * blocking is mxq_chol_blocked's, which the grid runs too, step by step. */
static mxq_status prepare_hessian(mxq_ctx *ctx, mxq_gptq_work *g, const mxq_gptq_options *o, const double *hessian,
                                  double n_tokens, float *weight, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n;
    const double scale = 2.0 / n_tokens;
    double mean_diag = 0, *r = (double *)g->r;
    for (size_t i = 0; i < n; i++) {
        double hd = scale * hessian[g->col_of[i] * n + g->col_of[i]];
        if (hd == 0.0) {
            hd = 1.0;
            g->dead[i] = 1;
            stats->dead_channels++;
            for (size_t row = 0; row < m; row++)
                weight[row * n + g->col_of[i]] = 0.0f;
        }
        mean_diag += hd;
    }
    g->lambda = o->damp * mean_diag / (double)n;
    for (size_t i = 0; i < n; i++) { /* stored reversed: row n-1-i holds J H' J's row */
        const double *hrow = hessian + g->col_of[i] * n;
        double *rrow = r + (n - 1 - i) * n + (n - 1);
        for (size_t j = 0; j < n; j++)
            rrow[-(ptrdiff_t)j] = scale * hrow[g->col_of[j]];
        double hd = scale * hrow[g->col_of[i]];
        rrow[-(ptrdiff_t)i] = (hd == 0.0 ? 1.0 : hd) + g->lambda;
    }
    double *panel = malloc((size_t)g->b1 * n * sizeof(double));
    CHECK_ALLOC(ctx, panel, (size_t)g->b1 * n * sizeof(double), "the Cholesky panel");
    const int info = mxq_chol_blocked(r, n, g->b1, panel);
    free(panel);
    CHECK(ctx, info == 0, MXQ_ERR_LAPACK,
          "GPTQ: Cholesky factorization of the damped Hessian failed (LAPACK info=%d): it is not positive definite; "
          "raise gptq.damp (now %g; a rank-deficient Hessian, e.g. fewer tokens than inputs, needs about 1e-5 or "
          "more)",
          (int)info, o->damp);
    reverse_floats(doubles_to_floats(r, n * n), n * n);
fail:
    return status;
}

/* cur [m, len] = w~ of columns [j, j+len): W + A R[j:k, j:k]^-1. */
static void current_values(mxq_gptq_work *g, size_t j, size_t len)
{
    const size_t m = g->m, n = g->n;
    for (size_t r = 0; r < m; r++)
        memcpy(g->cur + r * len, g->acc + r * n + j, len * sizeof(float));
    cblas_strsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, (int)m, (int)len, 1.0f,
                g->r + j * n + j, (int)n, g->cur, (int)len);
    for (size_t r = 0; r < m; r++)
        for (size_t c = 0; c < len; c++)
            g->cur[r * len + c] += g->w[r * n + j + c];
}

/* b2 = 1: column j, against the shared exponents fixed when its MX block
 * was reached; its error feeds the rest of the lazy batch [j+1, i1). */
static void quantize_column(mxq_gptq_work *g, size_t j, size_t i0, size_t i1)
{
    const size_t m = g->m, n = g->n, B = (size_t)g->B;
    if (j % B == 0) { /* the block starts here: fix each row's shared exponent */
        size_t len = n - j < B ? n - j : B;
        current_values(g, j, len);
        for (size_t r = 0; r < m; r++) {
            g->se[r] = mxq_mx_shared_exponent(g->spec->format, g->cur + r * len, len, 1);
            g->scales[r * g->scale_stride + (size_t)g->order[j / B]] =
                g->se[r] == MXQ_SE_NAN ? MXQ_E8M0_NAN : (uint8_t)(g->se[r] + 127);
        }
    }
    const float rjj = g->r[j * n + j];
    float *d = g->d + (j - i0); /* column j - i0 of D, stride b1 */
    double e2 = 0.0;
    for (size_t r = 0; r < m; r++) {
        float wv = g->w[r * n + j], cur = wv + g->acc[r * n + j] / rjj;
        float q = mxq_mx_quantize_value(g->spec->format, g->spec->rounding, cur, g->se[r]);
        double e = ((double)cur - (double)q) * (double)rjj;
        e2 += e * e;
        d[r * (size_t)g->b1] = wv - q;
        g->w[r * n + j] = q;
    }
    g->sum_e2 += e2;
    if (j + 1 < i1)
        cblas_sger(CblasRowMajor, (int)m, (int)(i1 - j - 1), 1.0f, d, g->b1, g->r + j * n + j + 1, 1,
                   g->acc + j + 1, (int)n);
}

/* ||(cur - q) R[j:k, j:k]||^2: the micro-block's part of ||D R||^2. */
static double micro_block_error(mxq_gptq_work *g, size_t j, size_t len)
{
    const size_t m = g->m, n = g->n;
    double e2 = 0.0;
    for (size_t i = 0; i < m * len; i++)
        g->cur[i] -= g->q[i];
    cblas_strmm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, (int)m, (int)len, 1.0f,
                g->r + j * n + j, (int)n, g->cur, (int)len);
    for (size_t i = 0; i < m * len; i++)
        e2 += (double)g->cur[i] * (double)g->cur[i];
    return e2;
}

/* b2 > 1: micro-block [j, k) MX-quantized as a whole from w~; D of it
 * feeds the rest of the lazy batch [k, i1). */
static mxq_status quantize_micro_block(mxq_ctx *ctx, mxq_gptq_work *g, size_t j, size_t k, size_t i0, size_t i1,
                                       int want_loss)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n, len = k - j, B = (size_t)g->B, b1 = (size_t)g->b1;
    current_values(g, j, len);
    CALL(ctx, mxq_mx_quantize_rows(ctx, g->spec, g->cur, m, len, NULL, g->mb_scales, g->q));
    size_t mb_nblocks = mxq_mx_blocks_per_row(len, g->B);
    for (size_t r = 0; r < m; r++)
        for (size_t b = 0; b < mb_nblocks; b++)
            g->scales[r * g->scale_stride + (size_t)g->order[j / B + b]] = g->mb_scales[r * mb_nblocks + b];
    float *d = g->d + (j - i0);
    for (size_t r = 0; r < m; r++)
        for (size_t c = 0; c < len; c++) {
            float q = g->q[r * len + c];
            d[r * b1 + c] = g->w[r * n + j + c] - q;
            g->w[r * n + j + c] = q;
        }
    if (want_loss)
        g->sum_e2 += micro_block_error(g, j, len);
    if (k < i1)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)(i1 - k), (int)len, 1.0f, d, (int)b1,
                    g->r + j * n + k, (int)n, 1.0f, g->acc + k, (int)n);
fail:
    return status;
}

mxq_status mxq_gptq_sweep_batch(mxq_ctx *ctx, mxq_gptq_work *g, size_t i0, size_t i1, int want_loss)
{
    mxq_status status = MXQ_OK;
    for (size_t j = i0; j < i1; j += (size_t)g->b2) {
        size_t k = j + (size_t)g->b2 < i1 ? j + (size_t)g->b2 : i1;
        if (g->b2 == 1)
            quantize_column(g, j, i0, i1);
        else
            CALL(ctx, quantize_micro_block(ctx, g, j, k, i0, i1, want_loss));
    }
fail:
    return status;
}

/* The lazy batches of b1 columns, each followed by the trailing update
 * A[:, i1:] += D_batch R[i0:i1, i1:] (one sgemm). */
static mxq_status sweep_columns(mxq_ctx *ctx, mxq_gptq_work *g, int want_loss, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n;
    for (size_t i0 = 0; i0 < n; i0 += (size_t)g->b1) {
        size_t i1 = i0 + (size_t)g->b1 < n ? i0 + (size_t)g->b1 : n;
        double tq = mxq_time_now();
        CALL(ctx, mxq_gptq_sweep_batch(ctx, g, i0, i1, want_loss));
        stats->seconds_quant += mxq_time_now() - tq;
        if (i1 < n) {
            double tg = mxq_time_now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)(n - i1), (int)(i1 - i0), 1.0f,
                        g->d, g->b1, g->r + i0 * n + i1, (int)n, 1.0f, g->acc + i1, (int)n);
            stats->seconds_gemm += mxq_time_now() - tg;
            stats->gemm_flops += 2.0 * (double)m * (double)(n - i1) * (double)(i1 - i0);
        }
    }
fail:
    return status;
}

/* The report's losses against the undamped Hessian: GPTQ's from ||D R||^2,
 * round-to-nearest's with one strmm, both corrected for the damping:
 * tr(D H D^T) = N/2 (||D R||^2 - lambda ||D||^2), clamped at 0 (the
 * difference loses digits when the loss is far below lambda ||D||^2).
 * `orig` is the input in processing order before dead channels were
 * zeroed; H gives them no weight, so D is masked there. */
static mxq_status gptq_losses(mxq_ctx *ctx, mxq_gptq_work *g, const float *orig, double n_tokens, mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    const size_t m = g->m, n = g->n;
    double tl = mxq_time_now(), d2 = 0.0, rtn_d2 = 0.0, rtn_e2 = 0.0;
    float *rtn = mxq_alloc_floats(m * n);
    CHECK_ALLOC(ctx, rtn, m * n * sizeof(float), "the round-to-nearest copy");
    /* act-order moves whole MX blocks, so RTN in processing order is RTN */
    CALL(ctx, mxq_mx_quantize_rows(ctx, g->spec, orig, m, n, NULL, NULL, rtn));
    for (size_t i = 0; i < m * n; i++) {
        double dv = g->dead[i % n] ? 0.0 : (double)orig[i] - (double)g->w[i];
        double rv = g->dead[i % n] ? 0.0 : (double)orig[i] - (double)rtn[i];
        rtn[i] = (float)rv;
        d2 += dv * dv;
        rtn_d2 += rv * rv;
    }
    stats->loss = fmax(0.0, 0.5 * n_tokens * (g->sum_e2 - g->lambda * d2));
    cblas_strmm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, (int)m, (int)n, 1.0f, g->r,
                (int)n, rtn, (int)n);
    for (size_t i = 0; i < m * n; i++)
        rtn_e2 += (double)rtn[i] * (double)rtn[i];
    stats->loss_rtn = fmax(0.0, 0.5 * n_tokens * (rtn_e2 - g->lambda * rtn_d2));
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

/* [m, n] between original column order and processing order; act-order
 * moves whole MX blocks, so a block is one memcpy. */
static void permute_columns(const mxq_gptq_work *g, const float *src, float *dst, int to_processing)
{
    const size_t n = g->n, B = (size_t)g->B;
    for (size_t r = 0; r < g->m; r++)
        for (size_t p = 0; p < n; p += B) {
            size_t len = n - p < B ? n - p : B, c = g->col_of[p];
            if (to_processing)
                memcpy(dst + r * n + p, src + r * n + c, len * sizeof(float));
            else
                memcpy(dst + r * n + c, src + r * n + p, len * sizeof(float));
        }
}

int mxq_gptq_batch_width(const mxq_mx_spec *spec, const mxq_gptq_options *o)
{
    /* Rounding b1 up to whole MX blocks changes only the order of
     * floating-point work, not the algorithm. */
    return o->microblock == 1 ? (o->lazy_block + spec->block - 1) / spec->block * spec->block : o->lazy_block;
}

static mxq_status gptq_setup(mxq_ctx *ctx, mxq_gptq_work *g, const mxq_mx_spec *spec, const mxq_gptq_options *o,
                             size_t m, size_t n)
{
    mxq_status status = MXQ_OK;
    g->spec = spec;
    g->m = m;
    g->n = n;
    g->B = spec->block;
    g->nblocks = mxq_mx_blocks_per_row(n, g->B);
    g->scale_stride = g->nblocks;
    g->b2 = o->microblock;
    g->b1 = mxq_gptq_batch_width(spec, o);
    if ((size_t)g->b1 > n)
        g->b1 = (int)n;
    CALL(ctx, mxq_gptq_work_alloc(ctx, g));
fail:
    return status;
}

mxq_status mxq_gptq_quantize(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_gptq_options *o, float *weight,
                             size_t m, size_t n, const double *hessian, double n_tokens, uint8_t *scales_out,
                             mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    mxq_gptq_work g = {0};
    float *orig = NULL;
    memset(stats, 0, sizeof(*stats));
    CALL(ctx, mxq_gptq_check(ctx, o, spec));
    CALL(ctx, check_gptq_input(ctx, weight, m, n, n_tokens));
    double t0 = mxq_time_now();
    CALL(ctx, gptq_setup(ctx, &g, spec, o, m, n));
    mxq_gptq_block_order(hessian, n + 1, n, g.B, o->act_order, g.order, g.nblocks, g.mass);
    for (size_t p = 0, b = 0; b < g.nblocks; b++)
        for (size_t c = (size_t)g.order[b] * g.B; c < (size_t)(g.order[b] + 1) * g.B && c < n; c++)
            g.col_of[p++] = c;
    if (!o->skip_losses) {
        orig = malloc(m * n * sizeof(float));
        CHECK_ALLOC(ctx, orig, m * n * sizeof(float), "a copy of the weights");
        permute_columns(&g, weight, orig, 1);
    }
    CALL(ctx, prepare_hessian(ctx, &g, o, hessian, n_tokens, weight, stats));
    permute_columns(&g, weight, g.w, 1);
    stats->seconds_factor = mxq_time_now() - t0;
    CALL(ctx, sweep_columns(ctx, &g, !o->skip_losses, stats));
    permute_columns(&g, g.w, weight, 0);
    if (scales_out)
        memcpy(scales_out, g.scales, m * g.nblocks);
    if (!o->skip_losses)
        CALL(ctx, gptq_losses(ctx, &g, orig, n_tokens, stats));
fail:
    mxq_gptq_work_free(&g);
    free(orig);
    return status;
}
