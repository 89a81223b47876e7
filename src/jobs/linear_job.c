/* mxq quantize-linear: one weight through a recipe's weight algorithms, by
 * the same per-linear code as a decoder layer (src/algo/layer_quant.c). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/h5io.h"
#include "jobs/jobs_internal.h"

/* The first non-finite value of a dataset is an error naming it. */
static mxq_status check_finite(mxq_ctx *ctx, const char *path, const char *dataset, const void *data, int is_double,
                               size_t rows, size_t cols)
{
    mxq_status status = MXQ_OK;
    for (size_t i = 0; i < rows * cols; i++) {
        double v = is_double ? ((const double *)data)[i] : (double)((const float *)data)[i];
        CHECK(ctx, isfinite(v), MXQ_ERR_FORMAT, "'%s': %s has a non-finite value (%g) at [%zu, %zu]", path, dataset, v,
              i / cols, i % cols);
    }
fail:
    return status;
}

/* GPTQ factors one triangle of H: an H that is not symmetric would be half
 * ignored. Entries may differ by rounding (X^T X by GEMM need not be exact). */
static mxq_status check_symmetric(mxq_ctx *ctx, const char *path, const double *h, size_t n)
{
    mxq_status status = MXQ_OK;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < i; j++) {
            const double a = h[i * n + j], b = h[j * n + i], scale = sqrt(fabs(h[i * n + i]) * fabs(h[j * n + j]));
            CHECK(ctx, fabs(a - b) <= 1e-6 * scale + 1e-300, MXQ_ERR_FORMAT,
                  "'%s': /H is not symmetric: [%zu, %zu] = %g but [%zu, %zu] = %g (a Hessian X^T X is)", path, i, j, a,
                  j, i, b);
        }
fail:
    return status;
}

typedef struct {
    float *w, *x, *q;
    double *h;
    size_t out_f, in_f;
    mxq_input_stats stats;
} linear_data;

/* /W, and /X (statistics computed here) or /H. */
static mxq_status read_linear(mxq_ctx *ctx, hid_t in, const char *path, linear_data *d)
{
    mxq_status status = MXQ_OK;
    size_t rows = 0, cols = 0;
    const size_t max_w[2] = {MXQ_MAX_WIDTH, MXQ_MAX_WIDTH};
    CALL(ctx, mxq_h5_read_f32_2d(ctx, in, path, "/W", max_w, &d->w, &d->out_f, &d->in_f));
    CALL(ctx, check_finite(ctx, path, "/W", d->w, 0, d->out_f, d->in_f));
    htri_t has_x = H5Lexists(in, "/X", H5P_DEFAULT), has_h = H5Lexists(in, "/H", H5P_DEFAULT);
    H5Eclear2(H5E_DEFAULT);
    CHECK(ctx, has_x > 0 || has_h > 0, MXQ_ERR_FORMAT, "'%s' has neither /X (calibration inputs) nor /H (Hessian)",
          path);
    CHECK(ctx, !(has_x > 0 && has_h > 0), MXQ_ERR_FORMAT,
          "'%s' has both /X and /H; give one (with /X the Hessian is computed from it)", path);
    if (has_x > 0) {
        const size_t max_x[2] = {(size_t)1 << 31, d->in_f};
        CALL(ctx, mxq_h5_read_f32_2d(ctx, in, path, "/X", max_x, &d->x, &rows, &cols));
        CHECK(ctx, cols == d->in_f, MXQ_ERR_FORMAT, "'%s': /X has %zu columns but /W has %zu inputs", path, cols,
              d->in_f);
        CALL(ctx, check_finite(ctx, path, "/X", d->x, 0, rows, cols));
        CALL(ctx, mxq_input_stats_init(ctx, (int)d->in_f, &d->stats));
        CALL(ctx, mxq_input_stats_add(ctx, &d->stats, d->x, rows));
        mxq_input_stats_finish(&d->stats);
        return MXQ_OK;
    }
    const size_t max_h[2] = {d->in_f, d->in_f};
    CALL(ctx, mxq_h5_read_f64_2d(ctx, in, path, "/H", max_h, &d->h, &rows, &cols));
    CHECK(ctx, rows == d->in_f && cols == d->in_f, MXQ_ERR_FORMAT, "'%s': /H is [%zu, %zu], expected [%zu, %zu] from /W",
          path, rows, cols, d->in_f, d->in_f);
    CALL(ctx, check_finite(ctx, path, "/H", d->h, 1, rows, cols));
    CALL(ctx, check_symmetric(ctx, path, d->h, rows));
    d->stats.features = (int)d->in_f;
    d->stats.hessian = d->h;
    d->stats.n_tokens = 0;
fail:
    return status;
}

static mxq_status write_result(mxq_ctx *ctx, const mxq_recipe *recipe, const linear_data *d, double loss_rtn,
                               double loss, const char *algos, mxq_h5_output *out)
{
    mxq_status status = MXQ_OK;
    hsize_t dims[2] = {d->out_f, d->in_f};
    CALL(ctx, mxq_h5_write(ctx, out->file, "/Q", H5T_NATIVE_FLOAT, 2, dims, d->q));
    CALL(ctx, mxq_h5_attr_double(ctx, out->file, "loss_rtn", loss_rtn));
    CALL(ctx, mxq_h5_attr_double(ctx, out->file, "loss", loss));
    CALL(ctx, mxq_h5_attr_string(ctx, out->file, "format", recipe->weights.format->name));
    CALL(ctx, mxq_h5_attr_int(ctx, out->file, "block", recipe->weights.block));
    CALL(ctx, mxq_h5_attr_string(ctx, out->file, "rounding", mxq_rounding_name(recipe->weights.rounding)));
    CALL(ctx, mxq_h5_attr_string(ctx, out->file, "algorithms", algos));
fail:
    return status;
}

mxq_status mxq_quantize_linear_file(mxq_ctx *ctx, const char *recipe_path, int role, const char *in_path,
                                    const char *out_path)
{
    mxq_status status = MXQ_OK;
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    mxq_recipe recipe;
    int have_recipe = 0;
    hid_t in = H5I_INVALID_HID;
    linear_data d = {0};
    mxq_h5_output out = {H5I_INVALID_HID, {.fd = -1}};
    mxq_input_set inputs = {0};
    char algos[128] = "rtn";

    CALL(ctx, mxq_input_set_add(ctx, &inputs, in_path, "the input file"));
    CALL(ctx, mxq_input_set_add(ctx, &inputs, recipe_path, "the recipe"));
    CALL(ctx, mxq_recipe_load(ctx, recipe_path, &recipe));
    have_recipe = 1;
    CALL(ctx, mxq_h5_output_begin(ctx, out_path, &inputs, &out));
    CALL(ctx, mxq_h5_open_read(ctx, in_path, "input file", &in));
    CALL(ctx, read_linear(ctx, in, in_path, &d));
    d.q = malloc(d.out_f * d.in_f * sizeof(float));
    CHECK_ALLOC(ctx, d.q, d.out_f * d.in_f * sizeof(float), "the result");
    double loss_rtn = 0, loss = 0, t0 = mxq_time_now();
    CALL(ctx, mxq_quantize_single_linear(ctx, &recipe, role, d.w, (int)d.out_f, (int)d.in_f, &d.stats, d.q, &loss_rtn,
                                         &loss));
    double seconds = mxq_time_now() - t0;
    for (int i = 0, used = 0; i < recipe.n_steps; i++)
        used += snprintf(algos + used, sizeof(algos) - (size_t)used, "%s%s", i ? "," : "",
                         mxq_algo_name(recipe.steps[i].kind));
    CALL_IN(ctx, write_result(ctx, &recipe, &d, loss_rtn, loss, algos, &out), "cannot write '%s'", out_path);
    CALL(ctx, mxq_h5_output_commit(ctx, &out));
    mxq_log(ctx, MXQ_LOG_INFO, "quantize-linear [%zu x %zu] %s block %d (%s): loss_rtn %.6e  loss %.6e (%+.1f%%)  %.3f s",
            d.out_f, d.in_f, recipe.weights.format->name, recipe.weights.block, algos, loss_rtn, loss,
            loss_rtn > 0 ? 100.0 * (loss - loss_rtn) / loss_rtn : 0.0, seconds);
fail:
    if (in >= 0)
        H5Fclose(in);
    mxq_h5_output_abort(&out);
    mxq_input_set_free(&inputs);
    if (d.x)
        mxq_input_stats_free(&d.stats);
    free(d.h);
    free(d.w);
    free(d.x);
    free(d.q);
    if (have_recipe)
        mxq_recipe_free(&recipe);
    mxq_h5_quiet_end(&quiet);
    return status;
}
