/* A pipeline over MPI ranks.
 *
 * Rank r owns a contiguous range of layers. Micro-batches of `batch`
 * sequences flow rank 0 -> 1 -> ... -> last with non-blocking MPI and two
 * buffers per rank, so that rank r computes micro-batch i while it receives
 * i+1 and sends i-1. What a rank does to a micro-batch is the stage
 * callback (evaluation: embed / layers / NLL; calibration: embed / layers
 * with statistics).
 *
 * Failure mid-pipeline: the failing rank sends an ABORT message downstream
 * (each rank forwards it) and keeps receiving what its upstream still sends,
 * so no rank waits forever; all ranks then agree on the failure. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "pipeline.h"

enum { TAG_DATA = 1, TAG_ABORT = 2 };

int mxq_pipeline_micro_seqs(const mxq_pipeline *p, int mb)
{
    int start = mb * p->batch;
    int left = p->n_seqs - start;
    return left < p->batch ? left : p->batch;
}

mxq_status mxq_pipeline_run(mxq_ctx *ctx, mxq_pipeline *p)
{
    mxq_status status = MXQ_OK;
    const int rank = p->dist->rank, size = p->dist->size;
    const int prev = rank - 1, next = rank + 1 < size ? rank + 1 : -1;
    const int S = p->seq_len, d = p->hidden;
    const int max_count = p->batch * S * d;
    MPI_Comm comm = p->dist->comm;
    MPI_Request recv_req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    MPI_Request send_req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    int upstream_aborted = 0;
    int received = 0; /* messages taken from upstream so far */
    int mb = 0;
    double t0 = mxq_time_now(), last_report = t0;

    if (prev >= 0)
        CALL_MPI(ctx, MPI_Irecv(p->buf[0], max_count, MPI_FLOAT, prev, MPI_ANY_TAG, comm, &recv_req[0]));
    for (mb = 0; mb < p->n_micro; mb++) {
        int slot = mb % 2;
        if (prev >= 0) {
            MPI_Status st;
            CALL_MPI(ctx, MPI_Wait(&recv_req[slot], &st));
            received++;
            if (st.MPI_TAG == TAG_ABORT) {
                upstream_aborted = 1;
                break;
            }
            if (mb + 1 < p->n_micro) {
                CALL_MPI(ctx, MPI_Wait(&send_req[1 - slot], MPI_STATUS_IGNORE));
                CALL_MPI(ctx, MPI_Irecv(p->buf[1 - slot], max_count, MPI_FLOAT, prev, MPI_ANY_TAG, comm,
                                        &recv_req[1 - slot]));
            }
        } else {
            CALL_MPI(ctx, MPI_Wait(&send_req[slot], MPI_STATUS_IGNORE));
        }
        CALL(ctx, p->stage(ctx, p->user, mb, mb * p->batch, mxq_pipeline_micro_seqs(p, mb), p->buf[slot]));
        if (next >= 0)
            CALL_MPI(ctx, MPI_Isend(p->buf[slot], mxq_pipeline_micro_seqs(p, mb) * S * d, MPI_FLOAT, next, TAG_DATA, comm,
                                    &send_req[slot]));
        double now = mxq_time_now();
        if (rank == 0 && (now - last_report > 5.0 || mb + 1 == p->n_micro)) {
            int done = mb * p->batch + mxq_pipeline_micro_seqs(p, mb);
            mxq_log(ctx, MXQ_LOG_INFO, "%s: %d/%d sequences through rank 0 (%.0f%%), %.1f s, %.0f tokens/s", p->label, done,
                    p->n_seqs, 100.0 * done / p->n_seqs, now - t0, (double)done * S / (now - t0));
            last_report = now;
        }
    }
    CALL_MPI(ctx, MPI_Waitall(2, send_req, MPI_STATUSES_IGNORE));
    if (upstream_aborted) {
        if (next >= 0)
            MPI_Send(NULL, 0, MPI_FLOAT, next, TAG_ABORT, comm);
        FAIL(ctx, MXQ_ERR_REMOTE, "stopped because an upstream rank failed");
    }
    return MXQ_OK;

fail:
    /* Tell downstream to stop, then take whatever upstream still sends. */
    if (!upstream_aborted && next >= 0)
        MPI_Send(NULL, 0, MPI_FLOAT, next, TAG_ABORT, comm);
    MPI_Waitall(2, send_req, MPI_STATUSES_IGNORE);
    if (prev >= 0 && !upstream_aborted) {
        for (int m = received; m < p->n_micro; m++) {
            MPI_Status st;
            int slot = m % 2;
            if (recv_req[slot] != MPI_REQUEST_NULL)
                MPI_Wait(&recv_req[slot], &st);
            else
                MPI_Recv(p->buf[slot], max_count, MPI_FLOAT, prev, MPI_ANY_TAG, comm, &st);
            if (st.MPI_TAG == TAG_ABORT)
                break;
        }
    }
    for (int i = 0; i < 2; i++)
        if (recv_req[i] != MPI_REQUEST_NULL) {
            MPI_Cancel(&recv_req[i]);
            MPI_Request_free(&recv_req[i]);
        }
    return status;
}

