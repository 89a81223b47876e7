/* The library's communicator and the agreement mechanism. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/parallel.h"

mxq_status mxq_dist_create(mxq_ctx *ctx, MPI_Comm parent, mxq_dist *out)
{
    mxq_status status = MXQ_OK;
    out->comm = MPI_COMM_NULL;
    CALL_MPI(ctx, MPI_Comm_dup(parent, &out->comm));
    CALL_MPI(ctx, MPI_Comm_rank(out->comm, &out->rank));
    CALL_MPI(ctx, MPI_Comm_size(out->comm, &out->size));
    /* Errors come back as return codes instead of aborting the job, so that
     * they can be reported with context. */
    CALL_MPI(ctx, MPI_Comm_set_errhandler(out->comm, MPI_ERRORS_RETURN));
    mxq_ctx_set_rank(ctx, out->rank, out->size);
fail:
    return status;
}

void mxq_dist_free(mxq_dist *dist)
{
    if (dist->comm != MPI_COMM_NULL)
        MPI_Comm_free(&dist->comm);
    dist->comm = MPI_COMM_NULL;
}

mxq_status mxq_agree(mxq_ctx *ctx, const mxq_dist *dist, const char *step, mxq_status local)
{
    mxq_status status = MXQ_OK;
    if (local == MXQ_OK)
        local = mxq_fault_point(ctx, step);
    /* [0]: lowest failing rank; [1]: 1 only if every rank failed */
    int mine[2] = {local == MXQ_OK ? INT_MAX : dist->rank, local == MXQ_OK ? 0 : 1};
    int agreed[2] = {INT_MAX, 0};
    CALL_MPI(ctx, MPI_Allreduce(mine, agreed, 2, MPI_INT, MPI_MIN, dist->comm));
    if (local != MXQ_OK) {
        if (agreed[1] == 1 && dist->rank != 0)
            mxq_error_mark_reported_elsewhere(ctx);
        return local;
    }
    CHECK(ctx, agreed[0] == INT_MAX, MXQ_ERR_REMOTE, "stopped because rank %d failed at step '%s' (see its message)",
          agreed[0], step);
fail:
    return status;
}

/* Rank 0's receive counts and offsets, and the buffer they describe. */
static mxq_status gather_layout(mxq_ctx *ctx, const mxq_dist *dist, const int *counts, char **all, int *displs)
{
    mxq_status status = MXQ_OK;
    long long total = 0;
    for (int r = 0; r < dist->size; r++) {
        displs[r] = (int)total;
        total += counts[r];
    }
    CHECK(ctx, total < INT_MAX, MXQ_ERR_ARG, "%lld bytes to gather on rank 0: more than one MPI message holds", total);
    *all = malloc((size_t)total + 1);
    CHECK_ALLOC(ctx, *all, (size_t)total + 1, "the gathered data");
    (*all)[total] = '\0';
fail:
    return status;
}

mxq_status mxq_gather_bytes(mxq_ctx *ctx, const mxq_dist *dist, const char *step, const void *data, size_t len,
                            char **all, size_t **lens)
{
    mxq_status status = MXQ_OK;
    int *counts = NULL, *displs = NULL;
    *all = NULL;
    *lens = NULL;
    CHECK_AGREED(ctx, dist, step, len < INT_MAX, MXQ_ERR_ARG,
                 "%zu bytes to gather from one rank: more than one MPI message holds", len);
    int count = (int)len;
    mxq_status local = MXQ_OK;
    if (dist->rank == 0) {
        counts = calloc((size_t)dist->size, sizeof(int));
        displs = calloc((size_t)dist->size, sizeof(int));
        *lens = calloc((size_t)dist->size, sizeof(size_t));
        local = counts && displs && *lens ? MXQ_OK : MXQ_ERR_NOMEM;
        if (local != MXQ_OK)
            mxq_error_set(ctx, local, __FILE__, __LINE__, "out of memory for the gather counts of %d ranks",
                          dist->size);
    }
    AGREE(ctx, dist, step, local);
    CALL_MPI(ctx, MPI_Gather(&count, 1, MPI_INT, counts, 1, MPI_INT, 0, dist->comm));
    local = dist->rank == 0 ? gather_layout(ctx, dist, counts, all, displs) : MXQ_OK;
    AGREE(ctx, dist, step, local);
    CALL_MPI(ctx, MPI_Gatherv(data, count, MPI_BYTE, *all, counts, displs, MPI_BYTE, 0, dist->comm));
    for (int r = 0; dist->rank == 0 && r < dist->size; r++)
        (*lens)[r] = (size_t)counts[r];
fail:
    if (status != MXQ_OK) {
        free(*all);
        free(*lens);
        *all = NULL;
        *lens = NULL;
    }
    free(counts);
    free(displs);
    return status;
}
