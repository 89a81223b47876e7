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

#include "check.h"
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
 * processing position p. */
static void block_order(const double *h, size_t n, int block, int act_order, int *order, size_t nblocks)
{
    for (size_t b = 0; b < nblocks; b++)
        order[b] = (int)b;
    if (!act_order)
        return;
    size_t full = n / (size_t)block;
    double *mass = malloc(nblocks * sizeof(double));
    if (!mass)
        return; /* keeping the natural order is always valid */
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
    free(mass);
}

mxq_status mxq_gptq_quantize(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_gptq_options *o, float *weight,
                             size_t m, size_t n, const double *hessian, double n_tokens, uint8_t *scales_out,
                             mxq_gptq_stats *stats)
{
    mxq_status status = MXQ_OK;
    double *w = NULL, *hp = NULL, *eblk = NULL;
    float *scratch = NULL, *scratch_q = NULL, *rtn = NULL, *original = NULL;
    uint8_t *mb_scales = NULL, *scales = NULL;
    int *order = NULL, *se = NULL;
    size_t *col_of = NULL;
    memset(stats, 0, sizeof(*stats));

    CALL(ctx, mxq_gptq_check(ctx, o, spec));
    CHECK(ctx, m > 0 && n > 0 && n < (1u << 30) && m < (1u << 30), MXQ_ERR_ARG, "GPTQ: bad weight shape [%zu, %zu]", m, n);
    CHECK(ctx, n_tokens > 0, MXQ_ERR_ARG, "GPTQ: the Hessian must come from at least one token");
    for (size_t i = 0; i < m * n; i++)
        CHECK(ctx, isfinite(weight[i]), MXQ_ERR_ARG, "GPTQ: weight [%zu, %zu] is not finite (%g)", i / n, i % n,
              (double)weight[i]);

    const int B = spec->block;
    const size_t nblocks = mxq_mx_blocks_per_row(n, B);
    const int b2 = o->microblock;
    /* An MX block's exponent is chosen from the up-to-date values of all its
     * columns, so a block must not straddle a lazy batch (whose trailing
     * update is deferred). Rounding b1 up to whole MX blocks changes only
     * the order of floating-point work, not the algorithm. */
    const int b1 = b2 == 1 ? (o->lazy_block + B - 1) / B * B : o->lazy_block;
    double t0 = mxq_time_now();

    w = malloc(m * n * sizeof(double));
    hp = malloc(n * n * sizeof(double));
    eblk = malloc(m * (size_t)b1 * sizeof(double));
    original = malloc(m * n * sizeof(float));
    rtn = malloc(m * n * sizeof(float));
    order = malloc(nblocks * sizeof(int));
    col_of = malloc(n * sizeof(size_t));
    scales = malloc(m * nblocks);
    se = malloc(m * sizeof(int));
    size_t mb_cols = (size_t)(b2 > 1 ? b2 : B);
    scratch = malloc(m * mb_cols * sizeof(float));
    scratch_q = malloc(m * mb_cols * sizeof(float));
    mb_scales = malloc(m * mxq_mx_blocks_per_row(mb_cols, B));
    CHECK_ALLOC(ctx, w && hp && eblk && original && rtn && order && col_of && scales && se && scratch && scratch_q && mb_scales,
                (m * n + n * n) * sizeof(double), "GPTQ work arrays");
    memcpy(original, weight, m * n * sizeof(float));

    /* Processing order: column p of the permuted problem is original column col_of[p]. */
    block_order(hessian, n, B, o->act_order, order, nblocks);
    for (size_t p = 0, b = 0; b < nblocks; b++) {
        size_t c0 = (size_t)order[b] * B;
        for (size_t c = c0; c < c0 + (size_t)B && c < n; c++)
            col_of[p++] = c;
    }

    /* H' = 2 H / N in processing order; dead channels; damping. */
    const double scale = 2.0 / n_tokens;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            hp[i * n + j] = scale * hessian[col_of[i] * n + col_of[j]];
    for (size_t i = 0; i < n; i++) {
        if (hp[i * n + i] == 0.0) {
            hp[i * n + i] = 1.0;
            stats->dead_channels++;
            for (size_t r = 0; r < m; r++)
                weight[r * n + col_of[i]] = 0.0f;
        }
    }
    double mean_diag = 0;
    for (size_t i = 0; i < n; i++)
        mean_diag += hp[i * n + i];
    mean_diag /= (double)n;
    for (size_t i = 0; i < n; i++)
        hp[i * n + i] += o->damp * mean_diag;
    /* U, the upper Cholesky factor of H'^-1, without forming the inverse:
     * with J the index reversal, J H' J = L L^T gives H'^-1 = U^T U for
     * U = J L^-1 J. Reversing a row-major square matrix's storage is
     * exactly J A J. Cost n^3/3 + n^3/3 instead of inverse + refactor. */
    reverse_doubles(hp, n * n);
    /* Row-major lower triangle = column-major upper triangle of the same
     * memory: calling the column-major routines directly avoids LAPACKE's
     * two transposed copies (measured 2x faster here). */
    CALL_LAPACK(ctx, LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', (lapack_int)n, hp, (lapack_int)n),
                "Cholesky factorization of the damped Hessian (raise gptq.damp?)");
    CALL_LAPACK(ctx, LAPACKE_dtrtri_work(LAPACK_COL_MAJOR, 'U', 'N', (lapack_int)n, hp, (lapack_int)n),
                "inversion of the Hessian's Cholesky factor");
    reverse_doubles(hp, n * n);
    const double *u = hp; /* upper triangle: U, with H'^-1 = U^T U */

    for (size_t r = 0; r < m; r++)
        for (size_t p = 0; p < n; p++)
            w[r * n + p] = (double)weight[r * n + col_of[p]];
    stats->seconds_factor = mxq_time_now() - t0;

    for (size_t i0 = 0; i0 < n; i0 += (size_t)b1) {
        size_t i1 = i0 + (size_t)b1 < n ? i0 + (size_t)b1 : n;
        double tq = mxq_time_now();
        for (size_t j = i0; j < i1; j += (size_t)b2) {
            size_t k = j + (size_t)b2 < i1 ? j + (size_t)b2 : i1;
            if (b2 == 1) {
                size_t block_index = j / (size_t)B; /* in processing order */
                if (j % (size_t)B == 0) {
                    /* the block starts here: fix each row's shared exponent */
                    size_t len = n - j < (size_t)B ? n - j : (size_t)B;
                    for (size_t r = 0; r < m; r++) {
                        for (size_t c = 0; c < len; c++)
                            scratch[c] = (float)w[r * n + j + c];
                        se[r] = mxq_mx_shared_exponent(spec->format, scratch, len, 1);
                        scales[r * nblocks + (size_t)order[block_index]] =
                            se[r] == MXQ_SE_NAN ? MXQ_E8M0_NAN : (uint8_t)(se[r] + 127);
                    }
                }
                double ujj = u[j * n + j];
                double *e = eblk + (j - i0); /* column j - i0 of E_blk, stride b1 */
                for (size_t r = 0; r < m; r++) {
                    double wv = w[r * n + j];
                    double q = (double)mxq_mx_quantize_value(spec->format, spec->rounding, (float)wv, se[r]);
                    e[r * (size_t)b1] = (wv - q) / ujj;
                    w[r * n + j] = q;
                }
                if (j + 1 < i1)
                    cblas_dger(CblasRowMajor, (int)m, (int)(i1 - j - 1), -1.0, e, b1, u + j * n + j + 1, 1,
                               w + j + 1, (int)n);
            } else {
                size_t len = k - j;
                for (size_t r = 0; r < m; r++)
                    for (size_t c = 0; c < len; c++)
                        scratch[r * len + c] = (float)w[r * n + j + c];
                CALL(ctx, mxq_mx_quantize_rows(ctx, spec, scratch, m, len, NULL, mb_scales, scratch_q));
                size_t mb_nblocks = mxq_mx_blocks_per_row(len, B);
                for (size_t r = 0; r < m; r++)
                    for (size_t b = 0; b < mb_nblocks; b++)
                        scales[r * nblocks + (size_t)order[j / (size_t)B + b]] = mb_scales[r * mb_nblocks + b];
                double *e = eblk + (j - i0);
                for (size_t r = 0; r < m; r++)
                    for (size_t c = 0; c < len; c++) {
                        double q = (double)scratch_q[r * len + c];
                        e[r * (size_t)b1 + c] = w[r * n + j + c] - q;
                        w[r * n + j + c] = q;
                    }
                /* E = (W - Q) U[j:k, j:k]^-1 */
                cblas_dtrsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, (int)m, (int)len, 1.0,
                            u + j * n + j, (int)n, e, b1);
                if (k < i1)
                    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)(i1 - k), (int)len, -1.0, e, b1,
                                u + j * n + k, (int)n, 1.0, w + k, (int)n);
            }
        }
        stats->seconds_quant += mxq_time_now() - tq;
        if (i1 < n) {
            double tg = mxq_time_now();
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)(n - i1), (int)(i1 - i0), -1.0, eblk, b1,
                        u + i0 * n + i1, (int)n, 1.0, w + i1, (int)n);
            stats->seconds_gemm += mxq_time_now() - tg;
            stats->gemm_flops += 2.0 * (double)m * (double)(n - i1) * (double)(i1 - i0);
        }
    }

    for (size_t r = 0; r < m; r++)
        for (size_t p = 0; p < n; p++)
            weight[r * n + col_of[p]] = (float)w[r * n + p];
    if (scales_out)
        memcpy(scales_out, scales, m * nblocks);

    /* Losses against the undamped Hessian, for the report and the tests. */
    if (!o->skip_losses) {
        double tl = mxq_time_now();
        CALL(ctx, mxq_mx_quantize_rows(ctx, spec, original, m, n, NULL, NULL, rtn));
        CALL(ctx, mxq_quant_loss(ctx, original, rtn, m, n, hessian, &stats->loss_rtn));
        CALL(ctx, mxq_quant_loss(ctx, original, weight, m, n, hessian, &stats->loss));
        stats->seconds_loss = mxq_time_now() - tl;
    }
fail:
    free(w);
    free(hp);
    free(eblk);
    free(original);
    free(rtn);
    free(order);
    free(col_of);
    free(scales);
    free(se);
    free(scratch);
    free(scratch_q);
    free(mb_scales);
    return status;
}
