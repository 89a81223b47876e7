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
#include "algo/hessian_ref.h"
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

/* Alphas whose losses one GEMM evaluates: H streams through the GEMM's
 * packing once per call, which with a few hundred rows costs as much as
 * the arithmetic. Up to 8 at a time, within a 64 MB scratch per array
 * (down_proj at 128 rows: 8 alphas, 45 MB; every row of gate_proj: 1). */
enum { ALPHAS_MAX = 8 };
#define AWQ_SCRATCH_BYTES (64.0 * 1048576.0)

/* The rows of one linear the search evaluates. */
typedef struct {
    float *w;        /* [rows, in] every stride-th row of the weight */
    size_t rows;
    double to_all;   /* out / rows: the estimate of the whole linear's loss */
} awq_sample;

/* Shared by the group's linears, evaluated one after the other. */
typedef struct {
    float *d, *dh;   /* [alphas * max rows, in] dW and dW H per alpha */
    int alphas;      /* alphas per GEMM */
} awq_scratch;

static void awq_samples_free(awq_sample *smp, int n, awq_scratch *sc)
{
    for (int k = 0; k < n; k++)
        free(smp[k].w);
    free(sc->d);
    free(sc->dh);
}

static mxq_status awq_samples_init(mxq_ctx *ctx, const mxq_linear_group *g, int sample_rows, awq_sample *smp,
                                   awq_scratch *sc)
{
    mxq_status status = MXQ_OK;
    const size_t in = (size_t)g->in;
    size_t max_rows = 0;
    for (int k = 0; k < g->n; k++) {
        CHECK(ctx, g->out[k] >= 1, MXQ_ERR_ARG, "an AWQ group's linear %d has no rows", k);
        size_t stride = search_row_stride(g->out[k], sample_rows), rows = (size_t)g->out[k] / stride;
        smp[k].rows = rows;
        smp[k].to_all = (double)g->out[k] / (double)rows;
        smp[k].w = mxq_alloc_floats(rows * in);
        CHECK_ALLOC(ctx, smp[k].w, rows * in * sizeof(float), "the AWQ search");
        for (size_t r = 0; r < rows; r++)
            memcpy(smp[k].w + r * in, g->weight[k] + r * stride * in, in * sizeof(float));
        max_rows = rows > max_rows ? rows : max_rows;
    }
    double per_alpha = (double)max_rows * (double)in * sizeof(float);
    sc->alphas = per_alpha * ALPHAS_MAX <= AWQ_SCRATCH_BYTES ? ALPHAS_MAX
                 : per_alpha >= AWQ_SCRATCH_BYTES       ? 1
                                                        : (int)(AWQ_SCRATCH_BYTES / per_alpha);
    sc->d = mxq_alloc_floats((size_t)sc->alphas * max_rows * in);
    sc->dh = mxq_alloc_floats((size_t)sc->alphas * max_rows * in);
    CHECK_ALLOC(ctx, sc->d && sc->dh, 2 * (size_t)sc->alphas * max_rows * in * sizeof(float), "the AWQ search");
fail:
    return status;
}

/* d = W - RTN(W diag s) diag(1/s) of the sampled rows, [rows, n] */
static mxq_status scaled_rtn_error(mxq_ctx *ctx, const mxq_mx_spec *spec, const awq_sample *smp, size_t n,
                                   const double *s, float *q, float *d)
{
    mxq_status status = MXQ_OK;
    const size_t rows = smp->rows;
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++)
            q[r * n + j] = (float)((double)smp->w[r * n + j] * s[j]);
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, q, rows, n, NULL, NULL, q));
    for (size_t r = 0; r < rows; r++)
        for (size_t j = 0; j < n; j++) {
            float back = (float)((double)q[r * n + j] / s[j]);
            d[r * n + j] = smp->w[r * n + j] - back;
        }
fail:
    return status;
}

/* losses[a] += tr(dW H dW^T) of the sampled rows, scaled to all rows, for
 * the alphas a in [a0, a1) (scales s_all[a * n ...]); hf is H, full, in
 * float32. One sgemm for all of them. */
static mxq_status sample_losses(mxq_ctx *ctx, const mxq_mx_spec *spec, const awq_sample *smp, awq_scratch *sc,
                                int in, const float *hf, const double *s_all, int a0, int a1, double *losses)
{
    mxq_status status = MXQ_OK;
    const size_t rows = smp->rows, n = (size_t)in, per = rows * n;
    for (int a = a0; a < a1; a++) /* dh's slot serves as the quantization scratch */
        CALL(ctx, scaled_rtn_error(ctx, spec, smp, n, s_all + (size_t)a * n, sc->dh + (size_t)(a - a0) * per,
                                   sc->d + (size_t)(a - a0) * per));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)((size_t)(a1 - a0) * rows), in, in, 1.0f, sc->d, in,
                hf, in, 0.0f, sc->dh, in);
    for (int a = a0; a < a1; a++) {
        const float *d = sc->d + (size_t)(a - a0) * per, *dh = sc->dh + (size_t)(a - a0) * per;
        double total = 0.0;
        for (size_t i = 0; i < per; i++)
            total += (double)d[i] * (double)dh[i];
        losses[a] += total * smp->to_all;
    }
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

/* losses[a] += the sampled rows' loss for the alphas [a0, a1), from H
 * spread over ranks: one request for all of them. */
static mxq_status sample_losses_remote(mxq_ctx *ctx, const mxq_mx_spec *spec, const awq_sample *smp, awq_scratch *sc,
                                       int in, const mxq_hessian_ref *h, const double *s_all, int a0, int a1,
                                       double *losses)
{
    mxq_status status = MXQ_OK;
    const size_t rows = smp->rows, n = (size_t)in, per = rows * n;
    double sums[ALPHAS_MAX];
    for (int a = a0; a < a1; a++)
        CALL(ctx, scaled_rtn_error(ctx, spec, smp, n, s_all + (size_t)a * n, sc->dh + (size_t)(a - a0) * per,
                                   sc->d + (size_t)(a - a0) * per));
    CALL(ctx, h->remote->quadratic(ctx, h->remote->user, h->input, sc->d, (size_t)(a1 - a0) * rows, rows, sums));
    for (int a = a0; a < a1; a++)
        losses[a] += sums[a - a0] * smp->to_all;
fail:
    return status;
}

/* Every alpha's loss over the group: losses[grid]. */
static mxq_status grid_losses(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g,
                              const mxq_hessian_ref *h, const double *s_all, const mxq_awq_options *opt, double *losses)
{
    mxq_status status = MXQ_OK;
    const size_t in = (size_t)g->in;
    awq_sample smp[4] = {{0}};
    awq_scratch sc = {0};
    float *hf = NULL;
    if (h->whole) {
        hf = mxq_alloc_floats(in * in);
        CHECK_ALLOC(ctx, hf, in * in * sizeof(float), "the AWQ search");
        for (size_t i = 0; i < in * in; i++)
            hf[i] = (float)h->whole[i];
    }
    CALL(ctx, awq_samples_init(ctx, g, opt->sample_rows, smp, &sc));
    for (int k = 0; k < g->n; k++)
        for (int a0 = 0; a0 < opt->grid; a0 += sc.alphas) {
            int a1 = a0 + sc.alphas < opt->grid ? a0 + sc.alphas : opt->grid;
            if (hf)
                CALL(ctx, sample_losses(ctx, spec, &smp[k], &sc, g->in, hf, s_all, a0, a1, losses));
            else
                CALL(ctx, sample_losses_remote(ctx, spec, &smp[k], &sc, g->in, h, s_all, a0, a1, losses));
        }
fail:
    awq_samples_free(smp, 4, &sc);
    free(hf);
    return status;
}

mxq_status mxq_awq_search(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g, const double *h,
                          const double *mean, const mxq_awq_options *opt, double *best_s, double *best_alpha,
                          double *best_loss)
{
    const mxq_hessian_ref ref = {.whole = h};
    return mxq_awq_search_ref(ctx, spec, g, &ref, mean, opt, best_s, best_alpha, best_loss);
}

mxq_status mxq_awq_search_ref(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g,
                              const mxq_hessian_ref *h, const double *mean, const mxq_awq_options *opt, double *best_s,
                              double *best_alpha, double *best_loss)
{
    mxq_status status = MXQ_OK;
    const size_t in = (size_t)g->in;
    double *s_all = NULL, *losses = NULL;
    CHECK(ctx, opt->grid >= 1, MXQ_ERR_ARG, "awq grid must be at least 1");
    CHECK(ctx, g->n >= 1 && g->n <= 4, MXQ_ERR_ARG, "an AWQ group has 1 to 4 linears, not %d", g->n);
    s_all = malloc((size_t)opt->grid * in * sizeof(double));
    losses = calloc((size_t)opt->grid, sizeof(double));
    CHECK_ALLOC(ctx, s_all && losses, (size_t)opt->grid * in * sizeof(double), "the AWQ search");
    for (int a = 0; a < opt->grid; a++)
        awq_scales(mean, g->in, (double)a / opt->grid, s_all + (size_t)a * in);
    CALL(ctx, grid_losses(ctx, spec, g, h, s_all, opt, losses));
    *best_loss = INFINITY;
    *best_alpha = 0.0;
    for (int a = 0; a < opt->grid; a++)
        if (losses[a] < *best_loss) { /* strict: ties keep the smaller alpha, so alpha 0 (no scaling) wins ties */
            *best_loss = losses[a];
            *best_alpha = (double)a / opt->grid;
            memcpy(best_s, s_all + (size_t)a * in, in * sizeof(double));
        }
    CHECK(ctx, isfinite(*best_loss), MXQ_ERR_ARG, "AWQ search found no finite loss (NaN or Inf in weights or Hessian)");
fail:
    free(s_all);
    free(losses);
    return status;
}

/* Rows of a block column the clip search works on at once: their
 * candidates (10 each by default) stay in the L2 cache through the
 * quantization, the sgemm and the comparison; a whole column at once
 * streamed ~7 passes over 56 MB per block column of gate_proj. */
enum { CLIP_ROWS = 64 };

/* Scratch of the clip search: the candidates of CLIP_ROWS rows of one MX
 * block column, [CLIP_ROWS * steps, B] each, a row's candidates adjacent. */
typedef struct {
    float *cand, *q, *dh, *hb; /* hb: [B, B] H's diagonal block */
    float org[CLIP_ROWS];      /* each row's block max */
    size_t steps;
} clip_work;

static void clip_work_free(clip_work *c)
{
    free(c->cand);
    free(c->q);
    free(c->dh);
    free(c->hb);
}

/* d H_bb d^T of one row of n <= MXQ_MX_BLOCK_MAX, in float lanes summed in
 * double: the loop vectorizes and the order is fixed. */
static double row_quadratic(const float *d, const float *dh, size_t n)
{
    float lane[16] = {0};
    size_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (size_t l = 0; l < 16; l++)
            lane[l] += d[j + l] * dh[j + l];
    double total = 0.0;
    for (size_t l = 0; l < 16; l++)
        total += (double)lane[l];
    for (; j < n; j++)
        total += (double)d[j] * (double)dh[j];
    return total;
}

/* Every candidate (shrink i / clip_grid) of rows [0, nr) of w (rows of
 * stride in, block column [c0, c0+n)): one quantization and one sgemm for
 * all of them. Leaves cand = W - Q per candidate and dh = (W - Q) H_bb. */
static mxq_status clip_candidates(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *w, size_t in, size_t c0,
                                  size_t n, size_t nr, int clip_grid, clip_work *c)
{
    mxq_status status = MXQ_OK;
    const size_t rows = nr * c->steps;
    for (size_t r = 0; r < nr; r++) {
        const float *row = w + r * in + c0;
        for (size_t i = 0; i < c->steps; i++) {
            float mv = (float)((double)c->org[r] * (1.0 - (double)i / clip_grid)), *cand = c->cand + (r * c->steps + i) * n;
            for (size_t j = 0; j < n; j++) {
                float v = row[j] > mv ? mv : row[j];
                cand[j] = v < -mv ? -mv : v;
            }
        }
    }
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, c->cand, rows, n, NULL, NULL, c->q));
    for (size_t r = 0; r < nr; r++) {
        const float *row = w + r * in + c0;
        for (size_t i = 0; i < c->steps; i++) {
            const float *q = c->q + (r * c->steps + i) * n;
            float *d = c->cand + (r * c->steps + i) * n;
            for (size_t j = 0; j < n; j++)
                d[j] = row[j] - q[j];
        }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)n, (int)n, 1.0f, c->cand, (int)n, c->hb,
                (int)n, 0.0f, c->dh, (int)n);
fail:
    return status;
}

/* Rows [0, nr) of w in block column [c0, c0+n): every candidate, then each
 * row clamped to its best (strict: ties keep the smaller shrink). An
 * all-zero or non-finite block is left alone. */
static mxq_status clip_rows(mxq_ctx *ctx, const mxq_mx_spec *spec, float *w, size_t in, size_t c0, size_t n,
                            size_t nr, int clip_grid, clip_work *c)
{
    mxq_status status = MXQ_OK;
    for (size_t r = 0; r < nr; r++) {
        float org = 0.0f;
        for (size_t j = 0; j < n; j++)
            org = fabsf(w[r * in + c0 + j]) > org ? fabsf(w[r * in + c0 + j]) : org;
        c->org[r] = org;
    }
    CALL(ctx, clip_candidates(ctx, spec, w, in, c0, n, nr, clip_grid, c));
    for (size_t r = 0; r < nr; r++) {
        if (!(c->org[r] > 0.0f) || !isfinite(c->org[r]))
            continue;
        double best = INFINITY;
        float best_max = c->org[r], *row = w + r * in + c0;
        for (size_t i = 0; i < c->steps; i++) {
            size_t k = (r * c->steps + i) * n;
            double loss = row_quadratic(c->cand + k, c->dh + k, n);
            if (loss < best) {
                best = loss;
                best_max = (float)((double)c->org[r] * (1.0 - (double)i / clip_grid));
            }
        }
        for (size_t j = 0; j < n; j++)
            row[j] = row[j] > best_max ? best_max : row[j] < -best_max ? -best_max : row[j];
    }
fail:
    return status;
}

mxq_status mxq_awq_clip(mxq_ctx *ctx, const mxq_mx_spec *spec, float *w, int out, int in, const double *h,
                        int clip_grid, double max_shrink)
{
    const mxq_hessian_ref ref = {.whole = h};
    return mxq_awq_clip_ref(ctx, spec, w, out, in, &ref, clip_grid, max_shrink);
}

/* H's diagonal block at c0 (n x n, n <= B) into hb, in float32: from the
 * whole H, or from the spread one's blocks [in / B][B][B]. */
static void diagonal_block(const mxq_hessian_ref *h, const double *blocks, size_t nin, size_t B, size_t c0, size_t n,
                           float *hb)
{
    for (size_t a = 0; a < n; a++)
        for (size_t b = 0; b < n; b++)
            hb[a * n + b] = (float)(h->whole ? h->whole[(c0 + a) * nin + c0 + b] : blocks[(c0 / B) * B * B + a * B + b]);
}

mxq_status mxq_awq_clip_ref(mxq_ctx *ctx, const mxq_mx_spec *spec, float *w, int out, int in, const mxq_hessian_ref *h,
                            int clip_grid, double max_shrink)
{
    mxq_status status = MXQ_OK;
    const size_t B = (size_t)spec->block, nin = (size_t)in;
    clip_work c = {0};
    double *blocks = NULL;
    /* no steps: the only candidate would be no shrink, and nothing changes */
    c.steps = (size_t)(max_shrink * clip_grid + 1e-9);
    const size_t rows = CLIP_ROWS * (c.steps ? c.steps : 1);
    c.cand = mxq_alloc_floats(rows * B);
    c.q = mxq_alloc_floats(rows * B);
    c.dh = mxq_alloc_floats(rows * B);
    c.hb = mxq_alloc_floats(B * B);
    CHECK_ALLOC(ctx, c.cand && c.q && c.dh && c.hb, (3 * rows * B + B * B) * sizeof(float), "the AWQ clip search");
    if (!h->whole && c.steps > 0) {
        CHECK(ctx, nin % B == 0, MXQ_ERR_INTERNAL, "a spread Hessian's %zu inputs are not whole MX blocks", nin);
        blocks = mxq_alloc(nin * B * sizeof(double));
        CHECK_ALLOC(ctx, blocks, nin * B * sizeof(double), "the Hessian's diagonal blocks");
        CALL(ctx, h->remote->diagonal_blocks(ctx, h->remote->user, h->input, (int)B, blocks));
    }
    for (size_t c0 = 0; c.steps > 0 && c0 < nin; c0 += B) {
        size_t n = nin - c0 < B ? nin - c0 : B;
        diagonal_block(h, blocks, nin, B, c0, n, c.hb);
        for (size_t r0 = 0; r0 < (size_t)out; r0 += CLIP_ROWS) {
            size_t nr = (size_t)out - r0 < CLIP_ROWS ? (size_t)out - r0 : CLIP_ROWS;
            CALL(ctx, clip_rows(ctx, spec, w + r0 * nin, nin, c0, n, nr, clip_grid, &c));
        }
    }
fail:
    free(blocks);
    clip_work_free(&c);
    return status;
}
