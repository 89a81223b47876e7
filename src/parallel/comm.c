/* The library's communicator and the agreement mechanism. */
#include <limits.h>
#include <stdio.h>
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
    if (local == MXQ_OK && step)
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
          agreed[0], step ? step : "commit");
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

/* Rank 0's count array (the first of the gather's two agreed steps). */
static mxq_status gather_counts_alloc(mxq_ctx *ctx, const mxq_dist *dist, size_t len, int **counts, int **displs,
                                      size_t **lens)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, len < INT_MAX, MXQ_ERR_ARG, "%zu bytes to gather from one rank: more than one MPI message holds", len);
    if (dist->rank != 0)
        return MXQ_OK;
    *counts = calloc((size_t)dist->size, sizeof(int));
    *displs = calloc((size_t)dist->size, sizeof(int));
    *lens = calloc((size_t)dist->size, sizeof(size_t));
    CHECK(ctx, *counts && *displs && *lens, MXQ_ERR_NOMEM, "out of memory for the gather counts of %d ranks",
          dist->size);
fail:
    return status;
}

mxq_status mxq_gather_bytes(mxq_ctx *ctx, const mxq_dist *dist, const char *step, const void *data, size_t len,
                            char **all, size_t **lens)
{
    mxq_status status = MXQ_OK;
    int *counts = NULL, *displs = NULL;
    char counts_step[128], data_step[128];
    snprintf(counts_step, sizeof(counts_step), "%s.counts", step);
    snprintf(data_step, sizeof(data_step), "%s.data", step);
    *all = NULL;
    *lens = NULL;
    AGREE(ctx, dist, counts_step, gather_counts_alloc(ctx, dist, len, &counts, &displs, lens));
    int count = (int)len;
    CALL_MPI(ctx, MPI_Gather(&count, 1, MPI_INT, counts, 1, MPI_INT, 0, dist->comm));
    AGREE(ctx, dist, data_step, dist->rank == 0 ? gather_layout(ctx, dist, counts, all, displs) : MXQ_OK);
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
