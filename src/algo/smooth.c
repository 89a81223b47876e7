/* SmoothQuant and AWQ scale searches, AWQ clipping, and the helpers that
 * fold a per-channel scale into weights. All losses are output errors over
 * the calibration tokens, computed exactly from the Hessian:
 * ||dW X||^2 = tr(dW H dW^T), H = X^T X. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

/* tr(dW H dW^T) of RTN(W diag s) diag(1/s) against W, into *loss. */
static mxq_status scaled_rtn_loss(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *w, int out, int in,
                                  const double *h, const double *s, float *tmp, double *loss)
{
    mxq_status status = MXQ_OK;
    memcpy(tmp, w, (size_t)out * in * sizeof(float));
    mxq_scale_columns(tmp, out, in, s);
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, tmp, (size_t)out, (size_t)in, NULL, NULL, tmp));
    for (size_t r = 0; r < (size_t)out; r++)
        for (int j = 0; j < in; j++)
            tmp[r * (size_t)in + j] = (float)((double)tmp[r * (size_t)in + j] / s[j]);
    CALL(ctx, mxq_quant_loss(ctx, w, tmp, (size_t)out, (size_t)in, h, loss));
fail:
    return status;
}

mxq_status mxq_awq_search(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g, const double *h,
                          const double *mean, int grid, double *best_s, double *best_alpha, double *best_loss)
{
    mxq_status status = MXQ_OK;
    const int in = g->in;
    size_t max_out = 0;
    for (int k = 0; k < g->n; k++)
        max_out = (size_t)g->out[k] > max_out ? (size_t)g->out[k] : max_out;
    double *s = malloc((size_t)in * sizeof(double));
    float *tmp = malloc(max_out * (size_t)in * sizeof(float));
    CHECK_ALLOC(ctx, s && tmp, max_out * (size_t)in * sizeof(float), "the AWQ search");
    CHECK(ctx, grid >= 1, MXQ_ERR_ARG, "awq grid must be at least 1");
    *best_loss = INFINITY;
    *best_alpha = 0.0;
    for (int gi = 0; gi < grid; gi++) {
        double alpha = (double)gi / grid;
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
        double loss = 0.0;
        for (int k = 0; k < g->n; k++) {
            double part;
            CALL(ctx, scaled_rtn_loss(ctx, spec, g->weight[k], g->out[k], in, h, s, tmp, &part));
            loss += part;
        }
        /* strict: ties keep the smaller alpha, so alpha 0 (no scaling) wins ties */
        if (loss < *best_loss) {
            *best_loss = loss;
            *best_alpha = alpha;
            memcpy(best_s, s, (size_t)in * sizeof(double));
        }
    }
    CHECK(ctx, isfinite(*best_loss), MXQ_ERR_ARG, "AWQ search found no finite loss (NaN or Inf in weights or Hessian)");
fail:
    free(s);
    free(tmp);
    return status;
}

mxq_status mxq_awq_clip(mxq_ctx *ctx, const mxq_mx_spec *spec, float *w, int out, int in, const double *h,
                        int clip_grid, double max_shrink)
{
    mxq_status status = MXQ_OK;
    const int block = spec->block;
    const int steps = (int)(max_shrink * clip_grid + 1e-9);
    float cand[MXQ_MX_BLOCK_MAX], q[MXQ_MX_BLOCK_MAX];
    double d[MXQ_MX_BLOCK_MAX];
    for (size_t r = 0; r < (size_t)out; r++) {
        float *row = w + r * (size_t)in;
        for (int c0 = 0; c0 < in; c0 += block) {
            int n = in - c0 < block ? in - c0 : block;
            float org = 0.0f;
            for (int j = 0; j < n; j++)
                org = fabsf(row[c0 + j]) > org ? fabsf(row[c0 + j]) : org;
            if (!(org > 0.0f) || !isfinite(org))
                continue;
            double best = INFINITY;
            float best_max = org;
            for (int i = 0; i < steps; i++) {
                float mv = (float)((double)org * (1.0 - (double)i / clip_grid));
                for (int j = 0; j < n; j++)
                    cand[j] = row[c0 + j] > mv ? mv : row[c0 + j] < -mv ? -mv : row[c0 + j];
                CALL(ctx, mxq_mx_quantize_rows(ctx, spec, cand, 1, (size_t)n, NULL, NULL, q));
                for (int j = 0; j < n; j++)
                    d[j] = (double)row[c0 + j] - (double)q[j];
                double loss = 0.0;
                for (int a = 0; a < n; a++) {
                    const double *hrow = h + (size_t)(c0 + a) * in + c0;
                    double acc = 0.0;
                    for (int b = 0; b < n; b++)
                        acc += hrow[b] * d[b];
                    loss += d[a] * acc;
                }
                if (loss < best) {
                    best = loss;
                    best_max = mv;
                }
            }
            for (int j = 0; j < n; j++)
                row[c0 + j] = row[c0 + j] > best_max ? best_max : row[c0 + j] < -best_max ? -best_max : row[c0 + j];
        }
    }
fail:
    return status;
}
