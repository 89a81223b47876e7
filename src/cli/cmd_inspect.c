/* mxq inspect: what a checkpoint is, for a person. */
#include <getopt.h>
#include <stdio.h>

#include "cli.h"
#include "mxq/jobs.h"

static void print_inspect_help(FILE *out)
{
    fprintf(out,
            "Usage: mxq inspect DIR\n"
            "\n"
            "Describe the checkpoint in DIR (one process, headers only, no tensor data read):\n"
            "  model        architecture and sizes, and the model it was quantized from;\n"
            "  recipe       weight and activation formats, algorithms with their settings,\n"
            "               calibration set (from config.json's quantization_config);\n"
            "  storage      size on disk against the FP model it came from and against FP16,\n"
            "               bits per weight of the quantized linears, the other tensors;\n"
            "  run          mxq version, ranks, group size, times, peak memory (mxq_report.json);\n"
            "  layers       each layer's loss before (round to nearest) and after the algorithms,\n"
            "               its rank, time and memory, and its worst linear.\n"
            "A plain Hugging Face checkpoint gets the model and storage lines. To check that a\n"
            "checkpoint is whole and valid, use mxq verify.\n"
            "\n"
            "Options:\n"
            "  -h, --help             this text\n");
}

int mxq_cmd_inspect(mxq_ctx *ctx, int argc, char **argv)
{
    static const struct option options[] = {{"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":h", options, NULL)) != -1) {
        switch (c) {
        case 'h': print_inspect_help(stdout); return MXQ_EXIT_OK;
        default:
            return mxq_cli_usage_error(ctx, "inspect", "unknown option '%s' (see mxq inspect --help)",
                                       argv[optind - 1]);
        }
    }
    if (optind + 1 != argc)
        return mxq_cli_usage_error(ctx, "inspect", optind == argc ? "DIR is required" : "unexpected argument '%s'",
                                   optind < argc ? argv[optind + 1] : "");
    if (mxq_inspect(ctx, argv[optind]) != MXQ_OK)
        return mxq_cli_job_failed(ctx, "inspect");
    return MXQ_EXIT_OK;
}
