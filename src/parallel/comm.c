/* The library's communicator and the agreement mechanism. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "parallel/parallel.h"

void mxq_mpi_fatal(mxq_ctx *ctx, MPI_Comm comm, int mpi_rc, const char *file, int line, const char *what)
{
    char text[MPI_MAX_ERROR_STRING + 1] = {0};
    int len = 0;
    if (MPI_Error_string(mpi_rc, text, &len) != MPI_SUCCESS)
        snprintf(text, sizeof(text), "MPI error code %d", mpi_rc);
    mxq_error_clear(ctx);
    mxq_error_set(ctx, MXQ_ERR_MPI, file, line, "%s failed: %s; aborting the job", what, text);
    mxq_error_print(ctx, stderr, "mxq");
    MPI_Abort(comm, 1);
}

mxq_status mxq_dist_create(mxq_ctx *ctx, MPI_Comm parent, mxq_dist *out)
{
    mxq_status status = MXQ_OK;
    out->comm = MPI_COMM_NULL;
    CALL_MPI(ctx, parent, MPI_Comm_dup(parent, &out->comm));
    CALL_MPI(ctx, parent, MPI_Comm_rank(out->comm, &out->rank));
    CALL_MPI(ctx, parent, MPI_Comm_size(out->comm, &out->size));
    /* Errors come back as return codes, so that mxq_mpi_fatal can say which
     * call failed, where, before it aborts. */
    CALL_MPI(ctx, parent, MPI_Comm_set_errhandler(out->comm, MPI_ERRORS_RETURN));
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

/* A fingerprint of this rank's error message, in [0, 2^30). */
static int message_hash(const mxq_ctx *ctx)
{
    unsigned h = 2166136261u;
    for (const char *p = mxq_error_message(ctx); *p; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    return (int)(h & 0x3fffffffu);
}

mxq_status mxq_agree(mxq_ctx *ctx, const mxq_dist *dist, const char *step, mxq_status local)
{
    mxq_status status = MXQ_OK;
    if (local == MXQ_OK && step)
        local = mxq_fault_point(ctx, step);
    /* Reduced with MIN: [0] the lowest failing rank; [1], INT_MAX - [2]: the
     * smallest and largest fingerprint of the failing ranks' messages; [3]
     * 0 if a rank stopped on request. */
    const int failed = local != MXQ_OK, h = failed ? message_hash(ctx) : 0;
    int mine[4] = {failed ? dist->rank : INT_MAX, failed ? h : INT_MAX, failed ? INT_MAX - h : INT_MAX,
                   local != MXQ_ERR_STOPPED};
    int agreed[4];
    CALL_MPI(ctx, dist->comm, MPI_Allreduce(mine, agreed, 4, MPI_INT, MPI_MIN, dist->comm));
    if (failed) {
        /* The failing ranks all have the same message: the lowest of them
         * speaks for all. Different messages are each printed. */
        if (agreed[1] == INT_MAX - agreed[2] && dist->rank != agreed[0])
            mxq_error_mark_reported_elsewhere(ctx);
        return local;
    }
    if (agreed[0] != INT_MAX && !agreed[3]) { /* every rank stops as asked: the job can be resumed */
        mxq_error_set(ctx, MXQ_ERR_STOPPED, __FILE__, __LINE__, "stopped because rank %d was asked to stop",
                      agreed[0]);
        mxq_error_mark_reported_elsewhere(ctx);
        return MXQ_ERR_STOPPED;
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
    CALL_MPI(ctx, dist->comm, MPI_Gather(&count, 1, MPI_INT, counts, 1, MPI_INT, 0, dist->comm));
    AGREE(ctx, dist, data_step, dist->rank == 0 ? gather_layout(ctx, dist, counts, all, displs) : MXQ_OK);
    CALL_MPI(ctx, dist->comm, MPI_Gatherv(data, count, MPI_BYTE, *all, counts, displs, MPI_BYTE, 0, dist->comm));
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

/* A number at the start of a small file, or 0 (absent, "max", garbage). */
static double file_number(const char *path)
{
    FILE *f = fopen(path, "r");
    char text[64] = "";
    if (!f)
        return 0;
    const int ok = fgets(text, sizeof(text), f) != NULL;
    fclose(f);
    char *end = NULL;
    const double v = ok ? strtod(text, &end) : 0;
    return end && end != text && v > 0 ? v : 0;
}

/* The memory limit of this process's cgroup, or 0 if none is set: v2 (the
 * "0::/path" line of /proc/self/cgroup, as Slurm's cgroup plugin and
 * systemd set it, or the namespace root), else v1's memory controller. */
static double cgroup_limit_bytes(void)
{
    char line[512], path[600];
    double limit = file_number("/sys/fs/cgroup/memory.max");
    FILE *f = fopen("/proc/self/cgroup", "r");
    while (f && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = '\0';
        const char *v2 = strncmp(line, "0::", 3) == 0 ? line + 3 : NULL, *v1 = strstr(line, ":memory:");
        if (v2)
            snprintf(path, sizeof(path), "/sys/fs/cgroup%s/memory.max", v2);
        else if (v1)
            snprintf(path, sizeof(path), "/sys/fs/cgroup/memory%s/memory.limit_in_bytes", v1 + 8);
        const double here = v1 || v2 ? file_number(path) : 0;
        if (here > 0 && (limit == 0 || here < limit))
            limit = here;
    }
    if (f)
        fclose(f);
    return limit;
}

mxq_status mxq_memory_per_rank(mxq_ctx *ctx, const mxq_dist *dist, double *bytes)
{
    mxq_status status = MXQ_OK;
    MPI_Comm node = MPI_COMM_NULL;
    int on_node = 1;
    CALL_MPI(ctx, dist->comm, MPI_Comm_split_type(dist->comm, MPI_COMM_TYPE_SHARED, dist->rank, MPI_INFO_NULL, &node));
    CALL_MPI(ctx, dist->comm, MPI_Comm_size(node, &on_node));
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double node_bytes = pages > 0 && page > 0 ? (double)pages * (double)page : 0;
    const double limit = cgroup_limit_bytes();
    if (limit > 0 && (node_bytes == 0 || limit < node_bytes))
        node_bytes = limit;
    double mine = node_bytes / on_node;
    CALL_MPI(ctx, dist->comm, MPI_Allreduce(&mine, bytes, 1, MPI_DOUBLE, MPI_MIN, dist->comm));
fail:
    if (node != MPI_COMM_NULL)
        MPI_Comm_free(&node);
    return status;
}
