#define _GNU_SOURCE
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "core/check.h"
#include "mxq/core.h"

#define MXQ_TRACE_MAX 16

struct mxq_ctx {
    mxq_log_level level;
    int rank;
    int nranks;
    int all_ranks_info;
    FILE *log_stream;
    FILE *out_stream; /* results meant for the user: tables, plans */
    double t0;

    mxq_status err_code;
    char err_message[16384]; /* room for two PATH_MAX paths and the reason */
    char err_origin[256];
    int trace_len;
    char trace[MXQ_TRACE_MAX][256];
    int reported_elsewhere; /* another rank prints the same error */

    /* Test-only fault injection (see mxq_ctx_set_fault): "list", or the
     * rank (-1 = every rank) and step at which to fail once. */
    int fault_list;
    char listed[128][64]; /* the steps listed so far (each once: some are reached per exchange) */
    int n_listed;
    int fault_rank;
    char fault_step[128];
    int fault_fired;
    const volatile sig_atomic_t *stop_flag; /* a signal number once a stop is requested */
};

const char *mxq_status_name(mxq_status status)
{
    switch (status) {
    case MXQ_OK: return "ok";
    case MXQ_ERR_ARG: return "invalid argument";
    case MXQ_ERR_IO: return "I/O error";
    case MXQ_ERR_FORMAT: return "bad file content";
    case MXQ_ERR_NOMEM: return "out of memory";
    case MXQ_ERR_MPI: return "MPI error";
    case MXQ_ERR_HDF5: return "HDF5 error";
    case MXQ_ERR_LAPACK: return "LAPACK error";
    case MXQ_ERR_REMOTE: return "failure on another rank";
    case MXQ_ERR_INTERNAL: return "internal error";
    case MXQ_ERR_STOPPED: return "stopped on request";
    }
    return "unknown status";
}

double mxq_time_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

size_t mxq_peak_rss_bytes(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (size_t)ru.ru_maxrss * 1024u; /* Linux reports KiB */
}

mxq_status mxq_ctx_create(mxq_ctx **out)
{
    mxq_ctx *ctx = calloc(1, sizeof(*ctx));
    *out = ctx;
    if (!ctx)
        return MXQ_ERR_NOMEM;
    ctx->level = MXQ_LOG_INFO;
    ctx->nranks = 1;
    ctx->log_stream = stderr;
    ctx->out_stream = stdout;
    ctx->t0 = mxq_time_now();
    ctx->fault_rank = -2; /* no fault configured */
    return MXQ_OK;
}

void mxq_ctx_destroy(mxq_ctx *ctx)
{
    free(ctx);
}

void mxq_ctx_set_log_level(mxq_ctx *ctx, mxq_log_level level) { ctx->level = level; }
mxq_log_level mxq_ctx_log_level(const mxq_ctx *ctx) { return ctx->level; }
void mxq_ctx_set_all_ranks_info(mxq_ctx *ctx, int enabled) { ctx->all_ranks_info = enabled; }
void mxq_ctx_set_log_stream(mxq_ctx *ctx, FILE *stream) { ctx->log_stream = stream; }
void mxq_ctx_set_output_stream(mxq_ctx *ctx, FILE *stream) { ctx->out_stream = stream; }

void mxq_print(mxq_ctx *ctx, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(ctx->out_stream, fmt, ap);
    va_end(ap);
    fflush(ctx->out_stream);
}

int mxq_ctx_rank(const mxq_ctx *ctx) { return ctx->rank; }

void mxq_ctx_set_rank(mxq_ctx *ctx, int rank, int nranks)
{
    ctx->rank = rank;
    ctx->nranks = nranks;
}

static const char *level_tag(mxq_log_level level)
{
    switch (level) {
    case MXQ_LOG_ERROR: return "ERROR";
    case MXQ_LOG_WARN: return "WARN ";
    case MXQ_LOG_INFO: return "INFO ";
    case MXQ_LOG_DEBUG: return "DEBUG";
    }
    return "?    ";
}

void mxq_log(mxq_ctx *ctx, mxq_log_level level, const char *fmt, ...)
{
    if (level > ctx->level)
        return;
    /* INFO from every rank of a 64-rank job is noise; rank 0 speaks for all
     * unless asked otherwise. Warnings and errors always get through. */
    if (level >= MXQ_LOG_INFO && ctx->rank != 0 && !ctx->all_ranks_info)
        return;
    char line[4096];
    int n = 0;
    if (ctx->nranks > 1)
        n = snprintf(line, sizeof(line), "[%8.2fs r%d] %s ", mxq_time_now() - ctx->t0, ctx->rank,
                     level_tag(level));
    else
        n = snprintf(line, sizeof(line), "[%8.2fs] %s ", mxq_time_now() - ctx->t0, level_tag(level));
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < sizeof(line))
        vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    /* One fputs per line so that lines of different ranks sharing a terminal
     * do not interleave mid-line. */
    size_t len = strlen(line);
    if (len + 1 < sizeof(line)) {
        line[len] = '\n';
        line[len + 1] = '\0';
    }
    fputs(line, ctx->log_stream);
    fflush(ctx->log_stream);
}

static const char *short_path(const char *file)
{
    /* __FILE__ may be absolute or relative to the build dir; keep from src/ on. */
    const char *p = strstr(file, "src/");
    return p ? p : file;
}

void mxq_error_set(mxq_ctx *ctx, mxq_status code, const char *file, int line, const char *fmt, ...)
{
    if (ctx->err_code != MXQ_OK)
        return; /* the first error is the cause; later ones are consequences */
    ctx->err_code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->err_message, sizeof(ctx->err_message), fmt, ap);
    va_end(ap);
    snprintf(ctx->err_origin, sizeof(ctx->err_origin), "%s:%d", short_path(file), line);
    ctx->trace_len = 0;
    ctx->reported_elsewhere = 0;
}

void mxq_error_context(mxq_ctx *ctx, const char *fmt, ...)
{
    if (ctx->err_code == MXQ_OK)
        return;
    /* The cause stays at the end; each caller's context goes in front:
     * "layer 3 mlp.down_proj: GPTQ: Cholesky ... failed". */
    char prefix[4608]; /* may hold a path */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    size_t plen = strlen(prefix), mlen = strlen(ctx->err_message), cap = sizeof(ctx->err_message) - 1;
    if (plen + 2 >= cap)
        return;
    if (plen + 2 + mlen > cap)
        mlen = cap - plen - 2; /* keep the context; the cause's tail goes */
    memmove(ctx->err_message + plen + 2, ctx->err_message, mlen);
    memcpy(ctx->err_message, prefix, plen);
    memcpy(ctx->err_message + plen, ": ", 2);
    ctx->err_message[plen + 2 + mlen] = '\0';
}

void mxq_error_mark_reported_elsewhere(mxq_ctx *ctx)
{
    ctx->reported_elsewhere = 1;
}

void mxq_error_trace(mxq_ctx *ctx, const char *file, int line)
{
    if (ctx->trace_len < MXQ_TRACE_MAX) {
        snprintf(ctx->trace[ctx->trace_len], sizeof(ctx->trace[0]), "%s:%d", short_path(file), line);
        ctx->trace_len++;
    }
}

mxq_status mxq_error_code(const mxq_ctx *ctx) { return ctx->err_code; }
const char *mxq_error_message(const mxq_ctx *ctx) { return ctx->err_message; }
const char *mxq_error_origin(const mxq_ctx *ctx) { return ctx->err_origin; }

void mxq_error_print(mxq_ctx *ctx, FILE *stream, const char *prefix)
{
    if (ctx->err_code == MXQ_OK)
        return;
    /* One explanation per failure: ranks that only stopped because another
     * failed, or that hit the same error as a lower failing rank, stay quiet. */
    if ((ctx->reported_elsewhere || ctx->err_code == MXQ_ERR_REMOTE) && ctx->level < MXQ_LOG_DEBUG)
        return;
    char rank_tag[32] = "";
    if (ctx->nranks > 1)
        snprintf(rank_tag, sizeof(rank_tag), "[rank %d] ", ctx->rank);
    fprintf(stream, "%s%s: error: %s [%s]\n", rank_tag, prefix ? prefix : "mxq", ctx->err_message,
            ctx->err_origin);
    if (ctx->level >= MXQ_LOG_DEBUG) {
        for (int i = 0; i < ctx->trace_len; i++)
            fprintf(stream, "    called from %s\n", ctx->trace[i]);
    }
    fflush(stream);
}

void mxq_error_clear(mxq_ctx *ctx)
{
    ctx->err_code = MXQ_OK;
    ctx->err_message[0] = '\0';
    ctx->err_origin[0] = '\0';
    ctx->trace_len = 0;
    ctx->reported_elsewhere = 0;
}

int mxq_ctx_set_fault(mxq_ctx *ctx, const char *spec)
{
    ctx->fault_list = 0;
    ctx->n_listed = 0;
    ctx->fault_rank = -2;
    ctx->fault_fired = 0;
    if (!spec || !*spec)
        return 0;
    if (strcmp(spec, "list") == 0) {
        ctx->fault_list = 1;
        return 0;
    }
    const char *colon = strchr(spec, ':');
    char *end = NULL;
    /* digits only: strtol alone would take " 1" and "+1" */
    const int digits = spec[0] >= '0' && spec[0] <= '9';
    long rank = spec[0] == '*' ? -1 : digits ? strtol(spec, &end, 10) : -2;
    const int rank_ok = spec[0] == '*' ? colon == spec + 1 : digits && end == colon && rank >= 0 && rank < INT_MAX;
    if (!colon || !rank_ok || !colon[1] || strlen(colon + 1) >= sizeof(ctx->fault_step))
        return -1;
    ctx->fault_rank = (int)rank;
    snprintf(ctx->fault_step, sizeof(ctx->fault_step), "%s", colon + 1);
    return 0;
}

int mxq_ctx_fault_missed(const mxq_ctx *ctx)
{
    if (ctx->fault_rank == -2 || ctx->fault_fired)
        return 0;
    return ctx->fault_rank == -1 || ctx->fault_rank == ctx->rank || (ctx->rank == 0 && ctx->fault_rank >= ctx->nranks);
}

void mxq_ctx_set_stop_flag(mxq_ctx *ctx, const volatile sig_atomic_t *flag) { ctx->stop_flag = flag; }

static const char *signal_name(int sig)
{
    switch (sig) {
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGUSR1: return "SIGUSR1";
    }
    return "a signal";
}

mxq_status mxq_fault_point(mxq_ctx *ctx, const char *step)
{
    if (ctx->stop_flag && *ctx->stop_flag) {
        /* the same words on every rank: one of them prints them */
        mxq_log(ctx, MXQ_LOG_DEBUG, "stop request seen at step '%s'", step);
        mxq_error_set(ctx, MXQ_ERR_STOPPED, __FILE__, __LINE__, "stopped by %s, at a safe point",
                      signal_name((int)*ctx->stop_flag));
        return MXQ_ERR_STOPPED;
    }
    return mxq_fault_inject(ctx, step);
}

mxq_status mxq_fault_inject(mxq_ctx *ctx, const char *step)
{
    if (ctx->fault_list) {
        for (int i = 0; i < ctx->n_listed; i++)
            if (strcmp(ctx->listed[i], step) == 0)
                return MXQ_OK;
        if (ctx->n_listed < (int)(sizeof(ctx->listed) / sizeof(ctx->listed[0])))
            snprintf(ctx->listed[ctx->n_listed++], sizeof(ctx->listed[0]), "%s", step);
        char line[160]; /* one write: lines of ranks sharing a stream stay whole */
        snprintf(line, sizeof(line), "mxq fault-point: rank %d step %s\n", ctx->rank, step);
        fputs(line, ctx->log_stream);
        fflush(ctx->log_stream);
        return MXQ_OK;
    }
    if (ctx->fault_rank == -2 || ctx->fault_fired || strcmp(step, ctx->fault_step) != 0)
        return MXQ_OK;
    if (ctx->fault_rank != -1 && ctx->fault_rank != ctx->rank)
        return MXQ_OK;
    ctx->fault_fired = 1;
    mxq_error_set(ctx, MXQ_ERR_INTERNAL, __FILE__, __LINE__, "injected fault on rank %d at step '%s'", ctx->rank,
                  step);
    return MXQ_ERR_INTERNAL;
}
