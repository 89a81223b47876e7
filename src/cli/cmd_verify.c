/* mxq verify: a checkpoint checked before it is used or shipped. */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>

#include "cli.h"
#include "mxq/jobs.h"

static void print_verify_help(FILE *out)
{
    fprintf(out,
            "Usage: mxq verify DIR\n"
            "\n"
            "Check that the checkpoint in DIR is whole and valid, without evaluating it:\n"
            "  1. every shard model.safetensors.index.json names exists and, for a checkpoint mxq\n"
            "     wrote, has the size and SHA-256 the index records (metadata.mxq_shards): a\n"
            "     flipped byte, a truncated shard, a missing one, bytes appended after one;\n"
            "  2. config.json is readable: quantization_config's format_version and formats are\n"
            "     ones this mxq knows, and every tensor the config implies exists with its shape;\n"
            "  3. every tensor loads as `mxq eval` loads it, one layer at a time: packed MX\n"
            "     elements hold valid codes (no MXINT4 -8, no FP8 NaN/Inf code, unused bits\n"
            "     zero), scale bytes are ones mxq writes (not 0 or 255), values are finite.\n"
            "Exits 0 with a summary, or 1 with one line naming the first problem. Also checks\n"
            "plain Hugging Face checkpoints (no checksums there: steps 2 and 3).\n"
            "\n"
            "Options:\n"
            "  -q, --quiet            print errors only\n"
            "  -h, --help             this text\n");
}

int mxq_cmd_verify(mxq_ctx *ctx, int argc, char **argv)
{
    static const struct option options[] = {
        {"quiet", no_argument, NULL, 'q'}, {"help", no_argument, NULL, 'h'}, {NULL, 0, NULL, 0}};
    int c, quiet = 0;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":qh", options, NULL)) != -1) {
        switch (c) {
        case 'q': quiet = 1; break;
        case 'h': print_verify_help(stdout); return MXQ_EXIT_OK;
        default:
            return mxq_cli_usage_error(ctx, "verify", "unknown option '%s' (see mxq verify --help)", argv[optind - 1]);
        }
    }
    if (optind + 1 != argc)
        return mxq_cli_usage_error(ctx, "verify", optind == argc ? "DIR is required" : "unexpected argument '%s'",
                                   optind < argc ? argv[optind + 1] : "");
    mxq_verify_result res;
    if (mxq_verify(ctx, argv[optind], &res) != MXQ_OK)
        return mxq_cli_job_failed(ctx, "verify");
    if (!quiet)
        printf("%s: OK: %d shard%s (%.1f MB), %s; %d layers%s loaded, every tensor's shape, codes and values valid\n",
               argv[optind], res.shards, res.shards == 1 ? "" : "s", (double)res.bytes / 1e6,
               res.checksummed == res.shards ? "sizes and SHA-256 as the index records"
               : res.checksummed     ? "some without a recorded checksum"
                                     : "no checksums recorded (not written by mxq)",
               res.layers, res.mx ? " of MX elements" : "");
    return MXQ_EXIT_OK;
}
