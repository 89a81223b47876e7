/* mxq eval: perplexity of a model on a token file, over MPI ranks. */
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "mxq/jobs.h"

static void print_eval_help(FILE *out)
{
    fprintf(out,
            "Usage: [mpirun -n R] mxq eval --model DIR --tokens FILE.h5 [options]\n"
            "\n"
            "Perplexity of a Hugging Face LLaMA-family model (llama, mistral, qwen2; safetensors\n"
            "in F32, F16 or BF16, single file or sharded) on an HDF5 token file (/tokens, int32\n"
            "[n_sequences, seq_len]). Each sequence is scored independently from position 0:\n"
            "perplexity = exp(mean over every sequence and position t of -log p(token t+1 | 0..t)).\n"
            "\n"
            "Under mpirun/srun the decoder layers are split over the ranks (contiguous ranges\n"
            "balanced by parameter count, 1 <= ranks <= layers) and micro-batches of sequences\n"
            "flow through them as a pipeline. The result does not depend on the number of ranks.\n"
            "\n"
            "Options:\n"
            "  -m, --model DIR        model directory (config.json + model.safetensors[.index.json])\n"
            "  -t, --tokens FILE.h5   token file\n"
            "  -n, --limit N          evaluate only the first N sequences\n"
            "  -b, --batch N          sequences per micro-batch (default 8)\n"
            "  -j, --json OUT.json    also write ppl, mean_nll, tokens_scored, seconds, tokens_per_s\n"
            "                         (checked before any work; never an input, a device or a directory;\n"
            "                         under mpirun safer than stdout, which mpirun forwards without\n"
            "                         reporting a failed write)\n"
            "\n"
            "Fake quantization (weights rounded to nearest once; each linear's input quantized at\n"
            "run time), to measure what a format costs:\n"
            "      --weights FMT      MX format of linear weights\n"
            "      --acts FMT         MX format of linear inputs\n"
            "      --block B          MX block size (default 32; with --weights or --acts)\n"
            "      --rounding MODE    even (default) or nearest (with --weights or --acts)\n"
            "  formats: %s\n"
            "\n"
            "Quantized models:\n"
            "  an mxq checkpoint (written by mxq quantize) is loaded as such: MX weights are\n"
            "  unpacked, and activations are quantized as its quantization_config says\n"
            "  (--acts FMT overrides that format; --weights and --recipe apply to unquantized\n"
            "  models only).\n"
            "      --recipe R.yaml    quantize in memory with this recipe (SmoothQuant, AWQ, GPTQ,\n"
            "                         calibrated on --calib), then evaluate: what mxq quantize\n"
            "                         would write, without writing it\n"
            "      --calib FILE.h5    calibration tokens for --recipe\n"
            "\n"
            "  -v, --verbose          debug log (per-rank layer ownership), error traces\n"
            "  -q, --quiet            log errors only (the result still goes to stdout)\n"
            "  -h, --help             this text\n"
            "\n"
            "Threads: each rank uses OPENBLAS_NUM_THREADS threads for matrix products; with R\n"
            "ranks on a node of C cores set it to C/R.\n"
            "\n"
            "Example:\n"
            "  mpirun -n 2 mxq eval --model data/stories260K --tokens data/stories260K/eval.h5\n",
            mxq_format_names());
}

/* The command line as read, before it is checked as a whole. */
typedef struct {
    const char *model, *tokens;
    const mxq_format *wfmt, *afmt;
    long block;
    mxq_rounding rounding;
    int block_given, rounding_given;
    mxq_eval_options opt;
} eval_args;

enum { OPT_WEIGHTS = 1000, OPT_ACTS, OPT_BLOCK, OPT_ROUNDING, OPT_RECIPE, OPT_CALIB };

/* One option; returns -1 to go on, else the exit code. */
static int take_option(mxq_ctx *ctx, int c, char **argv, eval_args *a)
{
    long value;
    switch (c) {
    case 'm': a->model = optarg; return -1;
    case 't': a->tokens = optarg; return -1;
    case 'j': a->opt.json_path = optarg; return -1;
    case 'n':
        if (mxq_cli_parse_int(optarg, 1, 1L << 30, &value) != 0)
            return mxq_cli_usage_error(ctx, "eval", "--limit must be an integer in 1..%ld, got '%s'", 1L << 30, optarg);
        a->opt.limit = (int)value;
        return -1;
    case 'b':
        if (mxq_cli_parse_int(optarg, 1, 1 << 16, &value) != 0)
            return mxq_cli_usage_error(ctx, "eval", "--batch must be an integer in 1..65536, got '%s'", optarg);
        a->opt.batch = (int)value;
        return -1;
    case OPT_WEIGHTS:
    case OPT_ACTS:
        *(c == OPT_WEIGHTS ? &a->wfmt : &a->afmt) = mxq_format_by_name(optarg);
        if (!mxq_format_by_name(optarg))
            return mxq_cli_usage_error(ctx, "eval", "unknown format '%s' (valid: %s)", optarg, mxq_format_names());
        return -1;
    case OPT_BLOCK:
        a->block_given = 1;
        if (mxq_cli_parse_int(optarg, 1, MXQ_MX_BLOCK_MAX, &a->block) != 0)
            return mxq_cli_usage_error(ctx, "eval", "block size must be an integer in 1..%d, got '%s'",
                                       MXQ_MX_BLOCK_MAX, optarg);
        return -1;
    case OPT_ROUNDING:
        a->rounding_given = 1;
        if (mxq_rounding_by_name(optarg, &a->rounding) != 0)
            return mxq_cli_usage_error(ctx, "eval", "unknown rounding '%s' (valid: even nearest)", optarg);
        return -1;
    case OPT_RECIPE: a->opt.recipe_path = optarg; return -1;
    case OPT_CALIB: a->opt.calib_path = optarg; return -1;
    case 'v': mxq_ctx_set_log_level(ctx, MXQ_LOG_DEBUG); return -1;
    case 'q': mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR); return -1;
    case 'h': print_eval_help(stdout); return MXQ_EXIT_OK;
    case ':': return mxq_cli_usage_error(ctx, "eval", "option '%s' needs a value", argv[optind - 1]);
    default: return mxq_cli_usage_error(ctx, "eval", "unknown option '%s' (see mxq eval --help)", argv[optind - 1]);
    }
}

/* The options that only make sense together; -1 if they are consistent. */
static int check_args(mxq_ctx *ctx, int argc, char **argv, eval_args *a)
{
    const char *recipe = a->opt.recipe_path, *calib = a->opt.calib_path;
    if (!a->model)
        return mxq_cli_usage_error(ctx, "eval", "--model DIR is required");
    if (!a->tokens)
        return mxq_cli_usage_error(ctx, "eval", "--tokens FILE.h5 is required");
    if (optind < argc)
        return mxq_cli_usage_error(ctx, "eval", "unexpected argument '%s'", argv[optind]);
    if (recipe && !calib)
        return mxq_cli_usage_error(ctx, "eval", "--recipe needs --calib FILE.h5 (calibration tokens)");
    if (calib && !recipe)
        return mxq_cli_usage_error(ctx, "eval", "--calib is only used with --recipe");
    if (recipe && (a->wfmt || a->afmt))
        return mxq_cli_usage_error(ctx, "eval", "--recipe sets the formats; do not combine it with --weights/--acts");
    if ((a->block_given || a->rounding_given) && !a->wfmt && !a->afmt)
        return mxq_cli_usage_error(ctx, "eval", "--block and --rounding apply to --weights/--acts; give one of those too");
    if (a->wfmt) {
        a->opt.quant.enabled_weights = 1;
        a->opt.quant.weights = (mxq_mx_spec){a->wfmt, (int)a->block, a->rounding, MXQ_KERNEL_AUTO};
    }
    if (a->afmt) {
        a->opt.quant.enabled_acts = 1;
        a->opt.quant.acts = (mxq_mx_spec){a->afmt, (int)a->block, a->rounding, MXQ_KERNEL_AUTO};
    }
    return -1;
}

int mxq_cmd_eval(mxq_ctx *ctx, int argc, char **argv)
{
    static const struct option options[] = {
        {"model", required_argument, NULL, 'm'},      {"tokens", required_argument, NULL, 't'},
        {"limit", required_argument, NULL, 'n'},      {"batch", required_argument, NULL, 'b'},
        {"json", required_argument, NULL, 'j'},       {"weights", required_argument, NULL, OPT_WEIGHTS},
        {"acts", required_argument, NULL, OPT_ACTS},  {"block", required_argument, NULL, OPT_BLOCK},
        {"rounding", required_argument, NULL, OPT_ROUNDING}, {"verbose", no_argument, NULL, 'v'},
        {"recipe", required_argument, NULL, OPT_RECIPE}, {"calib", required_argument, NULL, OPT_CALIB},
        {"quiet", no_argument, NULL, 'q'},            {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    eval_args a = {.block = 32, .rounding = MXQ_ROUND_EVEN, .opt = {.batch = 8}};
    int c, rc;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":m:t:n:b:j:vqh", options, NULL)) != -1)
        if ((rc = take_option(ctx, c, argv, &a)) >= 0)
            return rc;
    if ((rc = check_args(ctx, argc, argv, &a)) >= 0)
        return rc;
    if (a.opt.recipe_path)
        mxq_ctx_set_all_ranks_info(ctx, 1); /* per-layer lines come from the rank that owns the layer */
    mxq_eval_result r;
    if (mxq_eval_perplexity(ctx, MPI_COMM_WORLD, a.model, a.tokens, &a.opt, &r) != MXQ_OK)
        return mxq_cli_job_failed(ctx, "eval");
    if (mxq_ctx_rank(ctx) == 0) {
        printf("perplexity %.6f  mean_nll %.9f  tokens_scored %zu  sequences %d  ranks %d  %.2f s  %.0f tokens/s\n",
               r.ppl, r.mean_nll, r.tokens_scored, r.sequences, r.ranks, r.seconds, r.tokens_per_s);
    }
    return MXQ_EXIT_OK;
}
