/* mxq quantize-linear: one weight through a recipe's weight algorithms. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "mxq/jobs.h"

static void print_help(FILE *out)
{
    fprintf(out,
            "Usage: mxq quantize-linear --recipe R.yaml [--linear NAME] IN.h5 OUT.h5\n"
            "\n"
            "Research verb: one linear layer through the recipe's weight algorithms, for\n"
            "studying a layer and testing against independent implementations.\n"
            "\n"
            "IN.h5:  /W  float32 [out, in]     the weight\n"
            "        /X  float32 [tokens, in]  its calibration inputs, or (not both)\n"
            "        /H  float64 [in, in]      the Hessian X^T X, symmetric (SmoothQuant and AWQ need /X:\n"
            "                                  they use max|x| and mean|x| per channel)\n"
            "OUT.h5: /Q  float32 [out, in]     the dequantized result, in the input's space: with\n"
            "                                  SmoothQuant/AWQ scales s it is Q(W diag s) diag(1/s)\n"
            "        attributes loss_rtn, loss  tr(dW H dW^T), H = X^T X, of round-to-nearest and\n"
            "                                  of the recipe (exact, unlike mxq quantize's report);\n"
            "                                  format, block, rounding, algorithms\n"
            "\n"
            "The recipe's activations, calibration and exclude sections are ignored. The\n"
            "algorithms run through the same per-linear code as in mxq quantize; --linear says\n"
            "which linear of a decoder layer this is, for the rules that depend on it\n"
            "(SmoothQuant only where a norm feeds the input; no AWQ clipping of q_proj/k_proj).\n"
            "Non-finite values in /W, /X or /H are refused. OUT.h5 may not be IN.h5 or the\n"
            "recipe; an existing OUT.h5 is replaced only if mxq wrote it (its mxq_version\n"
            "attribute).\n"
            "\n"
            "Options:\n"
            "  -r, --recipe R.yaml   the recipe\n"
            "  -l, --linear NAME     q_proj k_proj v_proj o_proj gate_proj up_proj down_proj,\n"
            "                        or any (default: every step applies)\n"
            "  -v, --verbose / -q, --quiet / -h, --help\n");
}

/* "q_proj" / "self_attn.q_proj" -> MXQ_LIN_Q; "any" -> -1; -2 if unknown. */
static int role_by_name(const char *name)
{
    if (strcmp(name, "any") == 0)
        return -1;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        const char *full = mxq_linear_name((mxq_linear_id)li), *dot = strchr(full, '.');
        if (strcmp(name, full) == 0 || (dot && strcmp(name, dot + 1) == 0))
            return li;
    }
    return -2;
}

int mxq_cmd_quantize_linear(mxq_ctx *ctx, int argc, char **argv)
{
    static const struct option options[] = {
        {"recipe", required_argument, NULL, 'r'}, {"linear", required_argument, NULL, 'l'},
        {"verbose", no_argument, NULL, 'v'},
        {"quiet", no_argument, NULL, 'q'},        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *recipe = NULL;
    int c, role = -1;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":r:l:vqh", options, NULL)) != -1) {
        switch (c) {
        case 'r': recipe = optarg; break;
        case 'l':
            role = role_by_name(optarg);
            if (role == -2)
                return mxq_cli_usage_error(ctx, "quantize-linear",
                                           "unknown linear '%s' (valid: q_proj k_proj v_proj o_proj gate_proj up_proj "
                                           "down_proj any)",
                                           optarg);
            break;
        case 'v': mxq_ctx_set_log_level(ctx, MXQ_LOG_DEBUG); break;
        case 'q': mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR); break;
        case 'h': print_help(stdout); return MXQ_EXIT_OK;
        case ':': return mxq_cli_usage_error(ctx, "quantize-linear", "option '%s' needs a value", argv[optind - 1]);
        default:
            return mxq_cli_usage_error(ctx, "quantize-linear", "unknown option '%s' (see mxq quantize-linear --help)",
                                       argv[optind - 1]);
        }
    }
    if (!recipe)
        return mxq_cli_usage_error(ctx, "quantize-linear", "--recipe R.yaml is required");
    if (argc - optind != 2)
        return mxq_cli_usage_error(ctx, "quantize-linear", "expected IN.h5 OUT.h5 (got %d file argument%s)", argc - optind,
                                   argc - optind == 1 ? "" : "s");
    if (mxq_quantize_linear_file(ctx, recipe, role, argv[optind], argv[optind + 1]) != MXQ_OK)
        return mxq_cli_job_failed(ctx, "quantize-linear");
    return MXQ_EXIT_OK;
}
