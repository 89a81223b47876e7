/* Perplexity over an MPI pipeline.
 *
 * Rank r owns a contiguous range of layers. Micro-batches of `batch`
 * sequences flow rank 0 -> 1 -> ... -> last with non-blocking MPI and two
 * buffers per rank, so that rank r computes micro-batch i while it receives
 * i+1 and sends i-1. The last rank turns hidden states into per-sequence
 * negative log-likelihoods; their sum is taken in sequence order, so the
 * result is the same bits for any number of ranks.
 *
 * Failure mid-pipeline: the failing rank sends an ABORT message downstream
 * (each rank forwards it) and keeps receiving what its upstream still sends,
 * so no rank waits forever; all ranks then agree on the failure. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "mxq/dist.h"
#include "mxq/eval.h"
#include "mxq/tokens.h"

enum { TAG_DATA = 1, TAG_ABORT = 2 };

typedef struct {
    mxq_dist dist;
    const mxq_model *model;
    const mxq_tokens *tokens;
    const mxq_fake_quant *quant;
    mxq_workspace *ws;
    float *buf[2];
    int batch;
    int n_micro;
    double *nll; /* [n_seqs], on the last rank */
} pipeline;

static int micro_seqs(const pipeline *p, int mb)
{
    int start = mb * p->batch;
    int left = p->tokens->n_seqs - start;
    return left < p->batch ? left : p->batch;
}

/* This rank's stage on micro-batch mb, in place on buf. */
static mxq_status run_stage(mxq_ctx *ctx, pipeline *p, int mb, float *buf)
{
    mxq_status status = MXQ_OK;
    const mxq_model *m = p->model;
    int n = micro_seqs(p, mb), S = p->tokens->seq_len;
    const int32_t *ids = p->tokens->ids + (size_t)mb * p->batch * S;
    if (m->has_embedding)
        CALL(ctx, mxq_model_embed(ctx, m, ids, n, S, buf));
    CALL(ctx, mxq_model_run_layers(ctx, m, m->first_layer, m->last_layer, buf, n, S, p->quant, p->ws));
    if (m->has_head)
        CALL(ctx, mxq_model_sequence_nll(ctx, m, buf, ids, n, S, p->nll + (size_t)mb * p->batch, p->ws));
fail:
    return status;
}

static mxq_status run_pipeline(mxq_ctx *ctx, pipeline *p)
{
    mxq_status status = MXQ_OK;
    const int rank = p->dist.rank, size = p->dist.size;
    const int prev = rank - 1, next = rank + 1 < size ? rank + 1 : -1;
    const int S = p->tokens->seq_len, d = p->model->cfg.hidden;
    const int max_count = p->batch * S * d;
    MPI_Comm comm = p->dist.comm;
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
        CALL(ctx, run_stage(ctx, p, mb, p->buf[slot]));
        if (next >= 0)
            CALL_MPI(ctx, MPI_Isend(p->buf[slot], micro_seqs(p, mb) * S * d, MPI_FLOAT, next, TAG_DATA, comm,
                                    &send_req[slot]));
        double now = mxq_time_now();
        if (rank == 0 && (now - last_report > 5.0 || mb + 1 == p->n_micro)) {
            int done = mb * p->batch + micro_seqs(p, mb);
            mxq_log(ctx, MXQ_LOG_INFO, "eval: %d/%d sequences through rank 0 (%.0f%%), %.1f s, %.0f tokens/s", done,
                    p->tokens->n_seqs, 100.0 * done / p->tokens->n_seqs, now - t0, (double)done * S / (now - t0));
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

mxq_status mxq_eval_perplexity(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *tokens_path,
                               const mxq_eval_options *options, mxq_eval_result *result)
{
    mxq_status status = MXQ_OK;
    pipeline p = {0};
    mxq_model_config cfg;
    mxq_tokens tokens = {0};
    mxq_model *model = NULL;
    int *first = NULL;
    p.dist.comm = MPI_COMM_NULL;
    memset(result, 0, sizeof(*result));

    CALL(ctx, mxq_dist_create(ctx, comm, &p.dist));
    const int rank = p.dist.rank, size = p.dist.size;
    double t_load = mxq_time_now();

    CALL(ctx, mxq_dist_agree(ctx, &p.dist, mxq_config_load(ctx, model_dir, &cfg)));
    first = malloc((size_t)(size + 1) * sizeof(int));
    CHECK_ALLOC(ctx, first, (size_t)(size + 1) * sizeof(int), "the layer partition");
    CALL(ctx, mxq_dist_agree(ctx, &p.dist, mxq_partition_layers(ctx, &cfg, size, first)));
    mxq_model_part part = {first[rank], first[rank + 1], rank == 0, rank == size - 1};
    mxq_log(ctx, MXQ_LOG_DEBUG, "rank %d owns layers [%d, %d)%s%s", rank, part.first_layer, part.last_layer,
            part.embedding ? " + embedding" : "", part.head ? " + norm/lm_head" : "");
    CALL(ctx, mxq_dist_agree(ctx, &p.dist, mxq_model_load(ctx, model_dir, &cfg, &part, &model)));
    if (options->quant.enabled_weights)
        CALL(ctx, mxq_dist_agree(ctx, &p.dist, mxq_model_fake_quantize_weights(ctx, model, &options->quant.weights)));
    CALL(ctx, mxq_dist_agree(ctx, &p.dist, mxq_tokens_read(ctx, &p.dist, tokens_path, options->limit, cfg.vocab, &tokens)));
    mxq_status local = MXQ_OK;
    if (tokens.seq_len > cfg.max_positions) {
        mxq_error_set(ctx, MXQ_ERR_FORMAT, __FILE__, __LINE__,
                      "token file '%s' has sequences of %d tokens, longer than the model's context of %d "
                      "(max_position_embeddings)",
                      tokens_path, tokens.seq_len, cfg.max_positions);
        local = MXQ_ERR_FORMAT;
    }
    CALL(ctx, mxq_dist_agree(ctx, &p.dist, local));
    if (options->limit > tokens.total_seqs)
        mxq_log(ctx, MXQ_LOG_WARN, "--limit %d exceeds the %d sequences in '%s'; evaluating all of them",
                options->limit, tokens.total_seqs, tokens_path);

    p.model = model;
    p.tokens = &tokens;
    p.quant = &options->quant;
    p.batch = options->batch > 0 ? options->batch : 8;
    if (p.batch > tokens.n_seqs)
        p.batch = tokens.n_seqs;
    p.n_micro = (tokens.n_seqs + p.batch - 1) / p.batch;
    size_t buf_floats = (size_t)p.batch * tokens.seq_len * cfg.hidden;
    local = mxq_workspace_create(ctx, &cfg, p.batch, tokens.seq_len, &p.ws);
    if (local == MXQ_OK) {
        p.buf[0] = malloc(buf_floats * sizeof(float));
        p.buf[1] = malloc(buf_floats * sizeof(float));
        p.nll = calloc((size_t)tokens.n_seqs, sizeof(double));
        if (!p.buf[0] || !p.buf[1] || !p.nll) {
            mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory for pipeline buffers (%zu bytes)",
                          2 * buf_floats * sizeof(float));
            local = MXQ_ERR_NOMEM;
        }
    }
    CALL(ctx, mxq_dist_agree(ctx, &p.dist, local));
    double load_seconds = mxq_time_now() - t_load;
    mxq_log(ctx, MXQ_LOG_INFO, "eval: %s (%s, %d layers, d=%d) on %d rank%s; %d sequences of %d tokens, micro-batch %d",
            model_dir, mxq_arch_name(cfg.arch), cfg.n_layers, cfg.hidden, size, size == 1 ? "" : "s", tokens.n_seqs,
            tokens.seq_len, p.batch);

    double t0 = mxq_time_now();
    CALL(ctx, mxq_dist_agree(ctx, &p.dist, run_pipeline(ctx, &p)));
    double seconds = mxq_time_now() - t0;

    double totals[2] = {0, 0};
    if (rank == size - 1) {
        for (int s = 0; s < tokens.n_seqs; s++)
            totals[0] += p.nll[s];
        totals[1] = (double)tokens.n_seqs * (tokens.seq_len - 1);
    }
    CALL_MPI(ctx, MPI_Bcast(totals, 2, MPI_DOUBLE, size - 1, p.dist.comm));
    result->tokens_scored = (size_t)totals[1];
    result->mean_nll = totals[0] / totals[1];
    result->ppl = exp(result->mean_nll);
    result->sequences = tokens.n_seqs;
    result->seq_len = tokens.seq_len;
    result->seconds = seconds;
    result->load_seconds = load_seconds;
    result->tokens_per_s = (double)tokens.n_seqs * tokens.seq_len / seconds;
    result->ranks = size;
fail:
    free(p.buf[0]);
    free(p.buf[1]);
    free(p.nll);
    mxq_workspace_free(p.ws);
    mxq_tokens_free(&tokens);
    mxq_model_free(model);
    free(first);
    mxq_dist_free(&p.dist);
    return status;
}
