#include <limits.h>
#include <stdlib.h>

#include "check.h"
#include "mxq/dist.h"

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

mxq_status mxq_dist_agree(mxq_ctx *ctx, const mxq_dist *dist, mxq_status local)
{
    mxq_status status = MXQ_OK;
    /* [0]: lowest failing rank; [1]: 1 only if every rank failed */
    int mine[2] = {local == MXQ_OK ? INT_MAX : dist->rank, local == MXQ_OK ? 0 : 1};
    int agreed[2] = {INT_MAX, 0};
    CALL_MPI(ctx, MPI_Allreduce(mine, agreed, 2, MPI_INT, MPI_MIN, dist->comm));
    if (local != MXQ_OK) {
        if (agreed[1] == 1 && dist->rank != 0)
            mxq_error_mark_reported_elsewhere(ctx);
        return local;
    }
    CHECK(ctx, agreed[0] == INT_MAX, MXQ_ERR_REMOTE, "stopped because rank %d failed (see its message)", agreed[0]);
fail:
    return status;
}

mxq_status mxq_partition_layers(mxq_ctx *ctx, const mxq_model_config *cfg, int nranks, int *first)
{
    mxq_status status = MXQ_OK;
    double *best = NULL;
    int *cut = NULL;
    const int L = cfg->n_layers;
    CHECK(ctx, nranks >= 1, MXQ_ERR_ARG, "need at least one rank");
    CHECK(ctx, nranks <= L, MXQ_ERR_ARG,
          "%d ranks but the model has only %d decoder layers: every rank owns at least one layer, so use at most %d "
          "ranks",
          nranks, L, L);

    const double layer = (double)mxq_config_layer_params(cfg);
    const double embed = (double)mxq_config_embedding_params(cfg);
    /* Load of a rank owning layers [a, b), as a function of its position. */
#define LOAD(r, a, b) ((double)((b) - (a)) * layer + ((r) == 0 ? embed : 0.0) + ((r) == nranks - 1 ? embed : 0.0))
    /* best[r][b]: smallest possible maximum load when ranks 0..r own layers [0, b). */
    best = malloc((size_t)nranks * (size_t)(L + 1) * sizeof(double));
    cut = malloc((size_t)nranks * (size_t)(L + 1) * sizeof(int));
    CHECK_ALLOC(ctx, best && cut, (size_t)nranks * (L + 1) * sizeof(double), "the layer partition table");
    for (int b = 0; b <= L; b++) {
        best[b] = b >= 1 ? LOAD(0, 0, b) : 1e300;
        cut[b] = 0;
    }
    for (int r = 1; r < nranks; r++)
        for (int b = 0; b <= L; b++) {
            double value = 1e300;
            int arg = -1;
            for (int a = r; a < b; a++) { /* ranks 0..r-1 hold [0, a), at least one layer each */
                double prev = best[(size_t)(r - 1) * (L + 1) + a];
                double here = LOAD(r, a, b);
                double m = prev > here ? prev : here;
                if (m < value) {
                    value = m;
                    arg = a;
                }
            }
            best[(size_t)r * (L + 1) + b] = value;
            cut[(size_t)r * (L + 1) + b] = arg;
        }
#undef LOAD
    first[nranks] = L;
    for (int r = nranks - 1, b = L; r >= 0; r--) {
        int a = r == 0 ? 0 : cut[(size_t)r * (L + 1) + b];
        first[r] = a;
        b = a;
    }
fail:
    free(best);
    free(cut);
    return status;
}
