/* mxq: the thin command-line layer over libmxq. Parses the verb, sets up the
 * context, and turns library errors into one line and an exit code. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "cli.h"
#include "mxq/mx.h"

static void print_main_help(FILE *out)
{
    fprintf(out,
            "mxq %s - post-training quantization of LLaMA-family models to microscaling (MX) formats\n"
            "\n"
            "Usage: mxq <command> [options]\n"
            "       mxq <command> --help     options of one command\n"
            "\n"
            "Commands:\n"
            "  cast    quantize a 2-D float32 HDF5 dataset to an MX format, row by row\n"
            "          (writes dequantized values, E8M0 scales and packed element bytes)\n"
            "  eval    perplexity of a model on a token file, pipelined over MPI ranks;\n"
            "          optionally with MX fake quantization of weights and activations\n"
            "  quantize  SmoothQuant / AWQ / GPTQ in MX formats over MPI ranks, as a YAML recipe\n"
            "          says; writes a sharded MX checkpoint that mxq eval loads\n"
            "  quantize-linear  one weight (+ inputs or Hessian) from HDF5 through a recipe\n"
            "  synth   write a random-weight model with the shapes of a real one\n"
            "          (llama-2-7b, llama-2-70b, llama-3.1-8b, qwen2-7b, mistral-7b)\n"
            "  help    show this text, or `mxq help <command>`\n"
            "\n"
            "MX formats (block of B elements along the last axis shares one E8M0 scale):\n"
            "  %s\n"
            "Roundings: even (ties to even, default), nearest (ties away from zero).\n"
            "\n"
            "Exit status: 0 success, 1 the job failed (message on stderr), 2 bad command line.\n"
            "Under mpirun or srun every rank stops when one fails, and the cause is printed once.\n"
            "Options common to every command: -v/--verbose (debug log and error traces),\n"
            "-q/--quiet (errors only), -h/--help.\n",
            MXQ_VERSION, mxq_format_names());
}

int mxq_cli_usage_error(mxq_ctx *ctx, const char *verb, const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    if (!ctx || mxq_ctx_rank(ctx) == 0)
        fprintf(stderr, "mxq%s%s: error: %s\n", verb ? " " : "", verb ? verb : "", message);
    return MXQ_EXIT_USAGE;
}

int mxq_cli_job_failed(mxq_ctx *ctx, const char *verb)
{
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "mxq %s", verb);
    mxq_error_print(ctx, stderr, prefix);
    return MXQ_EXIT_FAILURE;
}

int mxq_cli_parse_int(const char *text, long lo, long hi, long *out)
{
    if (!text || !*text)
        return -1;
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || value < lo || value > hi)
        return -1;
    *out = value;
    return 0;
}

typedef struct {
    const char *name;
    int (*run)(mxq_ctx *ctx, int argc, char **argv);
    int needs_mpi;
} verb_entry;

static const verb_entry verbs[] = {
    {"cast", mxq_cmd_cast, 0},
    {"eval", mxq_cmd_eval, 1},
    {"synth", mxq_cmd_synth, 0},
    {"quantize", mxq_cmd_quantize, 1},
    {"quantize-linear", mxq_cmd_quantize_linear, 0},
};

static int wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0)
            return 1;
    return 0;
}

/* argv[0] is the verb itself, as getopt expects a program name there. */
static int run_verb(const char *verb, int argc, char **argv)
{
    const verb_entry *entry = NULL;
    for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
        if (strcmp(verbs[i].name, verb) == 0)
            entry = &verbs[i];
    if (!entry)
        return mxq_cli_usage_error(NULL, NULL, "unknown command '%s' (commands: cast, eval, quantize, quantize-linear, synth, help; see "
                                   "mxq --help)",
                                   verb);

    mxq_ctx *ctx = NULL;
    if (mxq_ctx_create(&ctx) != MXQ_OK) {
        fprintf(stderr, "mxq: error: out of memory\n");
        return MXQ_EXIT_FAILURE;
    }
    /* test-only: make a chosen rank fail at a chosen step (see mxq_ctx_set_fault) */
    mxq_ctx_set_fault(ctx, getenv("MXQ_FAULT"));

    /* --help needs no MPI: it must work on a login node without a launcher. */
    int use_mpi = entry->needs_mpi && !wants_help(argc, argv);
    if (use_mpi) {
        int provided = 0;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            fprintf(stderr, "mxq %s: error: MPI_Init failed\n", verb);
            mxq_ctx_destroy(ctx);
            return MXQ_EXIT_FAILURE;
        }
        int rank = 0, size = 1;
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        MPI_Comm_size(MPI_COMM_WORLD, &size);
        mxq_ctx_set_rank(ctx, rank, size);
    }
    int rc = entry->run(ctx, argc, argv);
    if (use_mpi)
        MPI_Finalize();
    mxq_ctx_destroy(ctx);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        print_main_help(stderr);
        return MXQ_EXIT_USAGE;
    }
    const char *verb = argv[1];
    if (strcmp(verb, "-h") == 0 || strcmp(verb, "--help") == 0) {
        print_main_help(stdout);
        return MXQ_EXIT_OK;
    }
    if (strcmp(verb, "--version") == 0 || strcmp(verb, "version") == 0) {
        printf("mxq %s\n", MXQ_VERSION);
        return MXQ_EXIT_OK;
    }
    if (strcmp(verb, "help") == 0) {
        if (argc < 3) {
            print_main_help(stdout);
            return MXQ_EXIT_OK;
        }
        /* `mxq help cast` is `mxq cast --help` */
        static char help_flag[] = "--help";
        verb = argv[2];
        char *help_argv[] = {argv[2], help_flag, NULL};
        return run_verb(verb, 2, help_argv);
    }
    return run_verb(verb, argc - 1, argv + 1);
}

