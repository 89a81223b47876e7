/* Calibration statistics of linear inputs: H = sum x x^T, max|x|, sum|x|. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "algo/calib_stats.h"
#include "core/check.h"
#include "mxq/quantize.h"

mxq_status mxq_input_stats_init(mxq_ctx *ctx, int features, mxq_input_stats *s)
{
    mxq_status status = MXQ_OK;
    size_t f = (size_t)features;
    memset(s, 0, sizeof(*s));
    s->features = features;
    s->hessian = mxq_alloc(f * f * sizeof(double));
    s->abs_max = calloc(f, sizeof(double));
    s->abs_sum = calloc(f, sizeof(double));
    CHECK_ALLOC(ctx, s->hessian && s->abs_max && s->abs_sum, (f * f + 2 * f) * sizeof(double),
                "calibration statistics (the Hessian of a linear input)");
    memset(s->hessian, 0, f * f * sizeof(double));
    return MXQ_OK;
fail:
    mxq_input_stats_free(s);
    return status;
}

void mxq_input_stats_free(mxq_input_stats *s)
{
    free(s->hessian);
    free(s->abs_max);
    free(s->abs_sum);
    memset(s, 0, sizeof(*s));
}

/* max|x| and sum|x| per channel over rows [0, n) of x [n, f]. Branch-free
 * so that it vectorizes; a NaN makes its channel's sum NaN for good, and
 * the max follows the sum (max|x| of a channel that saw a NaN is NaN). */
static void add_abs_stats(mxq_input_stats *s, const float *x, size_t n)
{
    const size_t f = (size_t)s->features;
    double *sum = s->abs_sum, *mx = s->abs_max;
    for (size_t t = 0; t < n; t++) {
        const float *row = x + t * f;
        for (size_t j = 0; j < f; j++) {
            double a = fabs((double)row[j]);
            sum[j] += a;
            mx[j] = a > mx[j] ? a : mx[j];
        }
    }
    for (size_t j = 0; j < f; j++)
        if (isnan(sum[j]))
            mx[j] = sum[j];
}

void mxq_input_stats_add_abs(mxq_input_stats *s, const float *x, size_t tokens)
{
    add_abs_stats(s, x, tokens);
    s->n_tokens += (double)tokens;
}

/* Rows of H one Gram panel holds: 512 x 11008 floats (22 MB) for down_proj's
 * input, instead of a whole f x f float copy (485 MB) per call. */
enum { GRAM_PANEL = 512 };

/* H[i0:i0+p, i0:] += X[:, i0:i0+p]^T X[:, i0:] for the upper triangle, x
 * [n, f]: the diagonal block with ssyrk, the rest of the panel with sgemm,
 * in float32, then added into the double sum. */
static void add_gram_panel(mxq_input_stats *s, const float *x, size_t n, size_t i0, size_t p, float *panel)
{
    const size_t f = (size_t)s->features, w = f - i0;
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)p, (int)n, 1.0f, x + i0, (int)f, 0.0f, panel, (int)w);
    if (p < w)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)p, (int)(w - p), (int)n, 1.0f, x + i0, (int)f,
                    x + i0 + p, (int)f, 0.0f, panel + p, (int)w);
    for (size_t a = 0; a < p; a++) {
        double *hrow = s->hessian + (i0 + a) * f + i0;
        const float *prow = panel + a * w;
        for (size_t j = a; j < w; j++)
            hrow[j] += (double)prow[j];
    }
}

mxq_status mxq_input_stats_add(mxq_ctx *ctx, mxq_input_stats *s, const float *x, size_t tokens)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)s->features, rows = f < GRAM_PANEL ? f : GRAM_PANEL;
    /* The Gram product of a chunk in float32 (twice the speed of double),
     * added into the double sum: rounding grows with the chunk, not with
     * the whole calibration set. */
    const size_t chunk = tokens < 8192 ? tokens : 8192;
    float *panel = mxq_alloc_floats(rows * f);
    CHECK_ALLOC(ctx, panel, rows * f * sizeof(float), "the Gram product of a chunk of calibration tokens");
    for (size_t t0 = 0; t0 < tokens; t0 += chunk) {
        size_t n = tokens - t0 < chunk ? tokens - t0 : chunk;
        for (size_t i0 = 0; i0 < f; i0 += rows)
            add_gram_panel(s, x + t0 * f, n, i0, f - i0 < rows ? f - i0 : rows, panel);
        add_abs_stats(s, x + t0 * f, n);
    }
    s->n_tokens += (double)tokens;
fail:
    free(panel);
    return status;
}

void mxq_input_stats_finish(mxq_input_stats *s)
{
    /* the lower triangle from the upper, in tiles: a plain column walk
     * misses the cache on every element of an 11008 x 11008 matrix */
    const size_t f = (size_t)s->features, tile = 64;
    for (size_t i0 = 0; i0 < f; i0 += tile)
        for (size_t j0 = i0; j0 < f; j0 += tile)
            for (size_t i = i0; i < i0 + tile && i < f; i++)
                for (size_t j = j0 > i + 1 ? j0 : i + 1; j < j0 + tile && j < f; j++)
                    s->hessian[j * f + i] = s->hessian[i * f + j];
}

void mxq_input_stats_rescale(mxq_input_stats *s, const double *scales)
{
    const size_t f = (size_t)s->features;
    for (size_t i = 0; i < f; i++) {
        for (size_t j = 0; s->hessian && j < f; j++) /* no hessian: it is spread over ranks, rescaled there */
            s->hessian[i * f + j] /= scales[i] * scales[j];
        s->abs_max[i] /= scales[i];
        s->abs_sum[i] /= scales[i];
    }
}

mxq_status mxq_layer_stats_init(mxq_ctx *ctx, const mxq_model_config *cfg, mxq_layer_stats *stats)
{
    mxq_status status = MXQ_OK;
    memset(stats, 0, sizeof(*stats));
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        CALL(ctx, mxq_input_stats_init(ctx, mxq_input_features(cfg, (mxq_input_id)i), &stats->input[i]));
    return MXQ_OK;
fail:
    mxq_layer_stats_free(stats);
    return status;
}

void mxq_layer_stats_zero(mxq_layer_stats *stats)
{
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        mxq_input_stats *s = &stats->input[i];
        const size_t f = (size_t)s->features;
        s->n_tokens = 0;
        memset(s->hessian, 0, f * f * sizeof(double));
        memset(s->abs_max, 0, f * sizeof(double));
        memset(s->abs_sum, 0, f * sizeof(double));
    }
}

void mxq_layer_stats_free(mxq_layer_stats *stats)
{
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        mxq_input_stats_free(&stats->input[i]);
}

size_t mxq_layer_stats_bytes(const mxq_model_config *cfg)
{
    size_t total = 0;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        size_t f = (size_t)mxq_input_features(cfg, (mxq_input_id)i);
        total += (f * f + 2 * f) * sizeof(double);
    }
    return total;
}
