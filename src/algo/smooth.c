/* SmoothQuant and AWQ scale searches, AWQ clipping, and the helpers that
 * fold a per-channel scale into weights. All losses are output errors over
 * the calibration tokens, computed exactly from the Hessian:
 * ||dW X||^2 = tr(dW H dW^T), H = X^T X. */
#include <cblas.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/check.h"
#include "mxq/gptq.h"
#include "mxq/quantize.h"

void mxq_scale_columns(float *w, int out, int in, const double *s)
{
    for (size_t r = 0; r < (size_t)out; r++) {
        float *row = w + r * (size_t)in;
        for (int j = 0; j < in; j++)
            row[j] = (float)((double)row[j] * s[j]);
    }
}

void mxq_unscale_rows(float *w, float *bias, int out, int in, const double *s)
{
    for (size_t r = 0; r < (size_t)out; r++) {
        float *row = w + r * (size_t)in;
        for (int j = 0; j < in; j++)
            row[j] = (float)((double)row[j] / s[r]);
        if (bias)
            bias[r] = (float)((double)bias[r] / s[r]);
    }
}

mxq_status mxq_smoothquant_scales(mxq_ctx *ctx, const mxq_linear_group *g, const double *act_abs_max, double alpha,
                                  double *s)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, alpha >= 0 && alpha <= 1, MXQ_ERR_ARG, "smoothquant alpha %g is outside [0, 1]", alpha);
    for (int j = 0; j < g->in; j++) {
        double wmax = 0.0;
        for (int k = 0; k < g->n; k++)
            for (size_t r = 0; r < (size_t)g->out[k]; r++) {
                double a = fabs((double)g->weight[k][r * (size_t)g->in + j]);
                wmax = a > wmax ? a : wmax;
            }
        double xmax = act_abs_max[j] > 1e-5 ? act_abs_max[j] : 1e-5;
        wmax = wmax > 1e-5 ? wmax : 1e-5;
        s[j] = pow(xmax, alpha) / pow(wmax, 1.0 - alpha);
        if (!(s[j] >= 1e-5))
            s[j] = 1e-5;
    }
fail:
    return status;
}

/* Rows every stride-th of which the scale search evaluates. */
static size_t search_row_stride(int out, int sample_rows)
{
    if (sample_rows <= 0 || out < 2 * sample_rows)
        return 1;
    return (size_t)out / (size_t)sample_rows;
}

/* The rows of one linear the search evaluates, and its scratch. */
typedef struct {
    float *w;        /* [rows, in] every stride-th row of the weight */
    float *d, *dh;   /* [rows, in] dW and dW H */
    size_t rows;
    double to_all;   /* out / rows: the estimate of the whole linear's loss */
} awq_sample;

static void awq_samples_free(awq_sample *smp, int n)
{
    for (int k = 0; k < n; k++) {
        free(smp[k].w);
        free(smp[k].d);
        free(smp[k].dh);
    }
}

static mxq_status awq_samples_init(mxq_ctx *ctx, const mxq_linear_group *g, int sample_rows, awq_sample *smp)
{
    mxq_status status = MXQ_OK;
    const size_t in = (size_t)g->in;
    for (int k = 0; k < g->n; k++) {
        size_t stride = search_row_stride(g->out[k], sample_rows), rows = (size_t)g->out[k] / stride;
        smp[k].rows = rows;
        smp[k].to_all = (double)g->out[k] / (double)rows;
        smp[k].w = mxq_alloc_floats(rows * in);
        smp[k].d = mxq_alloc_floats(rows * in);
        smp[k].dh = mxq_alloc_floats(rows * in);
        CHECK_ALLOC(ctx, smp[k].w && smp[k].d && smp[k].dh, 3 * rows * in * sizeof(float), "the AWQ search");
        for (size_t r = 0; r < rows; r++)
            memcpy(smp[k].w + r * in, g->weight[k] + r * stride * in, in * sizeof(float));
    }
fail:
    return status;
}

/* tr(dW H dW^T) of RTN(W diag s) diag(1/s) against the sampled rows of W,
 * scaled to all rows; hf is H in float32. */
static mxq_status sample_loss(mxq_ctx *ctx, const mxq_mx_spec *spec, awq_sample *smp, int in, const float *hf,
                              const double *s, double *loss)
{
    mxq_status status = MXQ_OK;
    const size_t rows = smp->rows, n = (size_t)in;
    float *q = smp->dh; /* RTN of W diag s, before dh is needed */
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++)
            q[r * n + j] = (float)((double)smp->w[r * n + j] * s[j]);
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, q, rows, n, NULL, NULL, q));
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++) {
            float back = (float)((double)q[r * n + j] / s[j]);
            smp->d[r * n + j] = (float)((double)smp->w[r * n + j] - (double)back);
        }
    cblas_ssymm(CblasRowMajor, CblasRight, CblasUpper, (int)rows, in, 1.0f, hf, in, smp->d, in, 0.0f, smp->dh, in);
    double total = 0.0;
    for (size_t i = 0; i < rows * n; i++)
        total += (double)smp->d[i] * (double)smp->dh[i];
    *loss = total * smp->to_all;
fail:
    return status;
}

/* s = mean^alpha (at least 1e-4), normalised by sqrt(max s * min s) */
static void awq_scales(const double *mean, int in, double alpha, double *s)
{
    double smax = 0.0, smin = INFINITY;
    for (int j = 0; j < in; j++) {
        double v = pow(mean[j], alpha);
        s[j] = v > 1e-4 ? v : 1e-4;
        smax = s[j] > smax ? s[j] : smax;
        smin = s[j] < smin ? s[j] : smin;
    }
    double norm = sqrt(smax * smin);
    for (int j = 0; j < in; j++)
        s[j] /= norm;
}

mxq_status mxq_awq_search(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g, const double *h,
                          const double *mean, const mxq_awq_options *opt, double *best_s, double *best_alpha,
                          double *best_loss)
{
    mxq_status status = MXQ_OK;
    const size_t in = (size_t)g->in;
    awq_sample smp[4] = {{0}};
    double *s = malloc(in * sizeof(double));
    float *hf = mxq_alloc_floats(in * in);
    CHECK_ALLOC(ctx, s && hf, in * in * sizeof(float), "the AWQ search");
    CHECK(ctx, opt->grid >= 1, MXQ_ERR_ARG, "awq grid must be at least 1");
    CHECK(ctx, g->n >= 1 && g->n <= 4, MXQ_ERR_ARG, "an AWQ group has 1 to 4 linears, not %d", g->n);
    for (size_t i = 0; i < in * in; i++)
        hf[i] = (float)h[i];
    CALL(ctx, awq_samples_init(ctx, g, opt->sample_rows, smp));
    *best_loss = INFINITY;
    *best_alpha = 0.0;
    for (int gi = 0; gi < opt->grid; gi++) {
        double alpha = (double)gi / opt->grid, loss = 0.0;
        awq_scales(mean, g->in, alpha, s);
        for (int k = 0; k < g->n; k++) {
            double part;
            CALL(ctx, sample_loss(ctx, spec, &smp[k], g->in, hf, s, &part));
            loss += part;
        }
        /* strict: ties keep the smaller alpha, so alpha 0 (no scaling) wins ties */
        if (loss < *best_loss) {
            *best_loss = loss;
            *best_alpha = alpha;
            memcpy(best_s, s, in * sizeof(double));
        }
    }
    CHECK(ctx, isfinite(*best_loss), MXQ_ERR_ARG, "AWQ search found no finite loss (NaN or Inf in weights or Hessian)");
fail:
    awq_samples_free(smp, 4);
    free(s);
    free(hf);
    return status;
}

/* Scratch of the clip search over one MX block column: [out, B] each. */
typedef struct {
    float *cand, *q, *d, *dh, *hb; /* hb: [B, B] H's diagonal block */
    float *org, *best_max;         /* [out] */
    double *best;                  /* [out] */
} clip_work;

static void clip_work_free(clip_work *c)
{
    free(c->cand);
    free(c->q);
    free(c->d);
    free(c->dh);
    free(c->hb);
    free(c->org);
    free(c->best_max);
    free(c->best);
}

/* Candidate `i` (shrink i / clip_grid) for every row of block column
 * [c0, c0+n): loss d H_bb d^T per row with one sgemm; keeps the best. */
static mxq_status clip_candidate(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *w, size_t out, size_t in,
                                 size_t c0, size_t n, double shrink, clip_work *c)
{
    mxq_status status = MXQ_OK;
    for (size_t r = 0; r < out; r++) {
        const float *row = w + r * in + c0;
        float mv = (float)((double)c->org[r] * (1.0 - shrink));
        for (size_t j = 0; j < n; j++)
            c->cand[r * n + j] = row[j] > mv ? mv : row[j] < -mv ? -mv : row[j];
    }
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, c->cand, out, n, NULL, NULL, c->q));
    for (size_t r = 0; r < out; r++)
        for (size_t j = 0; j < n; j++)
            c->d[r * n + j] = (float)((double)w[r * in + c0 + j] - (double)c->q[r * n + j]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)out, (int)n, (int)n, 1.0f, c->d, (int)n, c->hb,
                (int)n, 0.0f, c->dh, (int)n);
    for (size_t r = 0; r < out; r++) {
        double loss = 0.0;
        for (size_t j = 0; j < n; j++)
            loss += (double)c->d[r * n + j] * (double)c->dh[r * n + j];
        if (loss < c->best[r]) { /* strict: ties keep the smaller shrink */
            c->best[r] = loss;
            c->best_max[r] = (float)((double)c->org[r] * (1.0 - shrink));
        }
    }
fail:
    return status;
}

/* One block column: every candidate, then each row clamped to its best. */
static mxq_status clip_block_column(mxq_ctx *ctx, const mxq_mx_spec *spec, float *w, size_t out, size_t in,
                                    const double *h, size_t c0, size_t n, int clip_grid, int steps, clip_work *c)
{
    mxq_status status = MXQ_OK;
    for (size_t a = 0; a < n; a++)
        for (size_t b = 0; b < n; b++)
            c->hb[a * n + b] = (float)h[(c0 + a) * in + c0 + b];
    for (size_t r = 0; r < out; r++) {
        float org = 0.0f;
        for (size_t j = 0; j < n; j++)
            org = fabsf(w[r * in + c0 + j]) > org ? fabsf(w[r * in + c0 + j]) : org;
        c->org[r] = org;
        c->best_max[r] = org;
        /* an all-zero or non-finite block is left alone */
        c->best[r] = org > 0.0f && isfinite(org) ? INFINITY : -INFINITY;
    }
    for (int i = 0; i < steps; i++)
        CALL(ctx, clip_candidate(ctx, spec, w, out, in, c0, n, (double)i / clip_grid, c));
    for (size_t r = 0; r < out; r++) {
        float bm = c->best_max[r], *row = w + r * in + c0;
        if (c->best[r] == -INFINITY)
            continue;
        for (size_t j = 0; j < n; j++)
            row[j] = row[j] > bm ? bm : row[j] < -bm ? -bm : row[j];
    }
fail:
    return status;
}

mxq_status mxq_awq_clip(mxq_ctx *ctx, const mxq_mx_spec *spec, float *w, int out, int in, const double *h,
                        int clip_grid, double max_shrink)
{
    mxq_status status = MXQ_OK;
    const size_t B = (size_t)spec->block, rows = (size_t)out;
    const int steps = (int)(max_shrink * clip_grid + 1e-9);
    clip_work c = {0};
    c.cand = mxq_alloc_floats(rows * B);
    c.q = mxq_alloc_floats(rows * B);
    c.d = mxq_alloc_floats(rows * B);
    c.dh = mxq_alloc_floats(rows * B);
    c.hb = mxq_alloc_floats(B * B);
    c.org = malloc(rows * sizeof(float));
    c.best_max = malloc(rows * sizeof(float));
    c.best = malloc(rows * sizeof(double));
    CHECK_ALLOC(ctx, c.cand && c.q && c.d && c.dh && c.hb && c.org && c.best_max && c.best,
                4 * rows * B * sizeof(float), "the AWQ clip search");
    for (size_t c0 = 0; c0 < (size_t)in; c0 += B) {
        size_t n = (size_t)in - c0 < B ? (size_t)in - c0 : B;
        CALL(ctx, clip_block_column(ctx, spec, w, rows, (size_t)in, h, c0, n, clip_grid, steps, &c));
    }
fail:
    clip_work_free(&c);
    return status;
}
