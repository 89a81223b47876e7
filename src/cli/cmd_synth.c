/* mxq synth: write a random-weight model with real shapes. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "mxq/synth.h"

static void print_synth_help(FILE *out)
{
    fprintf(out,
            "Usage: mxq synth --preset NAME --out DIR [--layers N] [--dtype bf16|f32]\n"
            "                 [--shard-size BYTES] [--seed S] [--force]\n"
            "\n"
            "Write a model with random weights (approximately normal, std 0.02; norms 1) and the\n"
            "exact shapes of a real one, in Hugging Face layout: config.json, model.safetensors or\n"
            "model-0000k-of-0000N.safetensors + model.safetensors.index.json. For benchmarks and\n"
            "big-shape tests; config.json is written last, so an interrupted run is never loadable.\n"
            "\n"
            "Options:\n"
            "  -p, --preset NAME      %s\n"
            "  -o, --out DIR          output directory (created if missing)\n"
            "  -l, --layers N         keep only the first N decoder layers (default: all)\n"
            "  -d, --dtype T          bf16 (default) or f32\n"
            "  -s, --shard-size B     start a new shard when one would exceed B bytes (suffixes\n"
            "                         K, M, G are powers of 1000; default: a single file)\n"
            "      --seed S           random seed (default 1); a tensor's values depend only on\n"
            "                         the seed and its name\n"
            "  -f, --force            overwrite a model already in DIR\n"
            "  -q, --quiet            log errors only\n"
            "  -h, --help             this text\n"
            "\n"
            "Example: mxq synth --preset llama-2-7b --layers 1 --out /tmp/l2-7b-1layer\n",
            mxq_synth_preset_names());
}

int mxq_cmd_synth(mxq_ctx *ctx, int argc, char **argv)
{
    enum { OPT_SEED = 1000 };
    static const struct option options[] = {
        {"preset", required_argument, NULL, 'p'}, {"out", required_argument, NULL, 'o'},
        {"layers", required_argument, NULL, 'l'}, {"dtype", required_argument, NULL, 'd'},
        {"shard-size", required_argument, NULL, 's'}, {"seed", required_argument, NULL, OPT_SEED},
        {"force", no_argument, NULL, 'f'},        {"quiet", no_argument, NULL, 'q'},
        {"verbose", no_argument, NULL, 'v'},      {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    mxq_synth_options opt = {.dtype = MXQ_DT_BF16, .seed = 1};
    const char *out = NULL;
    long value;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":p:o:l:d:s:fqvh", options, NULL)) != -1) {
        switch (c) {
        case 'p':
            opt.preset = mxq_synth_preset_by_name(optarg);
            if (!opt.preset)
                return mxq_cli_usage_error(ctx, "synth", "unknown preset '%s' (valid: %s)", optarg,
                                           mxq_synth_preset_names());
            break;
        case 'o': out = optarg; break;
        case 'l':
            if (mxq_cli_parse_int(optarg, 1, 1000, &value) != 0)
                return mxq_cli_usage_error(ctx, "synth", "--layers must be an integer in 1..1000, got '%s'", optarg);
            opt.layers = (int)value;
            break;
        case 'd':
            if (strcmp(optarg, "bf16") == 0)
                opt.dtype = MXQ_DT_BF16;
            else if (strcmp(optarg, "f32") == 0)
                opt.dtype = MXQ_DT_F32;
            else
                return mxq_cli_usage_error(ctx, "synth", "unknown dtype '%s' (valid: bf16 f32)", optarg);
            break;
        case 's':
            if (mxq_cli_parse_bytes(optarg, 1000, &opt.shard_size) != 0)
                return mxq_cli_usage_error(ctx, "synth", "--shard-size must be a byte count like 2000000000 or 2G, got '%s'",
                                           optarg);
            break;
        case OPT_SEED:
            if (mxq_cli_parse_int(optarg, 0, 1L << 62, &value) != 0)
                return mxq_cli_usage_error(ctx, "synth", "--seed must be a non-negative integer, got '%s'", optarg);
            opt.seed = (uint64_t)value;
            break;
        case 'f': opt.force = 1; break;
        case 'q': mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR); break;
        case 'v': mxq_ctx_set_log_level(ctx, MXQ_LOG_DEBUG); break;
        case 'h': print_synth_help(stdout); return MXQ_EXIT_OK;
        case ':': return mxq_cli_usage_error(ctx, "synth", "option '%s' needs a value", argv[optind - 1]);
        default: return mxq_cli_usage_error(ctx, "synth", "unknown option '%s' (see mxq synth --help)", argv[optind - 1]);
        }
    }
    if (!opt.preset)
        return mxq_cli_usage_error(ctx, "synth", "--preset is required (valid: %s)", mxq_synth_preset_names());
    if (!out)
        return mxq_cli_usage_error(ctx, "synth", "--out DIR is required");
    if (optind < argc)
        return mxq_cli_usage_error(ctx, "synth", "unexpected argument '%s'", argv[optind]);
    if (opt.layers > opt.preset->layers)
        return mxq_cli_usage_error(ctx, "synth", "--layers %d exceeds the %d layers of %s", opt.layers,
                                   opt.preset->layers, opt.preset->name);
    if (mxq_synth_write(ctx, &opt, out) != MXQ_OK) {
        mxq_error_print(ctx, stderr, "mxq synth");
        return MXQ_EXIT_FAILURE;
    }
    return MXQ_EXIT_OK;
}
