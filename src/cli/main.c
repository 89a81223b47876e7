/* mxq: the thin command-line layer over libmxq. Parses the verb, sets up the
 * context, and turns library errors into one line and an exit code. */
#include <errno.h>
#include <stdarg.h>
#include <signal.h>
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
            "  verify  check a checkpoint: shards' sizes and SHA-256, config, every tensor's\n"
            "          shape, element codes and scale bytes\n"
            "  export  write a checkpoint as GGUF for llama.cpp (MX weights as Q4_0/Q8_0/MXFP4, exactly)\n"
            "  inspect describe a checkpoint: recipe, formats, bits per weight, size against\n"
            "          the FP model, per-layer losses, the run's ranks and times\n"
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

/* The launcher's rank and size, read from its environment before (or
 * instead of) MPI_Init: help, version and command-line errors of a job
 * started on N processes are then printed once, and a command that does not
 * run over MPI can refuse to run N times side by side on the same files.
 * Open MPI and MPICH/Hydra export their own pair; srun exports SLURM_PROCID
 * with the step's task count (a batch script has no step tasks: size 1). */
static void launcher_rank(int *rank, int *size)
{
    static const char *const vars[][2] = {
        {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
        {"PMI_RANK", "PMI_SIZE"},
        {"SLURM_PROCID", "SLURM_STEP_NUM_TASKS"},
    };
    *rank = 0;
    *size = 1;
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        long r = 0, n = 0;
        if (mxq_cli_parse_int(getenv(vars[i][0]), 0, 1L << 30, &r) == 0 &&
            mxq_cli_parse_int(getenv(vars[i][1]), 1, 1L << 30, &n) == 0 && r < n) {
            *rank = (int)r;
            *size = (int)n;
            return;
        }
    }
}

static int launcher_is_rank0(void)
{
    int rank, size;
    launcher_rank(&rank, &size);
    return rank == 0;
}

/* Under a launcher, a rank that exits with an error gets the others killed:
 * before MPI is up, every rank waits in MPI_Init until rank 0 has printed. */
static int launcher_exit(int rc)
{
    int rank, size, initialized = 0;
    launcher_rank(&rank, &size);
    MPI_Initialized(&initialized);
    if (size > 1 && !initialized && MPI_Init(NULL, NULL) == MPI_SUCCESS)
        MPI_Finalize();
    return rc;
}

int mxq_cli_usage_error(mxq_ctx *ctx, const char *verb, const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof(message), fmt, ap);
    va_end(ap);
    if (ctx ? mxq_ctx_rank(ctx) == 0 : launcher_is_rank0())
        fprintf(stderr, "mxq%s%s: error: %s\n", verb ? " " : "", verb ? verb : "", message);
    return ctx ? MXQ_EXIT_USAGE : launcher_exit(MXQ_EXIT_USAGE);
}

int mxq_cli_job_failed(mxq_ctx *ctx, const char *verb)
{
    char prefix[64];
    snprintf(prefix, sizeof(prefix), "mxq %s", verb);
    mxq_error_print(ctx, stderr, prefix);
    return mxq_error_code(ctx) == MXQ_ERR_STOPPED ? MXQ_EXIT_STOPPED : MXQ_EXIT_FAILURE;
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

int mxq_cli_parse_bytes(const char *text, double unit, size_t *out)
{
    char *end = NULL;
    double v = strtod(text, &end);
    if (end == text || !(v > 0))
        return -1;
    double mult = 1;
    const char *suffixes = "KMGT";
    const char *at = *end ? strchr(suffixes, *end == 'k' ? 'K' : *end == 'm' ? 'M' : *end == 'g' ? 'G' : *end) : NULL;
    for (const char *p = suffixes; at && p <= at; p++)
        mult *= unit;
    end += at != NULL;
    if (*end == 'B' || *end == 'b')
        end++;
    if (*end != '\0' || v * mult >= 1.8e19)
        return -1;
    *out = (size_t)(v * mult);
    return *out > 0 ? 0 : -1;
}

typedef struct {
    const char *name;
    int (*run)(mxq_ctx *ctx, int argc, char **argv);
    int needs_mpi;
    /* SIGTERM/SIGINT stop it at a safe point (the MPI jobs, so that every
     * rank stops together; export, so that its temporary file is removed);
     * the others stop at once, as by default */
    int safe_points;
} verb_entry;

static const verb_entry verbs[] = {
    {"cast", mxq_cmd_cast, 0, 0},
    {"eval", mxq_cmd_eval, 1, 1},
    {"synth", mxq_cmd_synth, 0, 0},
    {"quantize", mxq_cmd_quantize, 1, 1},
    {"quantize-linear", mxq_cmd_quantize_linear, 0, 0},
    {"verify", mxq_cmd_verify, 0, 0},
    {"inspect", mxq_cmd_inspect, 0, 0},
    {"export", mxq_cmd_export, 0, 1},
};

static int wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0)
            return 1;
    return 0;
}

static int init_mpi(mxq_ctx *ctx, const char *verb)
{
    int provided = 0;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "mxq %s: error: MPI_Init failed\n", verb);
        return -1;
    }
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    mxq_ctx_set_rank(ctx, rank, size);
    return 0;
}

/* Results go to stdout; a full disk or closed pipe there must not pass for
 * success. */
static int check_stdout(const char *verb, int rc)
{
    errno = 0;
    const int flush_failed = fflush(stdout) != 0;
    if (!flush_failed && !ferror(stdout))
        return rc;
    /* An earlier failed write leaves only the error flag; its errno is gone. */
    fprintf(stderr, "mxq%s%s: error: cannot write to standard output: %s\n", verb ? " " : "", verb ? verb : "",
            flush_failed && errno ? strerror(errno) : "an earlier write to it failed");
    return rc == MXQ_EXIT_OK ? MXQ_EXIT_FAILURE : rc;
}

/* "unknown command" with the commands of the table */
static int unknown_verb(const char *verb)
{
    char names[256] = "";
    for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++) {
        const size_t len = strlen(names);
        snprintf(names + len, sizeof(names) - len, "%s, ", verbs[i].name);
    }
    return mxq_cli_usage_error(NULL, NULL, "unknown command '%s' (commands: %shelp; see mxq --help)", verb, names);
}

static const verb_entry *find_verb(const char *verb)
{
    for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++)
        if (strcmp(verbs[i].name, verb) == 0)
            return &verbs[i];
    return NULL;
}

/* The one signal flag a handler may set: the library looks at it at its
 * safe points (mxq_ctx_set_stop_flag). */
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig) { stop_signal = sig; }

/* SIGTERM (Slurm at a time limit, mpirun passing one on), SIGINT (Ctrl-C)
 * and SIGUSR1 (Slurm's --signal=USR1@SECONDS) stop a job at its next safe
 * point instead of killing it mid-write. A second one kills at once. */
static void catch_stop_signals(mxq_ctx *ctx)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESETHAND | SA_RESTART; /* the second signal takes the default action */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    mxq_ctx_set_stop_flag(ctx, &stop_signal);
}

/* argv[0] is the verb itself, as getopt expects a program name there. */
static int run_verb(const char *verb, int argc, char **argv)
{
    const verb_entry *entry = find_verb(verb);
    if (!entry)
        return unknown_verb(verb);
    int launch_rank, launch_size;
    launcher_rank(&launch_rank, &launch_size);
    /* --help needs no MPI: it must work on a login node without a launcher. */
    const int help = wants_help(argc, argv);
    if (help && launch_rank != 0)
        return MXQ_EXIT_OK;
    if (!entry->needs_mpi && !help && launch_size > 1)
        return mxq_cli_usage_error(NULL, verb, "runs as one process, but the launcher started %d; run it without mpirun/srun", launch_size);

    mxq_ctx *ctx = NULL;
    if (mxq_ctx_create(&ctx) != MXQ_OK) {
        fprintf(stderr, "mxq: error: out of memory\n");
        return MXQ_EXIT_FAILURE;
    }
    /* test-only: make a chosen rank fail at a chosen step (see mxq_ctx_set_fault) */
    const char *fault = getenv("MXQ_FAULT");
    if (mxq_ctx_set_fault(ctx, fault) != 0) {
        mxq_ctx_destroy(ctx);
        return mxq_cli_usage_error(NULL, verb, "MXQ_FAULT='%s' is not 'list', 'RANK:STEP' or '*:STEP'", fault);
    }
    const int use_mpi = entry->needs_mpi && !help;
    if (use_mpi && init_mpi(ctx, verb) != 0) {
        mxq_ctx_destroy(ctx);
        return MXQ_EXIT_FAILURE;
    }
    if (entry->safe_points && !help)
        catch_stop_signals(ctx); /* after MPI_Init, which may set handlers of its own */
    int rc = entry->run(ctx, argc, argv);
    if (mxq_ctx_fault_missed(ctx) && rc == MXQ_EXIT_OK)
        fprintf(stderr, "mxq %s: warning: MXQ_FAULT='%s' never fired on rank %d (no such step in this run; see "
                "MXQ_FAULT=list)\n", verb, fault, mxq_ctx_rank(ctx));
    if (use_mpi)
        MPI_Finalize();
    mxq_ctx_destroy(ctx);
    return check_stdout(verb, rc);
}

int main(int argc, char **argv)
{
    mxq_keep_freed_memory();
    if (argc < 2) {
        if (launcher_is_rank0())
            print_main_help(stderr);
        return launcher_exit(MXQ_EXIT_USAGE);
    }
    const char *verb = argv[1];
    const int main_help = strcmp(verb, "-h") == 0 || strcmp(verb, "--help") == 0 || (strcmp(verb, "help") == 0 && argc < 3);
    if (main_help || strcmp(verb, "--version") == 0 || strcmp(verb, "version") == 0) {
        if (!launcher_is_rank0())
            return MXQ_EXIT_OK;
        if (main_help)
            print_main_help(stdout);
        else
            printf("mxq %s\n", MXQ_VERSION);
        return check_stdout(NULL, MXQ_EXIT_OK);
    }
    if (strcmp(verb, "help") == 0) {
        /* `mxq help cast` is `mxq cast --help` */
        char help_flag[] = "--help";
        verb = argv[2];
        char *help_argv[] = {argv[2], help_flag, NULL};
        return run_verb(verb, 2, help_argv);
    }
    return run_verb(verb, argc - 1, argv + 1);
}

