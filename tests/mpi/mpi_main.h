/* main() of a test program that is itself an MPI job (mpirun -n 2, -n 3):
 * MPI and the library's context and communicator set up, rank 0 alone
 * printing the TAP, the tests run on every rank, and the job failing if
 * any rank saw a failure. */
#ifndef MXQ_TEST_MPI_MAIN_H
#define MXQ_TEST_MPI_MAIN_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "mxq/mxq.h"
#include "parallel/parallel.h"

int tu_mpi_main(int argc, char **argv, const struct CMUnitTest *tests, size_t n_tests, mxq_ctx **ctx,
                mxq_dist *dist);

#endif
