/* mxq cast: MX-quantize one 2-D float32 HDF5 dataset. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "mxq/jobs.h"
#include "mxq/mx.h"

static void print_cast_help(FILE *out)
{
    fprintf(out,
            "Usage: mxq cast --format FMT --block B [--rounding even|nearest] IN.h5[:/dataset] OUT.h5\n"
            "\n"
            "Quantize a 2-D float32 HDF5 dataset (default /input) to an MX format along its last\n"
            "axis: each row is cut into blocks of B values (the last block may be shorter), and\n"
            "each block shares one power-of-two scale.\n"
            "\n"
            "Options:\n"
            "  -f, --format FMT      element format, one of:\n"
            "                          %s\n"
            "  -b, --block B         elements per shared scale, 1..%d (OCP MX uses 32)\n"
            "  -r, --rounding MODE   even (ties to even, default) or nearest (ties away from zero)\n"
            "      --kernel K        auto (default), reference (scalar specification) or avx512\n"
            "  -v, --verbose         debug log; error traces\n"
            "  -q, --quiet           log errors only\n"
            "  -h, --help            this text\n"
            "\n"
            "OUT.h5 receives (written under a temporary name, renamed when complete; OUT.h5 must\n"
            "not be the input, and an existing OUT.h5 is replaced only if mxq wrote it, which its\n"
            "mxq_version attribute says):\n"
            "  /output      float32 [rows, cols]            the dequantized values\n"
            "  /scale_e8m0  uint8   [rows, ceil(cols/B)]     shared exponent + 127 (255 = NaN block)\n"
            "  /packed      uint8   [rows, bytes_per_row]    element codes, packed per row:\n"
            "               8-bit one per byte; FP6 four per three bytes (v0|v1<<6|v2<<12|v3<<18);\n"
            "               4-bit and MXINT3 two per byte, low nibble first; 2-bit four per byte,\n"
            "               lowest bits first. Integers are two's complement k (value k/2^frac),\n"
            "               floats are OCP sign|exponent|mantissa.\n"
            "  attributes format, block, rounding on the file root.\n"
            "\n"
            "Special values: a block holding NaN or Inf becomes all NaN (scale 255); finite values\n"
            "never overflow (they saturate to the format's max); an all-zero block gets the\n"
            "exponent of FLT_MIN.\n"
            "\n"
            "Example:\n"
            "  mxq cast --format mxint4 --block 32 weights.h5:/layer0/W out.h5\n",
            mxq_format_names(), MXQ_MX_BLOCK_MAX);
}

/* "file.h5:/a/b" -> file "file.h5", dataset "/a/b"; a ':' not followed by
 * '/' is part of the file name. */
static void split_input(char *arg, const char **file, const char **dataset)
{
    char *colon = strrchr(arg, ':');
    if (colon && colon[1] == '/') {
        *colon = '\0';
        *file = arg;
        *dataset = colon + 1;
    } else {
        *file = arg;
        *dataset = "/input";
    }
}

int mxq_cmd_cast(mxq_ctx *ctx, int argc, char **argv)
{
    static const struct option options[] = {
        {"format", required_argument, NULL, 'f'}, {"block", required_argument, NULL, 'b'},
        {"rounding", required_argument, NULL, 'r'}, {"kernel", required_argument, NULL, 'k'},
        {"verbose", no_argument, NULL, 'v'},       {"quiet", no_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    mxq_mx_spec spec = {.format = NULL, .block = 0, .rounding = MXQ_ROUND_EVEN, .kernel = MXQ_KERNEL_AUTO};
    const char *block_text = NULL;
    int opt;
    optind = 1;
    opterr = 0;
    while ((opt = getopt_long(argc, argv, ":f:b:r:k:vqh", options, NULL)) != -1) {
        switch (opt) {
        case 'f':
            spec.format = mxq_format_by_name(optarg);
            if (!spec.format)
                return mxq_cli_usage_error(ctx, "cast", "unknown format '%s' (valid: %s)", optarg, mxq_format_names());
            break;
        case 'b': block_text = optarg; break;
        case 'r':
            if (mxq_rounding_by_name(optarg, &spec.rounding) != 0)
                return mxq_cli_usage_error(ctx, "cast", "unknown rounding '%s' (valid: even nearest)", optarg);
            break;
        case 'k':
            if (strcmp(optarg, "auto") == 0)
                spec.kernel = MXQ_KERNEL_AUTO;
            else if (strcmp(optarg, "reference") == 0)
                spec.kernel = MXQ_KERNEL_REFERENCE;
            else if (strcmp(optarg, "avx512") == 0)
                spec.kernel = MXQ_KERNEL_AVX512;
            else
                return mxq_cli_usage_error(ctx, "cast", "unknown kernel '%s' (valid: auto reference avx512)", optarg);
            break;
        case 'v': mxq_ctx_set_log_level(ctx, MXQ_LOG_DEBUG); break;
        case 'q': mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR); break;
        case 'h': print_cast_help(stdout); return MXQ_EXIT_OK;
        case ':': return mxq_cli_usage_error(ctx, "cast", "option '%s' needs a value", argv[optind - 1]);
        default: return mxq_cli_usage_error(ctx, "cast", "unknown option '%s' (see mxq cast --help)", argv[optind - 1]);
        }
    }
    if (!spec.format)
        return mxq_cli_usage_error(ctx, "cast", "--format is required (valid: %s)", mxq_format_names());
    if (!block_text)
        return mxq_cli_usage_error(ctx, "cast", "--block is required (1..%d)", MXQ_MX_BLOCK_MAX);
    long block;
    if (mxq_cli_parse_int(block_text, 1, MXQ_MX_BLOCK_MAX, &block) != 0)
        return mxq_cli_usage_error(ctx, "cast", "block size must be an integer in 1..%d, got '%s'", MXQ_MX_BLOCK_MAX,
                                   block_text);
    spec.block = (int)block;
    if (!mxq_kernel_available(spec.kernel))
        return mxq_cli_usage_error(ctx, "cast", "kernel '%s' is not supported by this CPU", mxq_kernel_name(spec.kernel));
    if (argc - optind != 2)
        return mxq_cli_usage_error(ctx, "cast", "expected IN.h5[:/dataset] OUT.h5, got %d positional argument%s",
                                   argc - optind, argc - optind == 1 ? "" : "s");

    const char *in_file, *in_dataset;
    split_input(argv[optind], &in_file, &in_dataset);
    const char *out_path = argv[optind + 1];

    if (mxq_cast_file(ctx, &spec, in_file, in_dataset, out_path) != MXQ_OK)
        return mxq_cli_job_failed(ctx, "cast");
    return MXQ_EXIT_OK;
}
