#include <stdio.h>

#include "mpi_main.h"

int tu_mpi_main(int argc, char **argv, const struct CMUnitTest *tests, size_t n_tests, mxq_ctx **ctx,
                mxq_dist *dist)
{
    MPI_Init(&argc, &argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank != 0 && !freopen("/dev/null", "w", stdout))
        return 1;
    if (mxq_ctx_create(ctx) != MXQ_OK || mxq_dist_create(*ctx, MPI_COMM_WORLD, dist) != MXQ_OK)
        return 1;
    mxq_ctx_set_log_level(*ctx, MXQ_LOG_ERROR);
    int failed = _cmocka_run_group_tests("tests", tests, n_tests, NULL, NULL);
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    mxq_dist_free(dist);
    mxq_ctx_destroy(*ctx);
    MPI_Finalize();
    return failed ? 1 : 0;
}
