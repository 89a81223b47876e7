/* The one set of error-propagation macros used across the library.
 *
 * Convention: every fallible function declares `mxq_status status = MXQ_OK;`,
 * has a single `fail:` label that releases what it owns, and returns status.
 * The macros jump there after recording file, line and a message in ctx.
 */
#ifndef MXQ_CHECK_H
#define MXQ_CHECK_H

#include "mxq/core.h"

/* Raise `code` with a formatted message unless `cond` holds. */
#define CHECK(ctx, cond, code, ...)                                               \
    do {                                                                          \
        if (!(cond)) {                                                            \
            mxq_error_set((ctx), (code), __FILE__, __LINE__, __VA_ARGS__);        \
            status = (code);                                                      \
            goto fail;                                                            \
        }                                                                         \
    } while (0)

/* Unconditional failure. */
#define FAIL(ctx, code, ...) CHECK(ctx, 0, code, __VA_ARGS__)

/* Propagate the status of another mxq call, adding this call site to the trace. */
#define CALL(ctx, expr)                                                           \
    do {                                                                          \
        mxq_status call_status_ = (expr);                                         \
        if (call_status_ != MXQ_OK) {                                             \
            mxq_error_trace((ctx), __FILE__, __LINE__);                           \
            status = call_status_;                                                \
            goto fail;                                                            \
        }                                                                         \
    } while (0)

/* CALL, and on failure put `<context>: ` in front of the error's message, so
 * that what failed deep down says where it happened:
 *   CALL_IN(ctx, mxq_gptq_quantize(...), "layer %d %s", layer, name);
 * gives "layer 3 mlp.down_proj: GPTQ: Cholesky ... failed". */
#define CALL_IN(ctx, expr, ...)                                                   \
    do {                                                                          \
        mxq_status call_status_ = (expr);                                         \
        if (call_status_ != MXQ_OK) {                                             \
            mxq_error_trace((ctx), __FILE__, __LINE__);                           \
            mxq_error_context((ctx), __VA_ARGS__);                                \
            status = call_status_;                                                \
            goto fail;                                                            \
        }                                                                         \
    } while (0)

/* Allocation that fails with a message naming what was being allocated. */
#define CHECK_ALLOC(ctx, ptr, bytes, what)                                        \
    CHECK(ctx, (ptr), MXQ_ERR_NOMEM, "out of memory allocating %zu bytes for %s", \
          (size_t)(bytes), (what))

/* LAPACK(E) routines report through `info`: <0 bad argument, >0 numerical
 * failure (e.g. matrix not positive definite at that minor). `what` names the
 * routine and the operand, e.g. "dpotrf of the Hessian of layers.3.mlp.up_proj". */
#define CALL_LAPACK(ctx, info_expr, what)                                         \
    do {                                                                          \
        long long lapack_info_ = (long long)(info_expr);                          \
        if (lapack_info_ != 0) {                                                  \
            mxq_error_set((ctx), MXQ_ERR_LAPACK, __FILE__, __LINE__,              \
                          "%s failed (LAPACK info=%lld)", (what), lapack_info_);  \
            status = MXQ_ERR_LAPACK;                                              \
            goto fail;                                                            \
        }                                                                         \
    } while (0)

/* Test-only fault injection (mxq_ctx_set_fault): fails with "injected
 * fault on rank R at step 'S'" when this rank is told to fail at `step`. Every
 * agreement point is such a step; so are the places inside pipelines where a
 * rank can fail while the others wait for it. */
mxq_status mxq_fault_point(mxq_ctx *ctx, const char *step);
/* The same, minus the stop requests (mxq_ctx_set_stop_flag) every fault
 * point also answers: for a step that must finish once begun. */
mxq_status mxq_fault_inject(mxq_ctx *ctx, const char *step);

/* Another rank hit the same error and prints it (mxq_agree decides which):
 * mxq_error_print stays quiet here (below DEBUG level). Errors of code
 * MXQ_ERR_REMOTE are always treated so. */
void mxq_error_mark_reported_elsewhere(mxq_ctx *ctx);

#endif
