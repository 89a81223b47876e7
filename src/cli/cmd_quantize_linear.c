/* mxq quantize-linear: one weight through a recipe's weight algorithms. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "cli.h"
#include "mxq/h5io.h"
#include "mxq/quantize.h"

static void print_help(FILE *out)
{
    fprintf(out,
            "Usage: mxq quantize-linear --recipe R.yaml IN.h5 OUT.h5\n"
            "\n"
            "Research verb: one linear layer through the recipe's weight algorithms, for\n"
            "studying a layer and testing against independent implementations.\n"
            "\n"
            "IN.h5:  /W  float32 [out, in]     the weight\n"
            "        /X  float32 [tokens, in]  its calibration inputs, or\n"
            "        /H  float64 [in, in]      the Hessian X^T X (SmoothQuant and AWQ need /X:\n"
            "                                  they use max|x| and mean|x| per channel)\n"
            "OUT.h5: /Q  float32 [out, in]     the dequantized result, in the input's space: with\n"
            "                                  SmoothQuant/AWQ scales s it is Q(W diag s) diag(1/s)\n"
            "        attributes loss_rtn, loss  tr(dW H dW^T), H = X^T X, of round-to-nearest and\n"
            "                                  of the recipe; format, block, rounding, algorithms\n"
            "\n"
            "The recipe's activations, calibration and exclude sections are ignored.\n"
            "\n"
            "Options:\n"
            "  -r, --recipe R.yaml   the recipe\n"
            "  -v, --verbose / -q, --quiet / -h, --help\n");
}

static mxq_status run(mxq_ctx *ctx, const char *recipe_path, const char *in_path, const char *out_path)
{
    mxq_status status = MXQ_OK;
    mxq_recipe recipe;
    int have_recipe = 0;
    hid_t in = H5I_INVALID_HID;
    float *w = NULL, *x = NULL, *q = NULL;
    double *h = NULL;
    size_t out_f = 0, in_f = 0, rows = 0, cols = 0;
    mxq_input_stats stats = {0};
    mxq_h5_output out = {.file = H5I_INVALID_HID};

    CALL(ctx, mxq_recipe_load(ctx, recipe_path, &recipe));
    have_recipe = 1;
    CALL(ctx, mxq_h5_open_read(ctx, in_path, &in));
    CALL(ctx, mxq_h5_read_f32_2d(ctx, in, in_path, "/W", &w, &out_f, &in_f));
    htri_t has_x = H5Lexists(in, "/X", H5P_DEFAULT);
    H5Eclear2(H5E_DEFAULT);
    if (has_x > 0) {
        CALL(ctx, mxq_h5_read_f32_2d(ctx, in, in_path, "/X", &x, &rows, &cols));
        CHECK(ctx, cols == in_f, MXQ_ERR_FORMAT, "'%s': /X has %zu columns but /W has %zu inputs", in_path, cols, in_f);
        CALL(ctx, mxq_input_stats_init(ctx, (int)in_f, &stats));
        CALL(ctx, mxq_input_stats_add(ctx, &stats, x, rows));
        mxq_input_stats_finish(&stats);
    } else {
        htri_t has_h = H5Lexists(in, "/H", H5P_DEFAULT);
        H5Eclear2(H5E_DEFAULT);
        CHECK(ctx, has_h > 0, MXQ_ERR_FORMAT, "'%s' has neither /X (calibration inputs) nor /H (Hessian)", in_path);
        CALL(ctx, mxq_h5_read_f64_2d(ctx, in, in_path, "/H", &h, &rows, &cols));
        CHECK(ctx, rows == in_f && cols == in_f, MXQ_ERR_FORMAT, "'%s': /H is [%zu, %zu], expected [%zu, %zu] from /W",
              in_path, rows, cols, in_f, in_f);
        stats.features = (int)in_f;
        stats.hessian = h;
        stats.n_tokens = 0;
    }
    H5Fclose(in);
    in = H5I_INVALID_HID;
    CALL(ctx, mxq_h5_output_begin(ctx, out_path, &out));
    q = malloc(out_f * in_f * sizeof(float));
    CHECK_ALLOC(ctx, q, out_f * in_f * sizeof(float), "the result");
    double loss_rtn = 0, loss = 0, t0 = mxq_time_now();
    CALL(ctx, mxq_quantize_single_linear(ctx, &recipe, w, (int)out_f, (int)in_f, &stats, q, &loss_rtn, &loss));
    double seconds = mxq_time_now() - t0;
    hsize_t dims[2] = {out_f, in_f};
    CALL(ctx, mxq_h5_write(ctx, out.file, "/Q", H5T_NATIVE_FLOAT, 2, dims, q));
    CALL(ctx, mxq_h5_attr_double(ctx, out.file, "loss_rtn", loss_rtn));
    CALL(ctx, mxq_h5_attr_double(ctx, out.file, "loss", loss));
    CALL(ctx, mxq_h5_attr_string(ctx, out.file, "format", recipe.weights.format->name));
    CALL(ctx, mxq_h5_attr_int(ctx, out.file, "block", recipe.weights.block));
    CALL(ctx, mxq_h5_attr_string(ctx, out.file, "rounding", mxq_rounding_name(recipe.weights.rounding)));
    char algos[128] = "rtn";
    size_t used = 0;
    for (int i = 0; i < recipe.n_steps; i++)
        used += (size_t)snprintf(algos + used, sizeof(algos) - used, "%s%s", i ? "," : "",
                                 mxq_algo_name(recipe.steps[i].kind));
    CALL(ctx, mxq_h5_attr_string(ctx, out.file, "algorithms", algos));
    CALL(ctx, mxq_h5_output_commit(ctx, &out));
    mxq_log(ctx, MXQ_LOG_INFO, "quantize-linear [%zu x %zu] %s block %d (%s): loss_rtn %.6e  loss %.6e (%+.1f%%)  %.3f s",
            out_f, in_f, recipe.weights.format->name, recipe.weights.block, algos, loss_rtn, loss,
            loss_rtn > 0 ? 100.0 * (loss - loss_rtn) / loss_rtn : 0.0, seconds);
fail:
    if (in >= 0)
        H5Fclose(in);
    mxq_h5_output_abort(&out);
    if (x)
        mxq_input_stats_free(&stats);
    free(h);
    free(w);
    free(x);
    free(q);
    if (have_recipe)
        mxq_recipe_free(&recipe);
    return status;
}

int mxq_cmd_quantize_linear(mxq_ctx *ctx, int argc, char **argv)
{
    static const struct option options[] = {
        {"recipe", required_argument, NULL, 'r'}, {"verbose", no_argument, NULL, 'v'},
        {"quiet", no_argument, NULL, 'q'},        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *recipe = NULL;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":r:vqh", options, NULL)) != -1) {
        switch (c) {
        case 'r': recipe = optarg; break;
        case 'v': mxq_ctx_set_log_level(ctx, MXQ_LOG_DEBUG); break;
        case 'q': mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR); break;
        case 'h': print_help(stdout); return MXQ_EXIT_OK;
        case ':': return mxq_cli_usage_error("quantize-linear", "option '%s' needs a value", argv[optind - 1]);
        default:
            return mxq_cli_usage_error("quantize-linear", "unknown option '%s' (see mxq quantize-linear --help)",
                                       argv[optind - 1]);
        }
    }
    if (!recipe)
        return mxq_cli_usage_error("quantize-linear", "--recipe R.yaml is required");
    if (argc - optind != 2)
        return mxq_cli_usage_error("quantize-linear", "expected IN.h5 OUT.h5 (got %d file argument%s)", argc - optind,
                                   argc - optind == 1 ? "" : "s");
    if (run(ctx, recipe, argv[optind], argv[optind + 1]) != MXQ_OK) {
        mxq_error_print(ctx, stderr, "mxq quantize-linear");
        return MXQ_EXIT_FAILURE;
    }
    return MXQ_EXIT_OK;
}
