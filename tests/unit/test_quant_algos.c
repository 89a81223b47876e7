/* Calibration statistics, SmoothQuant, AWQ and the MX packing of GPTQ output,
 * against independent computations written here: explicit sums over tokens
 * instead of Hessians, the published formulas, brute-force searches. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mxq/mxq.h"
#include "testutil.h"

/* Activations with uneven channel scales and a few outlier channels, as
 * LLM activations have. */
static float *make_x(tu_rng *rng, size_t tokens, size_t f)
{
    float *x = malloc(tokens * f * sizeof(float));
    for (size_t t = 0; t < tokens; t++)
        for (size_t j = 0; j < f; j++)
            x[t * f + j] = (float)(tu_rng_normal(rng) * (j % 11 == 3 ? 20.0 : 0.5 + (double)(j % 5)));
    return x;
}

static float *make_w(tu_rng *rng, size_t out, size_t in)
{
    float *w = malloc(out * in * sizeof(float));
    for (size_t i = 0; i < out * in; i++)
        w[i] = (float)(0.05 * tu_rng_normal(rng));
    return w;
}

static mxq_input_stats stats_of(mxq_ctx *ctx, const float *x, size_t tokens, size_t f)
{
    mxq_input_stats s;
    assert_int_equal(mxq_input_stats_init(ctx, (int)f, &s), MXQ_OK);
    /* in two uneven pieces, as micro-batches arrive */
    assert_int_equal(mxq_input_stats_add(ctx, &s, x, tokens / 3), MXQ_OK);
    assert_int_equal(mxq_input_stats_add(ctx, &s, x + tokens / 3 * f, tokens - tokens / 3), MXQ_OK);
    mxq_input_stats_finish(&s);
    return s;
}

/* sum over tokens of ||(A - B) x_t||^2, by explicit products */
static double output_error(const float *a, const float *b, size_t out, size_t in, const float *x, size_t tokens)
{
    double total = 0;
    for (size_t t = 0; t < tokens; t++)
        for (size_t r = 0; r < out; r++) {
            double y = 0;
            for (size_t j = 0; j < in; j++)
                y += ((double)a[r * in + j] - (double)b[r * in + j]) * (double)x[t * in + j];
            total += y * y;
        }
    return total;
}

static void test_stats_match_explicit_sums(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tu_rng rng = {42};
    /* small; wider than one 512-row Gram panel (ssyrk + sgemm, panels from
     * row 512); longer than one 8192-token chunk */
    const size_t cases[3][2] = {{2600, 24}, {700, 600}, {9000, 20}};
    for (int k = 0; k < 3; k++) {
        const size_t tokens = cases[k][0], f = cases[k][1];
        float *x = make_x(&rng, tokens, f);
        mxq_input_stats s = stats_of(ctx, x, tokens, f);
        assert_true(s.n_tokens == (double)tokens);
        double worst = 0;
        for (size_t i = 0; i < f; i++) {
            double amax = 0, asum = 0;
            for (size_t t = 0; t < tokens; t++) {
                amax = fmax(amax, fabs((double)x[t * f + i]));
                asum += fabs((double)x[t * f + i]);
            }
            assert_true(amax == s.abs_max[i]);
            assert_true(fabs(asum - s.abs_sum[i]) <= 1e-12 * asum);
            for (size_t j = 0; j < f; j++) {
                double h = 0;
                for (size_t t = 0; t < tokens; t++)
                    h += (double)x[t * f + i] * (double)x[t * f + j];
                double scale = sqrt(s.hessian[i * f + i] * s.hessian[j * f + j]);
                worst = fmax(worst, fabs(h - s.hessian[i * f + j]) / scale);
                assert_true(s.hessian[i * f + j] == s.hessian[j * f + i]);
            }
        }
        print_message("# H = X^T X, %zu tokens x %zu features: max |diff| / sqrt(H_ii H_jj) = %.2g\n", tokens, f,
                      worst);
        assert_true(worst < 1e-6); /* float32 Gram products of chunks, summed in double */
        mxq_input_stats_free(&s);
        free(x);
    }
    mxq_ctx_destroy(ctx);
}

static void test_smoothquant_formula(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tu_rng rng = {7};
    const int in = 40, out_a = 16, out_b = 24;
    float *wa = make_w(&rng, out_a, in), *wb = make_w(&rng, out_b, in);
    wb[3 * in + 5] = 2.0f; /* the max over both linears comes from b */
    double xmax[40], s[40];
    for (int j = 0; j < in; j++)
        xmax[j] = j == 0 ? 0.0 : 0.1 * (j + 1);
    mxq_linear_group g = {2, {wa, wb}, {out_a, out_b}, in};
    assert_int_equal(mxq_smoothquant_scales(ctx, &g, xmax, 0.5, s), MXQ_OK);
    for (int j = 0; j < in; j++) {
        double wmax = 0;
        for (int r = 0; r < out_a; r++)
            wmax = fmax(wmax, fabs(wa[r * in + j]));
        for (int r = 0; r < out_b; r++)
            wmax = fmax(wmax, fabs(wb[r * in + j]));
        double expect = sqrt(fmax(xmax[j], 1e-5)) / sqrt(fmax(wmax, 1e-5));
        assert_true(fabs(s[j] - expect) <= 1e-14 * expect);
    }
    free(wa);
    free(wb);
    mxq_ctx_destroy(ctx);
}

/* The AWQ grid search picks the alpha a brute force over explicit outputs
 * picks, with the same loss. */
static void test_awq_search_matches_brute_force(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tu_rng rng = {99};
    const size_t tokens = 400, in = 64, out = 48;
    float *x = make_x(&rng, tokens, in), *w = make_w(&rng, out, in);
    mxq_input_stats st = stats_of(ctx, x, tokens, in);
    mxq_mx_spec spec = {mxq_format_get(MXQ_MXINT4), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    double mean[64], s[64], alpha, loss;
    for (size_t j = 0; j < in; j++)
        mean[j] = st.abs_sum[j] / st.n_tokens;
    mxq_linear_group g = {1, {w}, {(int)out}, (int)in};
    assert_int_equal(mxq_awq_search(ctx, &spec, &g, st.hessian, mean, &(mxq_awq_options){20, 1, 20, 0.5, 128}, s, &alpha, &loss), MXQ_OK);

    float *q = malloc(out * in * sizeof(float));
    double best = INFINITY, best_alpha = -1, rtn = 0;
    for (int k = 0; k < 20; k++) {
        double a = k / 20.0, ss[64], smax = 0, smin = INFINITY;
        for (size_t j = 0; j < in; j++) {
            ss[j] = fmax(pow(mean[j], a), 1e-4);
            smax = fmax(smax, ss[j]);
            smin = fmin(smin, ss[j]);
        }
        for (size_t j = 0; j < in; j++)
            ss[j] /= sqrt(smax * smin);
        for (size_t r = 0; r < out; r++)
            for (size_t j = 0; j < in; j++)
                q[r * in + j] = (float)((double)w[r * in + j] * ss[j]);
        assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, q, out, in, NULL, NULL, q), MXQ_OK);
        for (size_t r = 0; r < out; r++)
            for (size_t j = 0; j < in; j++)
                q[r * in + j] = (float)((double)q[r * in + j] / ss[j]);
        double e = output_error(w, q, out, in, x, tokens);
        if (k == 0)
            rtn = e;
        if (e < best) {
            best = e;
            best_alpha = a;
        }
    }
    print_message("# AWQ: alpha %.2f (brute force %.2f), loss %.6g (%.6g), RTN %.6g\n", alpha, best_alpha, loss, best,
                  rtn);
    assert_true(alpha == best_alpha);
    assert_true(fabs(loss - best) <= 1e-5 * best); /* float32 GEMMs, double sums */
    assert_true(loss < rtn); /* the outlier channels make scaling pay */
    free(q);
    free(x);
    free(w);
    mxq_input_stats_free(&st);
    mxq_ctx_destroy(ctx);
}

/* ---- the AWQ search against a plain double search ----------------------- */

/* The exact AWQ loss of scales from mean^alpha over a group, plainly in
 * double: sum_k tr(dW_k H dW_k^T), every row. */
static double exact_awq_loss(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g, const double *h,
                             const double *mean, double alpha)
{
    const size_t in = (size_t)g->in;
    double *sc = malloc(in * sizeof(double)), smax = 0, smin = INFINITY, total = 0;
    for (size_t j = 0; j < in; j++) {
        sc[j] = fmax(pow(mean[j], alpha), 1e-4);
        smax = fmax(smax, sc[j]);
        smin = fmin(smin, sc[j]);
    }
    for (size_t j = 0; j < in; j++)
        sc[j] /= sqrt(smax * smin);
    for (int k = 0; k < g->n; k++) {
        size_t out = (size_t)g->out[k];
        float *q = malloc(out * in * sizeof(float));
        double *d = malloc(in * sizeof(double));
        for (size_t i = 0; i < out * in; i++)
            q[i] = (float)((double)g->weight[k][i] * sc[i % in]);
        assert_int_equal(mxq_mx_quantize_rows(ctx, spec, q, out, in, NULL, NULL, q), MXQ_OK);
        for (size_t r = 0; r < out; r++) {
            for (size_t j = 0; j < in; j++)
                d[j] = (double)g->weight[k][r * in + j] - (double)(float)((double)q[r * in + j] / sc[j]);
            for (size_t a = 0; a < in; a++)
                for (size_t b = 0; b < in; b++)
                    total += d[a] * h[a * in + b] * d[b];
        }
        free(q);
        free(d);
    }
    free(sc);
    return total;
}

/* The alpha of the grid with the smallest exact loss (ties: smaller alpha). */
static double exact_awq_alpha(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g, const double *h,
                              const double *mean, int grid, double *best_loss)
{
    double best_alpha = 0;
    *best_loss = INFINITY;
    for (int a = 0; a < grid; a++) {
        double loss = exact_awq_loss(ctx, spec, g, h, mean, (double)a / grid);
        if (loss < *best_loss) {
            *best_loss = loss;
            best_alpha = (double)a / grid;
        }
    }
    return best_alpha;
}

typedef struct {
    mxq_layer_stats *stats;
} bundled_stats;

static mxq_status observe_bundled(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x,
                                  size_t tokens, int features)
{
    (void)features;
    bundled_stats *b = user;
    return mxq_input_stats_add(ctx, &b->stats[layer].input[input], x, tokens);
}

/* On the bundled model, with its calibration set, every layer's four
 * input groups: the search mxq runs (float32 GEMMs; its row sampling does
 * not apply to linears this small) picks the alpha the plain double search
 * picks. */
static void test_awq_search_on_bundled_model(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_model_config cfg;
    mxq_model *m;
    assert_int_equal(mxq_config_load(ctx, tu_data_path("stories260K"), &cfg), MXQ_OK);
    mxq_model_part all = {0, cfg.n_layers, 1, 0};
    assert_int_equal(mxq_model_load(ctx, tu_data_path("stories260K"), &cfg, &all, &m), MXQ_OK);
    hid_t file = H5Fopen(tu_data_path("stories260K/calib.h5"), H5F_ACC_RDONLY, H5P_DEFAULT);
    int rank;
    size_t dims[4];
    int32_t *ids = tu_h5_read(file, "/tokens", H5T_NATIVE_INT32, 4, &rank, dims);
    H5Fclose(file);
    const int n_seqs = dims[0] < 16 ? (int)dims[0] : 16, S = (int)dims[1];
    mxq_layer_stats *stats = calloc((size_t)cfg.n_layers, sizeof(*stats));
    for (int l = 0; l < cfg.n_layers; l++)
        assert_int_equal(mxq_layer_stats_init(ctx, &cfg, &stats[l]), MXQ_OK);
    bundled_stats b = {stats};
    mxq_observer obs = {observe_bundled, &b};
    mxq_workspace *ws;
    float *x = malloc((size_t)n_seqs * S * cfg.hidden * sizeof(float));
    assert_int_equal(mxq_workspace_create(ctx, &cfg, n_seqs, S, &ws), MXQ_OK);
    assert_int_equal(mxq_model_embed(ctx, m, ids, n_seqs, S, x), MXQ_OK);
    assert_int_equal(mxq_model_run_layers_observed(ctx, m, 0, cfg.n_layers, x, n_seqs, S, NULL, &obs, ws), MXQ_OK);
    mxq_mx_spec spec = {mxq_format_get(MXQ_MXINT4), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    mxq_awq_options opt = {20, 1, 20, 0.5, 128};
    int compared = 0;
    for (int l = 0; l < cfg.n_layers; l++)
        for (int input = 0; input < MXQ_INPUT_COUNT; input++) {
            mxq_input_stats *in = &stats[l].input[input];
            mxq_input_stats_finish(in);
            mxq_linear_group g = {0};
            for (int li = 0; li < MXQ_LIN_COUNT; li++)
                if (mxq_linear_input((mxq_linear_id)li) == (mxq_input_id)input) {
                    int out, inf;
                    mxq_linear_shape(&cfg, (mxq_linear_id)li, &out, &inf);
                    g.weight[g.n] = m->layers[l].weight[li];
                    g.out[g.n++] = out;
                    g.in = inf;
                }
            double *mean = malloc((size_t)g.in * sizeof(double)), *sc = malloc((size_t)g.in * sizeof(double));
            for (int j = 0; j < g.in; j++)
                mean[j] = in->abs_sum[j] / in->n_tokens;
            double alpha, loss, exact_loss;
            assert_int_equal(mxq_awq_search(ctx, &spec, &g, in->hessian, mean, &opt, sc, &alpha, &loss), MXQ_OK);
            double exact = exact_awq_alpha(ctx, &spec, &g, in->hessian, mean, opt.grid, &exact_loss);
            if (alpha != exact || fabs(loss - exact_loss) > 1e-4 * exact_loss)
                fail_msg("layer %d %s: alpha %.2f, loss %.6g; the plain double search: alpha %.2f, loss %.6g", l,
                         mxq_input_name((mxq_input_id)input), alpha, loss, exact, exact_loss);
            compared++;
            free(mean);
            free(sc);
        }
    print_message("# AWQ: %d groups of the bundled model, the same alpha as the plain double search\n", compared);
    for (int l = 0; l < cfg.n_layers; l++)
        mxq_layer_stats_free(&stats[l]);
    free(stats);
    free(x);
    free(ids);
    mxq_workspace_free(ws);
    mxq_model_free(m);
    mxq_ctx_destroy(ctx);
}

/* The exact loss of every (out / sample_rows)-th row of each linear (all
 * rows below 2 sample_rows), each linear's scaled by out / rows. */
static double sampled_rows_loss(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_linear_group *g, const double *h,
                                const double *mean, double alpha, int sample_rows)
{
    double total = 0;
    for (int k = 0; k < g->n; k++) {
        size_t out = (size_t)g->out[k], in = (size_t)g->in;
        size_t stride = out < 2 * (size_t)sample_rows ? 1 : out / (size_t)sample_rows, rows = out / stride;
        float *w = malloc(rows * in * sizeof(float));
        for (size_t r = 0; r < rows; r++)
            memcpy(w + r * in, g->weight[k] + r * stride * in, in * sizeof(float));
        mxq_linear_group one = {1, {w}, {(int)rows}, g->in};
        total += exact_awq_loss(ctx, spec, &one, h, mean, alpha) * (double)out / (double)rows;
        free(w);
    }
    return total;
}

/* Where row sampling applies: the alpha it picks is within 1% of the best
 * exact loss of the grid (the stated tolerance), over seeds, one linear of
 * 1024 rows (every 8th evaluated) and groups of three of unequal heights
 * (1024: every 8th; 256: every row; 640: every 5th), and mostly the same
 * alpha; the loss it reports is the exact loss of the rows it sampled
 * (every (out / sample_rows)-th), each linear's scaled by out / rows. */
static void test_awq_sampled_search_tolerance(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    const size_t tokens = 600, in = 96, outs[3] = {1024, 256, 640};
    mxq_mx_spec spec = {mxq_format_get(MXQ_MXINT4), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    mxq_awq_options opt = {20, 1, 20, 0.5, 128};
    int same = 0, cases = 0;
    double worst = 0;
    for (uint64_t seed = 1; seed <= 6; seed++)
        for (int n = 1; n <= 3; n += 2) {
            tu_rng rng = {seed * 7919};
            float *x = make_x(&rng, tokens, in), *w[3];
            mxq_input_stats st = stats_of(ctx, x, tokens, in);
            mxq_linear_group g = {n, {0}, {0}, (int)in};
            for (int k = 0; k < n; k++) {
                w[k] = make_w(&rng, outs[k], in);
                g.weight[k] = w[k];
                g.out[k] = (int)outs[k];
            }
            double mean[96], sc[96], alpha, loss, exact_loss;
            for (size_t j = 0; j < in; j++)
                mean[j] = st.abs_sum[j] / st.n_tokens;
            assert_int_equal(mxq_awq_search(ctx, &spec, &g, st.hessian, mean, &opt, sc, &alpha, &loss), MXQ_OK);
            double exact = exact_awq_alpha(ctx, &spec, &g, st.hessian, mean, opt.grid, &exact_loss);
            double at_chosen = exact_awq_loss(ctx, &spec, &g, st.hessian, mean, alpha);
            double excess = at_chosen / exact_loss - 1.0;
            worst = fmax(worst, excess);
            same += alpha == exact;
            cases++;
            if (excess > 0.01)
                fail_msg("seed %llu, %d linears: sampled alpha %.2f has exact loss %.6g, %.2f%% above the best "
                         "(alpha %.2f, %.6g)",
                         (unsigned long long)seed, n, alpha, at_chosen, 100 * excess, exact, exact_loss);
            double on_rows = sampled_rows_loss(ctx, &spec, &g, st.hessian, mean, alpha, opt.sample_rows);
            if (fabs(loss / on_rows - 1.0) > 1e-4)
                fail_msg("seed %llu, %d linears: reported loss %.6g; the sampled rows' exact loss, scaled, %.6g",
                         (unsigned long long)seed, n, loss, on_rows);
            for (int k = 0; k < n; k++)
                free(w[k]);
            free(x);
            mxq_input_stats_free(&st);
        }
    print_message("# AWQ with sampled rows: %d of %d cases the exact alpha; worst exact-loss excess %.3f%%\n", same,
                  cases, 100 * worst);
    mxq_ctx_destroy(ctx);
}

/* The report's losses in a layer: gate_proj and up_proj have 1024 rows,
 * so every 4th row (1024 / 256) is evaluated and the sum scaled by 4; the
 * other linears (64 rows) exactly. Against explicit output errors of
 * exactly those rows. One linear on its own (quantize-linear) is exact. */
static void test_report_loss_rows(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    tu_rng rng = {31};
    const size_t tokens = 120;
    mxq_model_config cfg = {.arch = MXQ_ARCH_LLAMA, .hidden = 64, .intermediate = 1024, .n_layers = 1,
                            .n_heads = 4, .n_kv_heads = 4, .head_dim = 16, .vocab = 100};
    mxq_layer L = {0};
    float *w0[MXQ_LIN_COUNT], *x[MXQ_INPUT_COUNT];
    mxq_layer_stats stats;
    assert_int_equal(mxq_layer_stats_init(ctx, &cfg, &stats), MXQ_OK);
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        size_t f = (size_t)mxq_input_features(&cfg, (mxq_input_id)i);
        x[i] = make_x(&rng, tokens, f);
        assert_int_equal(mxq_input_stats_add(ctx, &stats.input[i], x[i], tokens), MXQ_OK);
        mxq_input_stats_finish(&stats.input[i]);
    }
    L.attn_norm = calloc(64, sizeof(float));
    L.ffn_norm = calloc(64, sizeof(float));
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(&cfg, (mxq_linear_id)li, &out, &in);
        L.weight[li] = make_w(&rng, (size_t)out, (size_t)in);
        w0[li] = malloc((size_t)out * in * sizeof(float));
        memcpy(w0[li], L.weight[li], (size_t)out * in * sizeof(float));
    }
    mxq_recipe recipe;
    assert_int_equal(mxq_recipe_parse_string(ctx, "weights: {format: mxint4, block: 32}\nalgorithms: []\n", "rtn",
                                             &recipe),
                     MXQ_OK);
    mxq_layer_result res = {0};
    assert_int_equal(mxq_quantize_layer(ctx, &recipe, &cfg, 0, &L, &stats, &res), MXQ_OK);
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(&cfg, (mxq_linear_id)li, &out, &in);
        const size_t stride = out >= 512 ? (size_t)out / 256 : 1, rows = (size_t)out / stride;
        float *ws = malloc(rows * in * sizeof(float)), *qs = malloc(rows * in * sizeof(float));
        for (size_t r = 0; r < rows; r++) {
            memcpy(ws + r * in, w0[li] + r * stride * in, (size_t)in * sizeof(float));
            memcpy(qs + r * in, L.weight[li] + r * stride * in, (size_t)in * sizeof(float));
        }
        double e = (double)stride * output_error(ws, qs, rows, (size_t)in, x[mxq_linear_input((mxq_linear_id)li)],
                                                 tokens);
        if (fabs(res.linear[li].loss - e) > 1e-5 * e || fabs(res.linear[li].loss_rtn - e) > 1e-5 * e)
            fail_msg("%s: report loss %.8g (rtn %.8g), explicit on every %zu-th row %.8g", mxq_linear_name(li),
                     res.linear[li].loss, res.linear[li].loss_rtn, stride, e);
        free(ws);
        free(qs);
    }
    /* quantize-linear: exact on all 1024 rows of gate_proj */
    double loss_rtn, loss;
    float *q = malloc(1024 * 64 * sizeof(float));
    assert_int_equal(mxq_quantize_single_linear(ctx, &recipe, MXQ_LIN_GATE, w0[MXQ_LIN_GATE], 1024, 64,
                                                &stats.input[MXQ_INPUT_MLP], q, &loss_rtn, &loss),
                     MXQ_OK);
    double e = output_error(w0[MXQ_LIN_GATE], q, 1024, 64, x[MXQ_INPUT_MLP], tokens);
    print_message("# report loss of gate_proj from 256 of 1024 rows %.6g; quantize-linear %.6g, explicit %.6g\n",
                  res.linear[MXQ_LIN_GATE].loss, loss, e);
    assert_true(fabs(loss - e) <= 1e-5 * e && fabs(loss_rtn - e) <= 1e-5 * e);
    free(q);
    mxq_layer_result_free(&res);
    mxq_recipe_free(&recipe);
    mxq_layer_stats_free(&stats);
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        free(L.weight[li]);
        free(w0[li]);
    }
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        free(x[i]);
    free(L.attn_norm);
    free(L.ffn_norm);
    mxq_ctx_destroy(ctx);
}

/* d H_bb d^T for d = w - q over one block [b0, b0+n) of a row, in double. */
static double block_loss(const float *w, const float *q, size_t n, const double *h, size_t in, size_t b0)
{
    double total = 0;
    for (size_t a = 0; a < n; a++)
        for (size_t b = 0; b < n; b++)
            total += ((double)w[a] - q[a]) * h[(b0 + a) * in + b0 + b] * ((double)w[b] - q[b]);
    return total;
}

/* The smallest block loss over the clip candidates (shrink i/20, i < 10). */
static double best_clip_loss(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *w, size_t n, const double *h,
                             size_t in, size_t b0)
{
    float org = 0, cand[32], q[32];
    double best = INFINITY;
    for (size_t j = 0; j < n; j++)
        org = fmaxf(org, fabsf(w[j]));
    for (int i = 0; i < 10; i++) {
        float mv = (float)((double)org * (1.0 - i / 20.0));
        for (size_t j = 0; j < n; j++)
            cand[j] = fminf(fmaxf(w[j], -mv), mv);
        assert_int_equal(mxq_mx_quantize_rows(ctx, spec, cand, 1, n, NULL, NULL, q), MXQ_OK);
        best = fmin(best, block_loss(w, q, n, h, in, b0));
    }
    return best;
}

/* Clipping: every block's max shrinks by at most max_shrink; the per-block
 * loss never grows (no clip is a candidate); and the chosen clip's loss is
 * the smallest over the candidates, each evaluated plainly in double (to
 * float32 rounding: the search compares float32 losses). 150 rows: chunks
 * of 64, 64 and 22. */
static void test_awq_clip_properties(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tu_rng rng = {5};
    const size_t tokens = 300, in = 80, out = 150; /* 80 = two blocks of 32 and a partial one */
    float *x = make_x(&rng, tokens, in), *w = make_w(&rng, out, in);
    for (size_t i = 0; i < out * in; i += 37)
        w[i] *= 8.0f; /* outliers worth clipping */
    mxq_input_stats st = stats_of(ctx, x, tokens, in);
    mxq_mx_spec spec = {mxq_format_get(MXQ_MXINT3), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    float *c = malloc(out * in * sizeof(float)), *q0 = malloc(out * in * sizeof(float)),
          *q1 = malloc(out * in * sizeof(float));
    memcpy(c, w, out * in * sizeof(float));
    assert_int_equal(mxq_awq_clip(ctx, &spec, c, (int)out, (int)in, st.hessian, 20, 0.5), MXQ_OK);
    assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, w, out, in, NULL, NULL, q0), MXQ_OK);
    assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, c, out, in, NULL, NULL, q1), MXQ_OK);
    int clipped = 0;
    for (size_t r = 0; r < out; r++)
        for (size_t b0 = 0; b0 < in; b0 += 32) {
            size_t n = in - b0 < 32 ? in - b0 : 32;
            float m0 = 0, m1 = 0;
            for (size_t j = 0; j < n; j++) {
                m0 = fmaxf(m0, fabsf(w[r * in + b0 + j]));
                m1 = fmaxf(m1, fabsf(c[r * in + b0 + j]));
            }
            assert_true(m1 <= m0 && m1 >= 0.5f * m0 * (1 - 1e-6f));
            clipped += m1 < m0;
            /* block loss with the explicit inputs of this block only */
            double e0 = 0, e1 = 0;
            for (size_t t = 0; t < tokens; t++) {
                double y0 = 0, y1 = 0;
                for (size_t j = b0; j < b0 + n; j++) {
                    y0 += ((double)w[r * in + j] - q0[r * in + j]) * x[t * in + j];
                    y1 += ((double)w[r * in + j] - q1[r * in + j]) * x[t * in + j];
                }
                e0 += y0 * y0;
                e1 += y1 * y1;
            }
            assert_true(e1 <= e0 * (1 + 1e-5));
            double best = best_clip_loss(ctx, &spec, w + r * in + b0, n, st.hessian, in, b0);
            double chosen = block_loss(w + r * in + b0, q1 + r * in + b0, n, st.hessian, in, b0);
            if (chosen > best * (1 + 1e-5) + 1e-30)
                fail_msg("row %zu block at %zu: chosen clip loss %.9g, best candidate %.9g", r, b0, chosen, best);
        }
    print_message("# clip: %d of %zu blocks clipped, each the best candidate\n", clipped, out * 3);
    assert_true(clipped > 0);
    free(c);
    free(q0);
    free(q1);
    free(x);
    free(w);
    mxq_input_stats_free(&st);
    mxq_ctx_destroy(ctx);
}

/* Packing weights that are on the grid of given scales reproduces exactly
 * what round-to-nearest packs; an off-grid weight is refused. */
static void test_pack_with_scales(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tu_rng rng = {11};
    const size_t rows = 9, cols = 172;
    mxq_format_id ids[] = {MXQ_MXINT8, MXQ_MXINT4, MXQ_MXINT3, MXQ_MXINT2, MXQ_MXFP8_E4M3, MXQ_MXFP6_E2M3,
                           MXQ_MXFP4_E2M1};
    float *w = make_w(&rng, rows, cols), *deq = malloc(rows * cols * sizeof(float));
    for (size_t k = 0; k < sizeof(ids) / sizeof(ids[0]); k++) {
        mxq_mx_spec spec = {mxq_format_get(ids[k]), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
        size_t rb = mxq_mx_packed_row_bytes(spec.format, cols), nb = mxq_mx_blocks_per_row(cols, 32);
        uint8_t *p1 = malloc(rows * rb), *p2 = malloc(rows * rb), *sc = malloc(rows * nb);
        assert_int_equal(mxq_mx_quantize_rows(ctx, &spec, w, rows, cols, p1, sc, deq), MXQ_OK);
        assert_int_equal(mxq_mx_pack_with_scales(ctx, &spec, deq, rows, cols, sc, p2), MXQ_OK);
        assert_memory_equal(p1, p2, rows * rb);
        deq[5] = nextafterf(deq[5], 1.0f);
        assert_int_not_equal(mxq_mx_pack_with_scales(ctx, &spec, deq, rows, cols, sc, p2), MXQ_OK);
        mxq_error_clear(ctx);
        free(p1);
        free(p2);
        free(sc);
    }
    free(w);
    free(deq);
    mxq_ctx_destroy(ctx);
}

/* quantize-linear's SmoothQuant result is RTN(W diag s) diag(1/s) with s
 * from the formula; losses are the explicit output errors. */
static void test_single_linear_smoothquant(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tu_rng rng = {3};
    const size_t tokens = 256, in = 96, out = 20;
    float *x = make_x(&rng, tokens, in), *w = make_w(&rng, out, in);
    mxq_input_stats st = stats_of(ctx, x, tokens, in);
    mxq_recipe recipe;
    assert_int_equal(mxq_recipe_parse_string(ctx,
                                             "weights: {format: mxint4, block: 32}\n"
                                             "algorithms:\n  - smoothquant: {alpha: 0.6}\n",
                                             "test", &recipe),
                     MXQ_OK);
    float *q = malloc(out * in * sizeof(float)), *expect = malloc(out * in * sizeof(float));
    double loss_rtn, loss;
    assert_int_equal(mxq_quantize_single_linear(ctx, &recipe, -1, w, (int)out, (int)in, &st, q, &loss_rtn, &loss), MXQ_OK);
    double s[96];
    for (size_t j = 0; j < in; j++) {
        double wmax = 0, xmax = 0;
        for (size_t r = 0; r < out; r++)
            wmax = fmax(wmax, fabs(w[r * in + j]));
        for (size_t t = 0; t < tokens; t++)
            xmax = fmax(xmax, fabs(x[t * in + j]));
        s[j] = pow(fmax(xmax, 1e-5), 0.6) / pow(fmax(wmax, 1e-5), 0.4);
    }
    for (size_t r = 0; r < out; r++)
        for (size_t j = 0; j < in; j++)
            expect[r * in + j] = (float)((double)w[r * in + j] * s[j]);
    assert_int_equal(mxq_mx_quantize_rows(ctx, &recipe.weights, expect, out, in, NULL, NULL, expect), MXQ_OK);
    for (size_t r = 0; r < out; r++)
        for (size_t j = 0; j < in; j++)
            expect[r * in + j] = (float)((double)expect[r * in + j] / s[j]);
    assert_memory_equal(q, expect, out * in * sizeof(float));
    double e = output_error(w, q, out, in, x, tokens);
    assert_true(fabs(e - loss) <= 1e-5 * e); /* float32 GEMMs, double sums */
    assert_int_equal(mxq_mx_quantize_rows(ctx, &recipe.weights, w, out, in, NULL, NULL, expect), MXQ_OK);
    double e_rtn = output_error(w, expect, out, in, x, tokens);
    print_message("# SmoothQuant single linear: loss %.6g (explicit %.6g), RTN %.6g (explicit %.6g)\n", loss, e,
                  loss_rtn, e_rtn);
    assert_true(fabs(e_rtn - loss_rtn) <= 1e-5 * e_rtn);
    mxq_recipe_free(&recipe);
    free(q);
    free(expect);
    free(x);
    free(w);
    mxq_input_stats_free(&st);
    mxq_ctx_destroy(ctx);
}

/* ---- a whole decoder layer ---------------------------------------------------- */

/* A small layer (d 64, FFN 96, 4 heads without GQA) with random weights and
 * the statistics of random inputs; stats2 is an identical copy. */
typedef struct {
    mxq_model_config cfg;
    mxq_layer L;
    mxq_layer_stats stats, stats2;
} tiny_layer;

static void tiny_layer_make(mxq_ctx *ctx, tiny_layer *t, uint64_t seed)
{
    tu_rng rng = {seed};
    memset(t, 0, sizeof(*t));
    t->cfg = (mxq_model_config){.arch = MXQ_ARCH_LLAMA, .hidden = 64, .intermediate = 96, .n_layers = 4,
                                .n_heads = 4, .n_kv_heads = 4, .head_dim = 16, .vocab = 100};
    t->L.attn_norm = malloc(64 * sizeof(float));
    t->L.ffn_norm = malloc(64 * sizeof(float));
    for (int j = 0; j < 64; j++)
        t->L.attn_norm[j] = t->L.ffn_norm[j] = 1.0f;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(&t->cfg, (mxq_linear_id)li, &out, &in);
        t->L.weight[li] = make_w(&rng, (size_t)out, (size_t)in);
    }
    assert_int_equal(mxq_layer_stats_init(ctx, &t->cfg, &t->stats), MXQ_OK);
    assert_int_equal(mxq_layer_stats_init(ctx, &t->cfg, &t->stats2), MXQ_OK);
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        size_t f = (size_t)mxq_input_features(&t->cfg, (mxq_input_id)i);
        float *x = make_x(&rng, 300, f);
        assert_int_equal(mxq_input_stats_add(ctx, &t->stats.input[i], x, 300), MXQ_OK);
        assert_int_equal(mxq_input_stats_add(ctx, &t->stats2.input[i], x, 300), MXQ_OK);
        mxq_input_stats_finish(&t->stats.input[i]);
        mxq_input_stats_finish(&t->stats2.input[i]);
        free(x);
    }
}

static void tiny_layer_free(tiny_layer *t)
{
    free(t->L.attn_norm);
    free(t->L.ffn_norm);
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        free(t->L.weight[li]);
    mxq_layer_stats_free(&t->stats);
    mxq_layer_stats_free(&t->stats2);
}

/* A failure deep in GPTQ says where it happened: layer, linear, step. */
static void test_layer_error_names_layer_and_linear(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tiny_layer t;
    tiny_layer_make(ctx, &t, 11);
    /* not positive definite, and no damping to hide it */
    mxq_input_stats *down = &t.stats.input[MXQ_INPUT_DOWN];
    down->hessian[40 * 96 + 40] = -1.0;
    mxq_recipe recipe;
    assert_int_equal(mxq_recipe_parse_string(ctx, "weights: {format: mxint4, block: 32}\nalgorithms:\n"
                                                  "  - gptq: {damp: 0}\n",
                                             "test", &recipe),
                     MXQ_OK);
    mxq_layer_result res;
    memset(&res, 0, sizeof(res));
    assert_int_equal(mxq_quantize_layer(ctx, &recipe, &t.cfg, 3, &t.L, &t.stats, &res), MXQ_ERR_LAPACK);
    print_message("# %s\n", mxq_error_message(ctx));
    assert_non_null(strstr(mxq_error_message(ctx), "layer 3 mlp.down_proj: GPTQ: Cholesky factorization of the damped "
                                                   "Hessian failed (LAPACK info="));
    mxq_layer_result_free(&res);
    tiny_layer_free(&t);
    mxq_ctx_destroy(ctx);
}

/* quantize-linear runs the same per-linear code as a layer: for a linear
 * alone in its group (o_proj, down_proj), AWQ+GPTQ of it alone, given the
 * same statistics, gives the same losses as inside the layer. */
static void test_single_linear_is_the_layer_path(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    assert_int_equal(mxq_ctx_create(&ctx), MXQ_OK);
    tiny_layer t;
    tiny_layer_make(ctx, &t, 12);
    mxq_recipe recipe;
    assert_int_equal(mxq_recipe_parse_string(ctx, "weights: {format: mxint4, block: 32}\nalgorithms:\n"
                                                  "  - awq: {grid: 10}\n  - gptq: {block: 64, microblock: 32}\n",
                                             "test", &recipe),
                     MXQ_OK);
    const mxq_linear_id ids[2] = {MXQ_LIN_O, MXQ_LIN_DOWN};
    float *original[2];
    for (int k = 0; k < 2; k++) {
        int out, in;
        mxq_linear_shape(&t.cfg, ids[k], &out, &in);
        original[k] = malloc((size_t)out * in * sizeof(float));
        memcpy(original[k], t.L.weight[ids[k]], (size_t)out * in * sizeof(float));
    }
    mxq_layer_result res;
    memset(&res, 0, sizeof(res));
    assert_int_equal(mxq_quantize_layer(ctx, &recipe, &t.cfg, 0, &t.L, &t.stats, &res), MXQ_OK);
    for (int k = 0; k < 2; k++) {
        int out, in;
        mxq_linear_shape(&t.cfg, ids[k], &out, &in);
        float *q = malloc((size_t)out * in * sizeof(float));
        double loss_rtn, loss;
        assert_int_equal(mxq_quantize_single_linear(ctx, &recipe, ids[k], original[k], out, in,
                                                    &t.stats2.input[mxq_linear_input(ids[k])], q, &loss_rtn, &loss),
                         MXQ_OK);
        const mxq_linear_result *lr = &res.linear[ids[k]];
        print_message("# %s: alone loss %.9g rtn %.9g, in the layer %.9g rtn %.9g\n", mxq_linear_name(ids[k]), loss,
                      loss_rtn, lr->loss, lr->loss_rtn);
        assert_true(loss_rtn == lr->loss_rtn);
        /* the same quantized weight; alone it is divided back by the AWQ
         * scales and rounded to float32 (~1e-7 per element) before the loss */
        assert_true(fabs(loss - lr->loss) <= 1e-6 * lr->loss);
        assert_true(loss < loss_rtn);
        free(q);
        free(original[k]);
    }
    mxq_layer_result_free(&res);
    mxq_recipe_free(&recipe);
    tiny_layer_free(&t);
    mxq_ctx_destroy(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stats_match_explicit_sums),
        cmocka_unit_test(test_smoothquant_formula),
        cmocka_unit_test(test_awq_search_matches_brute_force),
        cmocka_unit_test(test_awq_search_on_bundled_model),
        cmocka_unit_test(test_awq_sampled_search_tolerance),
        cmocka_unit_test(test_report_loss_rows),
        cmocka_unit_test(test_awq_clip_properties),
        cmocka_unit_test(test_pack_with_scales),
        cmocka_unit_test(test_single_linear_smoothquant),
        cmocka_unit_test(test_layer_error_names_layer_and_linear),
        cmocka_unit_test(test_single_linear_is_the_layer_path),
    };
    return cmocka_run_group_tests_name("quant_algos", tests, NULL, NULL);
}
