/* Summing a layer's calibration statistics over the ranks that each saw a
 * share of the calibration sequences. */
#include "parallel/parallel.h"

/* MPI counts are int: a 70B down_proj Hessian is 822M doubles, and one
 * message of it would make the MPI library stage gigabytes. */
#define REDUCE_SEGMENT ((size_t)1 << 24) /* doubles: 128 MB */

static mxq_status reduce_doubles(mxq_ctx *ctx, const mxq_dist *dist, double *data, size_t n, MPI_Op op, int root)
{
    mxq_status status = MXQ_OK;
    for (size_t at = 0; at < n; at += REDUCE_SEGMENT) {
        const int count = (int)(n - at < REDUCE_SEGMENT ? n - at : REDUCE_SEGMENT);
        void *send = dist->rank == root ? MPI_IN_PLACE : (void *)(data + at);
        CALL_MPI(ctx, dist->comm, MPI_Reduce(send, data + at, count, MPI_DOUBLE, op, root, dist->comm));
    }
fail:
    return status;
}

mxq_status mxq_input_stats_reduce(mxq_ctx *ctx, const mxq_dist *dist, mxq_input_stats *s, int root)
{
    mxq_status status = MXQ_OK;
    const size_t f = (size_t)s->features;
    /* The whole matrix, though only its upper triangle is filled yet:
     * sending the triangle alone would need packing it, which is left for
     * when the reduction shows in a profile (on one node it hides in the
     * calibration step's time). */
    CALL(ctx, reduce_doubles(ctx, dist, s->hessian, f * f, MPI_SUM, root));
    CALL(ctx, reduce_doubles(ctx, dist, s->abs_sum, f, MPI_SUM, root));
    CALL(ctx, reduce_doubles(ctx, dist, s->abs_max, f, MPI_MAX, root));
    CALL(ctx, reduce_doubles(ctx, dist, &s->n_tokens, 1, MPI_SUM, root));
fail:
    return status;
}

mxq_status mxq_layer_stats_reduce(mxq_ctx *ctx, const mxq_dist *dist, mxq_layer_stats *stats, int root)
{
    mxq_status status = MXQ_OK;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        CALL(ctx, mxq_input_stats_reduce(ctx, dist, &stats->input[i], root));
fail:
    return status;
}

#define BCAST_SEGMENT ((size_t)1 << 26) /* floats: 256 MB */

mxq_status mxq_bcast_floats(mxq_ctx *ctx, const mxq_dist *dist, float *data, size_t n, int root)
{
    mxq_status status = MXQ_OK;
    for (size_t at = 0; at < n; at += BCAST_SEGMENT) {
        const int count = (int)(n - at < BCAST_SEGMENT ? n - at : BCAST_SEGMENT);
        CALL_MPI(ctx, dist->comm, MPI_Bcast(data + at, count, MPI_FLOAT, root, dist->comm));
    }
fail:
    return status;
}
