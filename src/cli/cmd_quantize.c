/* mxq quantize: a Hugging Face model -> an MX checkpoint, over MPI ranks. */
#include <ctype.h>
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "mxq/jobs.h"

static void print_quantize_help_layout(FILE *out);
static void print_quantize_help_tail(FILE *out);

static void print_quantize_help(FILE *out)
{
    fprintf(out,
            "Usage: [mpirun -n R] mxq quantize --model DIR --calib FILE.h5 --recipe R.yaml --out DIR [options]\n"
            "\n"
            "Post-training quantization of a Hugging Face LLaMA-family model (llama, mistral,\n"
            "qwen2) to microscaling formats, as the recipe says:\n"
            "  1. the FP model runs over the calibration tokens (HDF5 /tokens, int32 [n, seq_len];\n"
            "     the first calibration.samples sequences are used); for the linears of each layer,\n"
            "     H = X^T X (double), max|x| and mean|x| per channel are accumulated (by the rank\n"
            "     owning the layer, or summed over the ranks' shares: see --group-size).\n"
            "     calibration.mode: sequential calibrates each layer on the outputs of the already\n"
            "     quantized layers before it (as a pipeline its ranks take turns; a group spreads\n"
            "     each layer's inputs over its ranks: see --group-size).\n"
            "  2. per layer, on the rank that owns it (see --group-size): SmoothQuant or AWQ scales folded into the\n"
            "     RMSNorms (and, for AWQ, v_proj -> o_proj without GQA, up_proj -> down_proj),\n"
            "     AWQ clipping, then GPTQ-MX or round-to-nearest for each linear.\n"
            "  3. each rank writes its shard model-0000r-of-0000N.safetensors; rank 0 writes\n"
            "     model.safetensors.index.json, config.json (+ quantization_config) and\n"
            "     mxq_report.json (per-layer and per-linear losses, AWQ alpha, times, memory).\n"
            "\n"
            "Every quantized linear is stored as <name>.weight_packed (U8 [out, packed row bytes],\n"
            "elements packed as mxq cast packs them) and <name>.weight_scale (U8 E8M0\n"
            "[out, ceil(in/block)]). Embeddings, lm_head and untouched tensors are copied as they\n"
            "are; norms and biases changed by folded scales are stored in F32. The checkpoint's\n"
            "tensors are the same bytes for any number of ranks (with --group-size 1). `mxq eval\n"
            "--model OUT` loads it.\n"
            "\n"
            "Options:\n"
            "  -m, --model DIR        input model directory\n"
            "  -c, --calib FILE.h5    calibration tokens\n"
            "  -r, --recipe R.yaml    recipe (see configs/recipes/ and the README for the schema)\n"
            "  -o, --out DIR          output directory (created; must be empty unless --force)\n"
            "  -b, --batch N          calibration sequences per micro-batch (default 8)\n"
            "      --dry-run          print who owns which layers and the predicted memory per rank\n"
            "      --json PLAN.json   with --dry-run, the plan for scripts too: {\"ranks\": [{\"rank\",\n"
            "                         \"group\", \"layers\": [first, end], \"peak_bytes\"}], \"mem_per_rank_bytes\"}\n"
            "      --mem-per-rank SIZE  the memory a rank may use (K, M, G, T: powers of 1024; a bare\n"
            "                         number is M, as in Slurm's --mem); it chooses the layout.\n"
            "                         Default: the node's memory, or its cgroup limit, over its ranks\n"
            "      --force            replace what an earlier mxq run wrote in DIR (listed in its\n"
            "                         .mxq-output.json), temporaries of a killed run included;\n"
            "                         never a file mxq did not write, nor the input model; an\n"
            "                         unfinished run's layer records (DIR/.mxq-resume) go too\n"
            "      --resume           continue the run that died in DIR (killed, out of time, failed):\n"
            "                         each layer is recorded in DIR/.mxq-resume as soon as it is\n"
            "                         quantized; the recorded ones are taken as they are, the others\n"
            "                         calibrated and quantized. Same command otherwise: a different\n"
            "                         model, recipe, calibration file, mxq, rank count or layout is\n"
            "                         refused, naming what differs. The checkpoint is the same bytes\n"
            "                         as an uninterrupted run's. Sequential calibration records its\n"
            "                         layers only with --store-activations (resumed from the store).\n"
            "                         SIGTERM/SIGINT/SIGUSR1 stop a run at its next safe point,\n"
            "                         resumable (exit 75 when the ranks get the signal)\n");
    print_quantize_help_layout(out);
    print_quantize_help_tail(out);
}

/* The options that decide how the ranks share the work. */
static void print_quantize_help_layout(FILE *out)
{
    fprintf(out,
            "      --group-size 1|R   how R ranks share the work. 1: a pipeline; rank r owns a range of\n"
            "                         layers, holds them in float32 and (fp mode) the statistics of\n"
            "                         all of them; the bytes are the same for any rank count.\n"
            "                         R (fp mode): one data-parallel group; each rank runs its share\n"
            "                         of the calibration sequences through every layer, converted\n"
            "                         from the checkpoint one at a time; statistics are summed onto\n"
            "                         the layer's owner (layer l: rank l %% R), and the ranks quantize\n"
            "                         their layers side by side. A rank holds about 2.5 layers in\n"
            "                         float32 and 2 layers' statistics, the last rank one of each\n"
            "                         less (7B: about 7.2 GB; 2 ranks fit a 24 GB node); the Hessian\n"
            "                         sums' last bits, hence a few weights,\n"
            "                         depend on R. Default: the pipeline if its plan stays under 90%%\n"
            "                         of the memory a rank has (node memory or cgroup limit over the\n"
            "                         ranks on the node; --dry-run shows it), else one data-parallel\n"
            "                         group of all ranks -- on a single rank too, which then goes\n"
            "                         layer by layer (there --group-size 1 forces the pipeline), and\n"
            "                         with more ranks than layers (extra ranks only calibrate)\n"
            "                         R (sequential mode): one data-parallel group working on every\n"
            "                         layer together: each layer's 4 inputs are spread over the ranks\n"
            "                         (statistics summed onto the input's owner, which searches its\n"
            "                         scales, sent to every rank, and quantizes its linears, broadcast\n"
            "                         to every rank for the next layer's inputs); layer l is written\n"
            "                         by rank l %% R. A rank holds 1 layer, its statistics and its\n"
            "                         share of the activations; faster than the pipeline, whose ranks\n"
            "                         take turns\n"
            "      --grid-min-inputs N|never  in an fp-mode group of R > 1 ranks, GPTQ of a linear with N inputs\n"
            "                         or more runs on a ScaLAPACK grid of all R ranks (its Hessian's\n"
            "                         factor and weights spread over them; the same algorithm, whose\n"
            "                         float32 rounding may move a few values), one owner's at a time.\n"
            "                         Needs the inputs to be a multiple of the lazy batch (gptq.block,\n"
            "                         rounded up to the MX block when gptq.microblock is 1). On one node\n"
            "                         it saves memory, not time. Default: the linears whose GPTQ on one\n"
            "                         rank would take over a quarter of a rank's memory, and all with\n"
            "                         as many inputs (llama-2-70b: down_proj with 32 GB a rank, every\n"
            "                         linear with 12 GB; llama-2-7b, -13b, mistral-7b: none with 12 GB).\n"
            "                         When every GPTQ linear goes to the grid (and act_order is off),\n"
            "                         the statistics are spread too: each rank holds its block rows of\n"
            "                         every Hessian (the activations are exchanged to build them), the\n"
            "                         owner's AWQ and clip searches and losses ask the ranks, and layers\n"
            "                         go one at a time (needs every input whole lazy batches; llama-2-70b\n"
            "                         on 2 ranks: 11.6 GB on the owner, 9.8 GB on the other, not 19 GB)\n"
            "      --store-activations FILE.h5  write every layer's inputs over the calibration set\n"
            "                         (the FP model's in fp mode, the quantized layers' in sequential\n"
            "                         mode) to one parallel-HDF5 file, which the ranks of a data-\n"
            "                         parallel group write collectively: /layers/<l> float32 [samples,\n"
            "                         seq_len, hidden], one sequence per chunk (n_layers x samples x\n"
            "                         seq_len x hidden x 4 bytes: --dry-run says how much). Implies the\n"
            "                         group (not with --group-size 1 or --stats-layers). Written under a\n"
            "                         temporary name, in place when complete; replaces only an earlier\n"
            "                         store, with --force. h5dump / h5py read it\n"
            "      --stats-layers N   pipeline, fp mode: hold the calibration statistics (double\n"
            "                         Hessians, see --dry-run) of at most N layers per rank at a time;\n"
            "                         the calibration set then runs through the model once per group\n"
            "                         of N layers. Same checkpoint bytes. Default: all at once\n");
}

static void print_quantize_help_tail(FILE *out)
{
    fprintf(out,
            "  -v, --verbose          debug log, error traces\n"
            "  -q, --quiet            log errors only (the summary table still goes to stdout)\n"
            "  -h, --help             this text\n"
            "\n"
            "Output: one progress line per layer (from the rank that owns it; in a data-parallel\n"
            "group, rank 0 prints them all) with the loss of round-to-nearest and of the recipe,\n"
            "tr(dW H dW^T) summed over the layer's linears,\n"
            "the AWQ/SmoothQuant alpha per input, times and peak memory; then a summary table.\n"
            "Nothing looks complete before it is: shards are written under temporary names and\n"
            "the index is renamed into place last. Everything that can be checked is checked\n"
            "before the work starts: recipe, config against the checkpoint, calibration tokens,\n"
            "the output directory (writable, not the input) on every rank. Non-finite weights are\n"
            "refused, naming the tensor. Under mpirun every rank stops when one fails; the cause\n"
            "is printed once, with where it happened (e.g. layer 3 mlp.down_proj: GPTQ: ...).\n"
            "\n"
            "Example:\n"
            "  mpirun -n 2 mxq quantize --model data/stories260K --calib data/stories260K/calib.h5 \\\n"
            "      --recipe configs/recipes/block32/w4a8-mxint-awq-gptq.yaml --out out/stories-w4a8\n");
}

static int parse_grid_min_inputs(const char *arg, int *out)
{
    long value;
    if (strcmp(arg, "never") == 0)
        *out = -1;
    else if (mxq_cli_parse_int(arg, 1, 1 << 24, &value) == 0)
        *out = (int)value;
    else
        return -1;
    return 0;
}

/* What getopt cannot check: a required option missing, a stray argument,
 * --json without --dry-run. 0, or the usage error's exit code. */
static int check_arguments(mxq_ctx *ctx, const char *missing, const char *stray, const mxq_quantize_options *opt)
{
    if (missing)
        return mxq_cli_usage_error(ctx, "quantize", "%s is required", missing);
    if (stray)
        return mxq_cli_usage_error(ctx, "quantize", "unexpected argument '%s'", stray);
    if (opt->plan_json && !opt->dry_run)
        return mxq_cli_usage_error(ctx, "quantize", "--json PLAN.json writes the plan of a --dry-run; add --dry-run");
    if (opt->resume && opt->force)
        return mxq_cli_usage_error(ctx, "quantize",
                                   "--resume continues the run in --out, --force starts it over: give one of them");
    return 0;
}

/* --mem-per-rank: K/M/G/T in powers of 1024; a bare number is megabytes,
 * as in Slurm's --mem. 0 on success. */
static int parse_mem_per_rank(const char *arg, size_t *bytes)
{
    const size_t len = strlen(arg);
    char text[64];
    if (len == 0 || len >= sizeof(text) - 1)
        return -1;
    snprintf(text, sizeof(text), "%s%s", arg, isdigit((unsigned char)arg[len - 1]) ? "M" : "");
    return mxq_cli_parse_bytes(text, 1024, bytes);
}

int mxq_cmd_quantize(mxq_ctx *ctx, int argc, char **argv)
{
    enum { OPT_DRY_RUN = 1000, OPT_FORCE, OPT_STATS_LAYERS, OPT_GROUP_SIZE, OPT_MEM_PER_RANK, OPT_JSON,
           OPT_GRID_MIN_INPUTS, OPT_STORE_ACTIVATIONS, OPT_RESUME };
    static const struct option options[] = {
        {"model", required_argument, NULL, 'm'}, {"calib", required_argument, NULL, 'c'},
        {"recipe", required_argument, NULL, 'r'}, {"out", required_argument, NULL, 'o'},
        {"batch", required_argument, NULL, 'b'}, {"dry-run", no_argument, NULL, OPT_DRY_RUN},
        {"force", no_argument, NULL, OPT_FORCE}, {"verbose", no_argument, NULL, 'v'},
        {"stats-layers", required_argument, NULL, OPT_STATS_LAYERS},
        {"group-size", required_argument, NULL, OPT_GROUP_SIZE},
        {"mem-per-rank", required_argument, NULL, OPT_MEM_PER_RANK},
        {"json", required_argument, NULL, OPT_JSON}, {"grid-min-inputs", required_argument, NULL, OPT_GRID_MIN_INPUTS},
        {"store-activations", required_argument, NULL, OPT_STORE_ACTIVATIONS}, {"resume", no_argument, NULL, OPT_RESUME},
        {"quiet", no_argument, NULL, 'q'},       {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *model = NULL, *calib = NULL, *recipe = NULL, *out = NULL;
    mxq_quantize_options opt = {.batch = 8};
    long value;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":m:c:r:o:b:vqh", options, NULL)) != -1) {
        switch (c) {
        case 'm': model = optarg; break;
        case 'c': calib = optarg; break;
        case 'r': recipe = optarg; break;
        case 'o': out = optarg; break;
        case 'b':
            if (mxq_cli_parse_int(optarg, 1, 1 << 16, &value) != 0)
                return mxq_cli_usage_error(ctx, "quantize", "--batch must be an integer in 1..65536, got '%s'", optarg);
            opt.batch = (int)value;
            break;
        case OPT_DRY_RUN: opt.dry_run = 1; break;
        case OPT_FORCE: opt.force = 1; break;
        case OPT_RESUME: opt.resume = 1; break;
        case OPT_STATS_LAYERS:
            if (mxq_cli_parse_int(optarg, 1, 1 << 20, &value) != 0)
                return mxq_cli_usage_error(ctx, "quantize", "--stats-layers must be an integer in 1..%d, got '%s'", 1 << 20, optarg);
            opt.stats_layers = (int)value;
            break;
        case OPT_GROUP_SIZE:
            if (mxq_cli_parse_int(optarg, 1, 1 << 20, &value) != 0)
                return mxq_cli_usage_error(ctx, "quantize", "--group-size must be 1 or the number of ranks, got '%s'", optarg);
            opt.group_size = (int)value;
            break;
        case OPT_MEM_PER_RANK: {
            size_t bytes;
            if (parse_mem_per_rank(optarg, &bytes) != 0)
                return mxq_cli_usage_error(ctx, "quantize", "--mem-per-rank must be a size like 32G or 4096M, got '%s'",
                                           optarg);
            opt.mem_per_rank = (double)bytes;
            break;
        }
        case OPT_JSON: opt.plan_json = optarg; break;
        case OPT_STORE_ACTIVATIONS: opt.store_activations = optarg; break;
        case OPT_GRID_MIN_INPUTS:
            if (parse_grid_min_inputs(optarg, &opt.grid_min_inputs) != 0)
                return mxq_cli_usage_error(ctx, "quantize", "--grid-min-inputs must be 1..%d or 'never', got '%s'",
                                           1 << 24, optarg);
            break;
        case 'v': mxq_ctx_set_log_level(ctx, MXQ_LOG_DEBUG); break;
        case 'q': mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR); break;
        case 'h': print_quantize_help(stdout); return MXQ_EXIT_OK;
        case ':': return mxq_cli_usage_error(ctx, "quantize", "option '%s' needs a value", argv[optind - 1]);
        default:
            return mxq_cli_usage_error(ctx, "quantize", "unknown option '%s' (see mxq quantize --help)", argv[optind - 1]);
        }
    }
    const char *missing = !model ? "--model DIR" : !calib ? "--calib FILE.h5" : !recipe ? "--recipe R.yaml"
                          : !out && !opt.dry_run ? "--out DIR" : NULL;
    const int bad = check_arguments(ctx, missing, optind < argc ? argv[optind] : NULL, &opt);
    if (bad)
        return bad;
    /* per-layer progress lines come from the rank that owns the layer */
    mxq_ctx_set_all_ranks_info(ctx, 1);
    if (mxq_quantize(ctx, MPI_COMM_WORLD, model, calib, recipe, out, &opt) != MXQ_OK)
        return mxq_cli_job_failed(ctx, "quantize");
    return MXQ_EXIT_OK;
}
