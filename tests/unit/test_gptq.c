/* GPTQ-MX against an independent, straightforward column-by-column
 * implementation written here (own Cholesky and inverse, no lazy batches,
 * no BLAS), and against properties: loss below round-to-nearest, results on
 * the MX grid with the recorded scales, dead channels zeroed. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mxq/gptq.h"
#include "mxq/mxq.h"
#include "testutil.h"

/* A Hessian sum_t x_t x_t^T from tokens with correlated channels and uneven
 * scales, as real activations have; `dead` channels are always zero. */
static double *make_hessian(tu_rng *rng, size_t n, size_t tokens, const int *dead, size_t n_dead)
{
    double *x = malloc(tokens * n * sizeof(double));
    double *h = calloc(n * n, sizeof(double));
    double *chan_scale = malloc(n * sizeof(double));
    for (size_t c = 0; c < n; c++)
        chan_scale[c] = exp(1.5 * tu_rng_normal(rng));
    for (size_t t = 0; t < tokens; t++) {
        double common = tu_rng_normal(rng);
        for (size_t c = 0; c < n; c++)
            x[t * n + c] = chan_scale[c] * (0.6 * common + tu_rng_normal(rng) + 0.3 * (c ? x[t * n + c - 1] : 0));
        for (size_t d = 0; d < n_dead; d++)
            x[t * n + (size_t)dead[d]] = 0.0;
    }
    for (size_t t = 0; t < tokens; t++)
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < n; j++)
                h[i * n + j] += x[t * n + i] * x[t * n + j];
    free(x);
    free(chan_scale);
    return h;
}

static float *make_weight(tu_rng *rng, size_t m, size_t n)
{
    float *w = malloc(m * n * sizeof(float));
    for (size_t i = 0; i < m * n; i++)
        w[i] = (float)(0.05 * tu_rng_normal(rng) * (i % 17 == 0 ? 6.0 : 1.0)); /* a few outliers */
    return w;
}

/* ---- the independent reference ---------------------------------------- */

/* In-place lower Cholesky A = L L^T (A n x n, row-major); returns 0 on success. */
static int cholesky_lower(double *a, size_t n)
{
    for (size_t j = 0; j < n; j++) {
        double s = a[j * n + j];
        for (size_t k = 0; k < j; k++)
            s -= a[j * n + k] * a[j * n + k];
        if (s <= 0)
            return -1;
        a[j * n + j] = sqrt(s);
        for (size_t i = j + 1; i < n; i++) {
            double t = a[i * n + j];
            for (size_t k = 0; k < j; k++)
                t -= a[i * n + k] * a[j * n + k];
            a[i * n + j] = t / a[j * n + j];
        }
        for (size_t i = 0; i < j; i++)
            a[i * n + j] = 0.0;
    }
    return 0;
}

/* inverse of an SPD matrix through its Cholesky factor: solve A X = I */
static void spd_inverse(const double *a, double *inv, size_t n)
{
    double *l = malloc(n * n * sizeof(double));
    memcpy(l, a, n * n * sizeof(double));
    assert_int_equal(cholesky_lower(l, n), 0);
    double *y = malloc(n * sizeof(double));
    for (size_t col = 0; col < n; col++) {
        for (size_t i = 0; i < n; i++) { /* L y = e_col */
            double s = i == col ? 1.0 : 0.0;
            for (size_t k = 0; k < i; k++)
                s -= l[i * n + k] * y[k];
            y[i] = s / l[i * n + i];
        }
        for (size_t ii = n; ii-- > 0;) { /* L^T x = y */
            double s = y[ii];
            for (size_t k = ii + 1; k < n; k++)
                s -= l[k * n + ii] * inv[k * n + col];
            inv[ii * n + col] = s / l[ii * n + ii];
        }
    }
    free(y);
    free(l);
}

/* Column-by-column GPTQ (microblock 1) exactly as docs/design.md section 1 states it. */
static void reference_gptq(const mxq_mx_spec *spec, double damp, float *weight, size_t m, size_t n, const double *h,
                           double n_tokens, uint8_t *scales)
{
    double *hp = malloc(n * n * sizeof(double)), *hinv = malloc(n * n * sizeof(double));
    double *w = malloc(m * n * sizeof(double));
    for (size_t i = 0; i < n * n; i++)
        hp[i] = 2.0 * h[i] / n_tokens;
    for (size_t r = 0; r < m; r++)
        for (size_t c = 0; c < n; c++)
            w[r * n + c] = weight[r * n + c];
    for (size_t i = 0; i < n; i++)
        if (hp[i * n + i] == 0.0) {
            hp[i * n + i] = 1.0;
            for (size_t r = 0; r < m; r++)
                w[r * n + i] = 0.0;
        }
    double mean = 0;
    for (size_t i = 0; i < n; i++)
        mean += hp[i * n + i];
    mean /= (double)n;
    for (size_t i = 0; i < n; i++)
        hp[i * n + i] += damp * mean;
    spd_inverse(hp, hinv, n);
    /* U = upper Cholesky factor of H^-1 = (lower factor)^T */
    assert_int_equal(cholesky_lower(hinv, n), 0);
    double *u = hp;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++)
            u[i * n + j] = j >= i ? hinv[j * n + i] : 0.0;

    const int B = spec->block;
    size_t nblocks = mxq_mx_blocks_per_row(n, B);
    int *se = malloc(m * sizeof(int));
    float tmp[4096];
    for (size_t j = 0; j < n; j++) {
        if (j % (size_t)B == 0) {
            size_t len = n - j < (size_t)B ? n - j : (size_t)B;
            for (size_t r = 0; r < m; r++) {
                for (size_t c = 0; c < len; c++)
                    tmp[c] = (float)w[r * n + j + c];
                se[r] = mxq_mx_shared_exponent(spec->format, tmp, len, 1);
                scales[r * nblocks + j / (size_t)B] = (uint8_t)(se[r] + 127);
            }
        }
        for (size_t r = 0; r < m; r++) {
            double q = mxq_mx_quantize_value(spec->format, spec->rounding, (float)w[r * n + j], se[r]);
            double e = (w[r * n + j] - q) / u[j * n + j];
            for (size_t c = j + 1; c < n; c++)
                w[r * n + c] -= e * u[j * n + c];
            w[r * n + j] = q;
        }
    }
    for (size_t i = 0; i < m * n; i++)
        weight[i] = (float)w[i];
    free(se);
    free(w);
    free(hp);
    free(hinv);
}

/* tr((a - b) H (a - b)^T), plainly in double. */
static double quant_loss(const float *a, const float *b, size_t m, size_t n, const double *h)
{
    double total = 0;
    for (size_t r = 0; r < m; r++)
        for (size_t i = 0; i < n; i++) {
            double di = (double)a[r * n + i] - b[r * n + i], acc = 0;
            for (size_t j = 0; j < n; j++)
                acc += h[i * n + j] * ((double)a[r * n + j] - b[r * n + j]);
            total += di * acc;
        }
    return total;
}

/* ---- tests ---------------------------------------------------------- */

static void test_microblock1_agrees_with_reference(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    const char *formats[] = {"mxint4", "mxfp4_e2m1", "mxint3"};
    const int lazy[] = {128, 7, 1000};
    tu_rng rng = {42};
    const size_t m = 40, n = 172, tokens = 600;
    int dead[2] = {5, 100};
    double *h = make_hessian(&rng, n, tokens, dead, 2);
    size_t compared = 0, diff_total = 0;
    for (size_t f = 0; f < 3; f++)
        for (size_t l = 0; l < 3; l++) {
            mxq_mx_spec spec = {mxq_format_by_name(formats[f]), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
            float *w = make_weight(&rng, m, n);
            float *ref = malloc(m * n * sizeof(float)), *orig = malloc(m * n * sizeof(float));
            memcpy(ref, w, m * n * sizeof(float));
            memcpy(orig, w, m * n * sizeof(float));
            uint8_t scales[40 * 6], ref_scales[40 * 6];
            mxq_gptq_options opt;
            mxq_gptq_defaults(&opt);
            opt.microblock = 1;
            opt.lazy_block = lazy[l];
            mxq_gptq_stats st;
            if (mxq_gptq_quantize(ctx, &spec, &opt, w, m, n, h, (double)tokens, scales, &st) != MXQ_OK)
                fail_msg("%s", mxq_error_message(ctx));
            reference_gptq(&spec, opt.damp, ref, m, n, h, (double)tokens, ref_scales);
            size_t diff = 0, diff_scales = 0;
            for (size_t i = 0; i < m * n; i++)
                diff += memcmp(&w[i], &ref[i], 4) != 0;
            for (size_t i = 0; i < sizeof(scales); i++)
                diff_scales += scales[i] != ref_scales[i];
            double loss = quant_loss(orig, w, m, n, h), loss_ref = quant_loss(orig, ref, m, n, h);
            print_message("# %s b1=%d: %zu of %zu weights, %zu of %zu scales differ; loss %.6g vs reference %.6g\n",
                          formats[f], lazy[l], diff, m * n, diff_scales, sizeof(scales), loss, loss_ref);
            if (diff * 100 > m * n || diff_scales * 100 > sizeof(scales) || fabs(loss - loss_ref) > 2e-3 * loss_ref)
                fail_msg("%s b1=%d: %zu of %zu weights, %zu scales differ from the column-by-column reference; loss "
                         "%.6g vs %.6g",
                         formats[f], lazy[l], diff, m * n, diff_scales, loss, loss_ref);
            diff_total += diff;
            compared += m * n;
            free(w);
            free(ref);
            free(orig);
        }
    print_message("# %zu of %zu weights differ from the straightforward implementation\n", diff_total, compared);
    free(h);
    mxq_ctx_destroy(ctx);
}

/* Loss below RTN, on the grid with the recorded scales, dead channels zero;
 * for micro-block sizes 1, B, 2B, b1, with and without act-order. */
static void test_properties(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    tu_rng rng = {7};
    const size_t m = 96, n = 256, tokens = 1000;
    int dead[3] = {0, 77, 255};
    double *h = make_hessian(&rng, n, tokens, dead, 3);
    const char *formats[] = {"mxint4", "mxint3", "mxfp4_e2m1", "mxint8"};
    const int micro[] = {1, 32, 64, 128};
    for (size_t f = 0; f < 4; f++)
        for (size_t mb = 0; mb < 4; mb++)
            for (int act = 0; act < 2; act++) {
                mxq_mx_spec spec = {mxq_format_by_name(formats[f]), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
                mxq_gptq_options opt;
                mxq_gptq_defaults(&opt);
                opt.microblock = micro[mb];
                opt.act_order = act;
                float *w = make_weight(&rng, m, n), *orig = malloc(m * n * sizeof(float));
                memcpy(orig, w, m * n * sizeof(float));
                uint8_t *scales = malloc(m * 8);
                mxq_gptq_stats st;
                if (mxq_gptq_quantize(ctx, &spec, &opt, w, m, n, h, (double)tokens, scales, &st) != MXQ_OK)
                    fail_msg("%s", mxq_error_message(ctx));
                /* the losses GPTQ reports (from its Cholesky factor) are tr(dW H dW^T) */
                float *rtn = malloc(m * n * sizeof(float));
                assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, orig, m, n, NULL, NULL, rtn), MXQ_OK);
                double loss = quant_loss(orig, w, m, n, h), loss_rtn = quant_loss(orig, rtn, m, n, h);
                if (fabs(st.loss - loss) > 1e-4 * loss || fabs(st.loss_rtn - loss_rtn) > 1e-4 * loss_rtn)
                    fail_msg("%s microblock %d act_order %d: reported losses %.8g, rtn %.8g; plainly %.8g, %.8g",
                             formats[f], micro[mb], act, st.loss, st.loss_rtn, loss, loss_rtn);
                free(rtn);
                free(orig);
                if (!(st.loss < st.loss_rtn))
                    fail_msg("%s microblock %d act_order %d: GPTQ loss %g not below RTN %g", formats[f], micro[mb], act,
                             st.loss, st.loss_rtn);
                assert_int_equal(st.dead_channels, 3);
                for (size_t r = 0; r < m; r++) {
                    for (int d = 0; d < 3; d++)
                        assert_true(w[r * n + (size_t)dead[d]] == 0.0f);
                    for (size_t c = 0; c < n; c++) {
                        int se = (int)scales[r * 8 + c / 32] - 127;
                        float back = mxq_mx_quantize_value(spec.format, spec.rounding, w[r * n + c], se);
                        if (back != w[r * n + c])
                            fail_msg("%s: Q[%zu,%zu] = %g is not on the MX grid of scale 2^%d", formats[f], r, c,
                                     (double)w[r * n + c], se);
                    }
                }
                if (f == 0 && mb == 3 && act == 0)
                    print_message("# mxint4 microblock 128: GPTQ loss %.4g vs RTN %.4g (%.1f%% lower)\n", st.loss,
                                  st.loss_rtn, 100.0 * (1 - st.loss / st.loss_rtn));
                free(w);
                free(scales);
            }
    free(h);
    mxq_ctx_destroy(ctx);
}

static void test_option_errors(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_mx_spec spec = {mxq_format_by_name("mxint4"), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    mxq_gptq_options opt;
    mxq_gptq_defaults(&opt);
    opt.microblock = 48;
    assert_int_equal(mxq_gptq_check(ctx, &opt, &spec), MXQ_ERR_ARG);
    assert_non_null(strstr(mxq_error_message(ctx), "gptq.microblock 48 must be 1 or a multiple of the weight MX block 32"));
    mxq_error_clear(ctx);
    opt.microblock = 64;
    opt.lazy_block = 96;
    assert_int_equal(mxq_gptq_check(ctx, &opt, &spec), MXQ_ERR_ARG);
    assert_non_null(strstr(mxq_error_message(ctx), "gptq.block 96 must be a multiple of gptq.microblock 64"));
    mxq_error_clear(ctx);
    opt.lazy_block = 128;
    opt.damp = -1;
    assert_int_equal(mxq_gptq_check(ctx, &opt, &spec), MXQ_ERR_ARG);
    mxq_ctx_destroy(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_microblock1_agrees_with_reference),
        cmocka_unit_test(test_properties),
        cmocka_unit_test(test_option_errors),
    };
    return cmocka_run_group_tests_name("gptq", tests, NULL, NULL);
}
