/* Distribution over MPI ranks: the library's own communicator, agreement on
 * failure, and the assignment of decoder layers to ranks. */
#ifndef MXQ_DIST_H
#define MXQ_DIST_H

#include <mpi.h>

#include "mxq/core.h"
#include "mxq/model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The library never talks on the caller's communicator: it duplicates it. */
typedef struct {
    MPI_Comm comm;
    int rank;
    int size;
} mxq_dist;

mxq_status mxq_dist_create(mxq_ctx *ctx, MPI_Comm parent, mxq_dist *out);
void mxq_dist_free(mxq_dist *dist);

/* Collective: every rank passes its local status and gets back MXQ_OK only
 * if all ranks succeeded. A rank that failed gets its own status back; the
 * others get MXQ_ERR_REMOTE with "rank R failed" recorded, so no rank goes
 * on to a collective that a failed rank will never join. */
mxq_status mxq_dist_agree(mxq_ctx *ctx, const mxq_dist *dist, mxq_status local);

/* Contiguous layer ranges balanced by parameter count: rank r owns layers
 * [first[r], first[r+1]); rank 0 also holds the embedding and the last rank
 * the final norm and lm_head, whose parameters count towards their load.
 * Every rank gets at least one layer; more ranks than layers is an error. */
mxq_status mxq_partition_layers(mxq_ctx *ctx, const mxq_model_config *cfg, int nranks, int *first);

#ifdef __cplusplus
}
#endif

#endif
