/* The parallel layer: the library's own communicator, agreement on failure
 * ("check locally, fail everywhere"), the assignment of decoder layers to
 * ranks, and the rank-to-rank pipeline (pipeline.h). Internal. */
#ifndef MXQ_PARALLEL_H
#define MXQ_PARALLEL_H

#include <mpi.h>

#include "core/check.h"
#include "mxq/core.h"
#include "mxq/model.h"
#include "mxq/quantize.h"

/* An MPI call. An MPI error is not recoverable: what the other ranks saw of
 * the failed call is unknown, so no agreement can follow it. The failing
 * rank says what failed and aborts the job (MPI_Abort on `comm`): the one
 * way to be sure that no rank waits forever. */
void mxq_mpi_fatal(mxq_ctx *ctx, MPI_Comm comm, int mpi_rc, const char *file, int line, const char *what);
#define CALL_MPI(ctx, comm, expr)                                                 \
    do {                                                                          \
        int mpi_rc_ = (expr);                                                     \
        if (mpi_rc_ != MPI_SUCCESS) {                                             \
            mxq_mpi_fatal((ctx), (comm), mpi_rc_, __FILE__, __LINE__, #expr);     \
            status = MXQ_ERR_MPI;                                                 \
            goto fail;                                                            \
        }                                                                         \
    } while (0)

/* The library never talks on the caller's communicator: it duplicates it. */
typedef struct {
    MPI_Comm comm;
    int rank;
    int size;
} mxq_dist;

mxq_status mxq_dist_create(mxq_ctx *ctx, MPI_Comm parent, mxq_dist *out);
void mxq_dist_free(mxq_dist *dist);

/* The one agreement mechanism, in the spirit of PETSc's PetscCheck with a
 * communicator. Collective: every rank passes its local status and goes on
 * only if every rank succeeded. A rank that failed gets its own status
 * back; the others get MXQ_ERR_REMOTE ("stopped because rank R failed at
 * step S"), so no rank goes on to a collective that a failed rank will never
 * join. Ranks that failed with the same message leave it to the lowest of
 * them to print (theirs are marked as reported elsewhere); different
 * messages are each printed by their rank. A stop request (MXQ_ERR_STOPPED)
 * on any rank stops every rank with that status, quietly but for the one
 * that saw it. `step` names the point in the job
 * ("quantize.load", ...): it is what fault injection (mxq_ctx_set_fault)
 * matches, and a rank told to fail there fails here. */
mxq_status mxq_agree(mxq_ctx *ctx, const mxq_dist *dist, const char *step, mxq_status local);

/* Run `expr` on this rank, then agree on its status. */
#define AGREE(ctx, dist, step, expr) CALL(ctx, mxq_agree((ctx), (dist), (step), (expr)))

/* Check `cond` on this rank; if it fails anywhere, fail everywhere. */
#define CHECK_AGREED(ctx, dist, step, cond, code, ...)                           \
    do {                                                                         \
        mxq_status agreed_local_ = MXQ_OK;                                       \
        if (!(cond)) {                                                           \
            mxq_error_set((ctx), (code), __FILE__, __LINE__, __VA_ARGS__);       \
            agreed_local_ = (code);                                              \
        }                                                                        \
        CALL(ctx, mxq_agree((ctx), (dist), (step), agreed_local_));              \
    } while (0)

/* Contiguous layer ranges balanced by parameter count: rank r owns layers
 * [first[r], first[r+1]); rank 0 also holds the embedding and the last rank
 * the final norm and lm_head, whose parameters count towards their load.
 * Every rank gets at least one layer; more ranks than layers is an error. */
mxq_status mxq_partition_layers(mxq_ctx *ctx, const mxq_model_config *cfg, int nranks, int *first);

/* Gather `len` bytes from every rank onto rank 0, in rank order. On rank 0
 * *all (malloc'd, NUL-terminated) and lens[size] are the caller's to free.
 * Collective and safe: the receive buffers are agreed before any data
 * moves. */
mxq_status mxq_gather_bytes(mxq_ctx *ctx, const mxq_dist *dist, const char *step, const void *data, size_t len,
                            char **all, size_t **lens);

/* The memory one rank may use: the node's (or its cgroup's limit, if lower)
 * divided by the ranks on the node; the smallest over all ranks.
 * Collective. */
mxq_status mxq_memory_per_rank(mxq_ctx *ctx, const mxq_dist *dist, double *bytes);

/* Sum statistics gathered on shares of the calibration set onto `root`
 * (Hessians and |x| sums added, |x| maxima taken), in segments. Collective;
 * the other ranks' statistics are left as they were. */
mxq_status mxq_layer_stats_reduce(mxq_ctx *ctx, const mxq_dist *dist, mxq_layer_stats *stats, int root);
/* The same for one input's statistics. */
mxq_status mxq_input_stats_reduce(mxq_ctx *ctx, const mxq_dist *dist, mxq_input_stats *stats, int root);

/* MPI_Bcast of n floats from root, in segments (n may pass INT_MAX).
 * Collective. */
mxq_status mxq_bcast_floats(mxq_ctx *ctx, const mxq_dist *dist, float *data, size_t n, int root);

#endif
