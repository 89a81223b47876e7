/* The mxq command-line tool: one function per verb, sharing option helpers. */
#ifndef MXQ_CLI_H
#define MXQ_CLI_H

#include "mxq/core.h"

/* Exit codes of the tool. */
/* MXQ_EXIT_STOPPED: stopped on request (SIGTERM, ...), to be resumed:
 * sysexits' EX_TEMPFAIL, "try again later". */
enum { MXQ_EXIT_OK = 0, MXQ_EXIT_FAILURE = 1, MXQ_EXIT_USAGE = 2, MXQ_EXIT_STOPPED = 75 };

int mxq_cmd_cast(mxq_ctx *ctx, int argc, char **argv);
int mxq_cmd_eval(mxq_ctx *ctx, int argc, char **argv);
int mxq_cmd_synth(mxq_ctx *ctx, int argc, char **argv);
int mxq_cmd_quantize(mxq_ctx *ctx, int argc, char **argv);
int mxq_cmd_quantize_linear(mxq_ctx *ctx, int argc, char **argv);
int mxq_cmd_verify(mxq_ctx *ctx, int argc, char **argv);
int mxq_cmd_inspect(mxq_ctx *ctx, int argc, char **argv);
int mxq_cmd_export(mxq_ctx *ctx, int argc, char **argv);

/* Print "mxq <verb>: error: <message>" (one line, from rank 0 only: every
 * rank of an mpirun job parses the same command line) and return
 * MXQ_EXIT_USAGE. */
int mxq_cli_usage_error(mxq_ctx *ctx, const char *verb, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Report a failed job: its one-line error (mxq_error_print decides which
 * rank speaks) and MXQ_EXIT_FAILURE. */
int mxq_cli_job_failed(mxq_ctx *ctx, const char *verb);
/* Parse a whole decimal integer in [lo, hi]; -1 if it is not one. */
int mxq_cli_parse_int(const char *text, long lo, long hi, long *out);
/* A positive byte count, "2000000000", "2G", "1.5GB": suffixes K, M, G, T
 * are powers of `unit` (1000, or 1024 as Slurm's --mem). 0 if parsed. */
int mxq_cli_parse_bytes(const char *text, double unit, size_t *out);

#endif
