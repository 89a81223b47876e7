/* mxq core: status codes, the context object (logger + error record). */
#ifndef MXQ_CORE_H
#define MXQ_CORE_H

#include <stdarg.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MXQ_VERSION "0.6.0"

/* Every fallible library function returns one of these. The human-readable
 * story of what went wrong lives in the mxq_ctx that was passed in. */
typedef enum {
    MXQ_OK = 0,
    MXQ_ERR_ARG,      /* caller passed a value outside the documented range */
    MXQ_ERR_IO,       /* open/read/write/rename of a file failed */
    MXQ_ERR_FORMAT,   /* a file exists but its content is not what was expected */
    MXQ_ERR_NOMEM,
    MXQ_ERR_MPI,
    MXQ_ERR_HDF5,
    MXQ_ERR_LAPACK,
    MXQ_ERR_REMOTE,   /* another rank failed; this rank stopped to avoid a hang */
    MXQ_ERR_INTERNAL, /* a bug in mxq */
    MXQ_ERR_STOPPED,  /* stopped on request (a signal, see mxq_ctx_set_stop_flag) at a safe point */
} mxq_status;

const char *mxq_status_name(mxq_status status);

typedef enum {
    MXQ_LOG_ERROR = 0,
    MXQ_LOG_WARN = 1,
    MXQ_LOG_INFO = 2,
    MXQ_LOG_DEBUG = 3,
} mxq_log_level;

/* The context carries everything that would otherwise be a global: the log
 * level and rank used to prefix messages, and the first error raised. One per
 * process (or per thread), passed as the first argument of fallible calls. */
typedef struct mxq_ctx mxq_ctx;

mxq_status mxq_ctx_create(mxq_ctx **out);
void mxq_ctx_destroy(mxq_ctx *ctx);

void mxq_ctx_set_log_level(mxq_ctx *ctx, mxq_log_level level);
mxq_log_level mxq_ctx_log_level(const mxq_ctx *ctx);
/* Rank information only changes how messages are prefixed and which ranks
 * print INFO lines (rank 0 only, unless all_ranks_info). */
void mxq_ctx_set_rank(mxq_ctx *ctx, int rank, int nranks);
int mxq_ctx_rank(const mxq_ctx *ctx);
void mxq_ctx_set_all_ranks_info(mxq_ctx *ctx, int enabled);
/* Where log lines go; default stderr. */
void mxq_ctx_set_log_stream(mxq_ctx *ctx, FILE *stream);
/* Where results meant for the user go (summary tables, plans); default
 * stdout. The library prints nothing anywhere else. */
void mxq_ctx_set_output_stream(mxq_ctx *ctx, FILE *stream);
void mxq_print(mxq_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void mxq_log(mxq_ctx *ctx, mxq_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Error record. The first error raised wins: it is the cause. Callers on the
 * way up may put their context in front of it (mxq_error_context), so that
 * the message reads "layer 3 mlp.down_proj: GPTQ: Cholesky ... failed"; the
 * call sites it passes through are kept as a trace (shown at DEBUG level). */
void mxq_error_set(mxq_ctx *ctx, mxq_status code, const char *file, int line,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
void mxq_error_trace(mxq_ctx *ctx, const char *file, int line);
/* Put "<context>: " in front of the current error's message (no-op when
 * there is no error). */
void mxq_error_context(mxq_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
mxq_status mxq_error_code(const mxq_ctx *ctx);
/* The message alone, e.g. "unknown format 'mxint5' (valid: ...)". */
const char *mxq_error_message(const mxq_ctx *ctx);
/* Where it was raised, "src/formats/mx.c:42". */
const char *mxq_error_origin(const mxq_ctx *ctx);
/* Print "error: <message> [origin]" on one line, plus the trace at DEBUG. */
void mxq_error_print(mxq_ctx *ctx, FILE *stream, const char *prefix);
void mxq_error_clear(mxq_ctx *ctx);

/* Fault injection, for testing that every rank stops cleanly whatever rank
 * fails wherever. `spec` is "RANK:STEP" (RANK may be "*"): the first time
 * that rank reaches the named step, it fails there as if the step had
 * failed. "list" prints every step reached instead ("mxq fault-point: rank R
 * step S" on the log stream). The command-line tool takes it from the
 * environment variable MXQ_FAULT; NULL or "" turns it off. Returns 0, or
 * -1 (and turns it off) if `spec` is none of these. */
int mxq_ctx_set_fault(mxq_ctx *ctx, const char *spec);
/* 1 if a fault was set for this rank (or for rank 0 when the rank named
 * does not exist) and the job ended without reaching its step: a misspelt
 * step must not pass for a job that survived the fault. */
int mxq_ctx_fault_missed(const mxq_ctx *ctx);

/* A stop request: once *flag is non-zero (a signal number, set by the
 * caller's signal handler, e.g. for the SIGTERM Slurm sends at a time
 * limit), the job fails with MXQ_ERR_STOPPED at its next safe point (the
 * same points fault injection uses, where every rank agrees on a failure),
 * so that it ends cleanly: what it recorded stays, the rest is tidied.
 * NULL: no stop requests. */
void mxq_ctx_set_stop_flag(mxq_ctx *ctx, const volatile sig_atomic_t *flag);

/* Wall-clock seconds since an arbitrary fixed point (monotonic). */
double mxq_time_now(void);

/* For a program's main(), before any large allocation: freed arrays stay
 * in the process (glibc only: heap, no mmap per allocation, no trimming) and are
 * reused by the next layer or linear. Fresh pages from the
 * kernel cost a fault, zeroing and huge-page compaction each time: GPTQ on
 * a llama-2-7b layer took 10 s instead of 7. The price: the process keeps
 * its high-water mark, which is the peak RSS anyway. */
void mxq_keep_freed_memory(void);
/* Peak resident set size of this process in bytes (0 if unknown). */
size_t mxq_peak_rss_bytes(void);

#ifdef __cplusplus
}
#endif

#endif
