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
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "parallel/pipeline.h"

int mxq_micro_batch_seqs(int n_seqs, int batch, int mb)
{
    int left = n_seqs - mb * batch;
    return left < batch ? left : batch;
}

/* One rank's view of the pipeline while it runs. */
typedef struct {
    mxq_pipeline *p;
    int prev, next;   /* neighbour ranks, -1 if none */
    int max_count;    /* floats in one buffer */
    MPI_Request recv_req[2], send_req[2];
    int received;     /* messages taken from upstream so far */
    int upstream_aborted;
} pipeline_state;

/* Wait for micro-batch mb from upstream into its slot and post the receive
 * of mb+1 into the other slot once that slot's send has finished. */
static mxq_status receive_micro_batch(mxq_ctx *ctx, pipeline_state *s, int mb)
{
    mxq_status status = MXQ_OK;
    const int slot = mb % 2;
    MPI_Comm comm = s->p->dist->comm;
    if (s->prev < 0) {
        CALL_MPI(ctx, comm, MPI_Wait(&s->send_req[slot], MPI_STATUS_IGNORE));
        return MXQ_OK;
    }
    MPI_Status st;
    CALL_MPI(ctx, comm, MPI_Wait(&s->recv_req[slot], &st));
    s->received++;
    if (st.MPI_TAG == MXQ_TAG_ABORT) {
        s->upstream_aborted = 1;
        FAIL(ctx, MXQ_ERR_REMOTE, "stopped because an upstream rank failed");
    }
    if (mb + 1 < s->p->n_micro) {
        CALL_MPI(ctx, comm, MPI_Wait(&s->send_req[1 - slot], MPI_STATUS_IGNORE));
        CALL_MPI(ctx, comm, MPI_Irecv(s->p->buf[1 - slot], s->max_count, MPI_FLOAT, s->prev, MPI_ANY_TAG, comm,
                                &s->recv_req[1 - slot]));
    }
fail:
    return status;
}

static void report_progress(mxq_ctx *ctx, const mxq_pipeline *p, int done, double t0, double *last_report)
{
    double now = mxq_time_now();
    if (p->dist->rank != 0 || (now - *last_report <= 5.0 && done < p->n_seqs))
        return;
    mxq_log(ctx, MXQ_LOG_INFO, "%s: %d/%d sequences through rank 0 (%.0f%%), %.1f s, %.0f tokens/s", p->label, done,
            p->n_seqs, 100.0 * done / p->n_seqs, now - t0, (double)done * p->seq_len / (now - t0));
    *last_report = now;
}

/* After a failure here or upstream: tell downstream to stop, then take
 * whatever upstream still sends, so that no neighbour waits forever. */
static void stop_pipeline(pipeline_state *s)
{
    mxq_pipeline *p = s->p;
    MPI_Comm comm = p->dist->comm;
    if (s->next >= 0)
        MPI_Send(NULL, 0, MPI_FLOAT, s->next, MXQ_TAG_ABORT, comm);
    MPI_Waitall(2, s->send_req, MPI_STATUSES_IGNORE);
    for (int m = s->received; s->prev >= 0 && !s->upstream_aborted && m < p->n_micro; m++) {
        MPI_Status st;
        int slot = m % 2;
        if (s->recv_req[slot] != MPI_REQUEST_NULL)
            MPI_Wait(&s->recv_req[slot], &st);
        else
            MPI_Recv(p->buf[slot], s->max_count, MPI_FLOAT, s->prev, MPI_ANY_TAG, comm, &st);
        if (st.MPI_TAG == MXQ_TAG_ABORT)
            break;
    }
    for (int i = 0; i < 2; i++)
        if (s->recv_req[i] != MPI_REQUEST_NULL) {
            MPI_Cancel(&s->recv_req[i]);
            MPI_Request_free(&s->recv_req[i]);
        }
}

mxq_status mxq_pipeline_run(mxq_ctx *ctx, mxq_pipeline *p)
{
    mxq_status status = MXQ_OK;
    const int rank = p->dist->rank, size = p->dist->size, S = p->seq_len, d = p->hidden;
    pipeline_state s = {p, rank - 1, rank + 1 < size ? rank + 1 : -1, 0,
                        {MPI_REQUEST_NULL, MPI_REQUEST_NULL}, {MPI_REQUEST_NULL, MPI_REQUEST_NULL}, 0, 0};
    double t0 = mxq_time_now(), last_report = t0;
    /* MPI counts are ints: a micro-batch must fit in one message. */
    CHECK(ctx, (long long)p->batch * S * d < INT_MAX, MXQ_ERR_ARG,
          "a micro-batch of %d sequences x %d tokens x %d features exceeds one MPI message; use a smaller --batch",
          p->batch, S, d);
    s.max_count = p->batch * S * d;
    if (s.prev >= 0)
        CALL_MPI(ctx, p->dist->comm, MPI_Irecv(p->buf[0], s.max_count, MPI_FLOAT, s.prev, MPI_ANY_TAG, p->dist->comm, &s.recv_req[0]));
    for (int mb = 0; mb < p->n_micro; mb++) {
        const int slot = mb % 2, n = mxq_micro_batch_seqs(p->n_seqs, p->batch, mb);
        CALL(ctx, receive_micro_batch(ctx, &s, mb));
        if (mb == p->n_micro / 2)
            CALL(ctx, mxq_fault_point(ctx, p->step));
        CALL(ctx, p->stage(ctx, p->user, mb, mb * p->batch, n, p->buf[slot]));
        if (s.next >= 0)
            CALL_MPI(ctx, p->dist->comm, MPI_Isend(p->buf[slot], n * S * d, MPI_FLOAT, s.next, MXQ_TAG_DATA, p->dist->comm,
                                    &s.send_req[slot]));
        report_progress(ctx, p, mb * p->batch + n, t0, &last_report);
    }
    CALL_MPI(ctx, p->dist->comm, MPI_Waitall(2, s.send_req, MPI_STATUSES_IGNORE));
    return MXQ_OK;
fail:
    stop_pipeline(&s);
    return status;
}
