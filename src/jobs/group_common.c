/* What the data-parallel group's two calibration modes share
 * (calibrate_group.c: fp; calibrate_group_seq.c: sequential): each rank's
 * share of the calibration sequences, and the layers' progress lines. */
#include <limits.h>
#include <stdlib.h>

#include "core/alloc.h"
#include "jobs/jobs_internal.h"
#include "jobs/quantize_report.h"
#include "model/lazy.h"
#include "parallel/pipeline.h"

int mxq_calib_share_batches(const mxq_calib_share *s) { return (s->n + s->batch - 1) / s->batch; }

float *mxq_calib_share_batch(const mxq_calib_share *s, int mb, int *n)
{
    *n = mxq_micro_batch_seqs(s->n, s->batch, mb);
    return s->acts + (size_t)mb * s->batch * s->seq_len * s->hidden;
}

mxq_status mxq_calib_share_create(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                                  int batch, int embed, mxq_calib_share *s)
{
    mxq_status status = MXQ_OK;
    const int S = tokens->seq_len, d = model->cfg.hidden;
    *s = (mxq_calib_share){.batch = batch, .seq_len = S, .hidden = d};
    s->first = (int)((long long)tokens->n_seqs * dist->rank / dist->size);
    s->n = (int)((long long)tokens->n_seqs * (dist->rank + 1) / dist->size) - s->first;
    const size_t floats = (size_t)s->n * S * d;
    CHECK(ctx, (long long)batch * S * d < INT_MAX, MXQ_ERR_ARG,
          "a micro-batch of %d sequences x %d tokens x %d features is too large; use a smaller --batch", batch, S, d);
    s->acts = mxq_alloc_floats(floats ? floats : 1);
    CHECK_ALLOC(ctx, s->acts, floats * sizeof(float), "this rank's share of the calibration activations");
    for (int mb = 0; embed && mb < mxq_calib_share_batches(s); mb++) {
        int n;
        float *x = mxq_calib_share_batch(s, mb, &n);
        CALL(ctx, mxq_model_embed(ctx, model, tokens->ids + (size_t)(s->first + mb * batch) * S, n, S, x));
    }
    CALL(ctx, mxq_model_unload_embedding(ctx, model));
fail:
    return status;
}

int mxq_group_first_layer(const mxq_layer_hooks *hooks) { return hooks ? hooks->start : 0; }

mxq_status mxq_calib_share_restart(mxq_ctx *ctx, const mxq_dist *dist, const mxq_layer_hooks *hooks,
                                   mxq_act_store *store, mxq_calib_share *s)
{
    mxq_status status = MXQ_OK;
    const int start = mxq_group_first_layer(hooks);
    if (start == 0)
        return MXQ_OK;
    CHECK_AGREED(ctx, dist, "group.restart", store != NULL, MXQ_ERR_INTERNAL,
                 "the group starts at layer %d without a store to read its inputs from", start);
    CALL(ctx, mxq_act_store_read(ctx, dist, store, start, s->first, s->n, s->acts));
    if (dist->rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "layer %d's inputs read from the activation store: layers 0-%d are not run again",
                start, start - 1);
fail:
    return status;
}

mxq_status mxq_calib_share_skip_layer(mxq_ctx *ctx, mxq_model *model, mxq_calib_share *s, int layer,
                                      mxq_workspace *ws)
{
    mxq_status status = MXQ_OK;
    mxq_workspace *own = NULL;
    CALL(ctx, mxq_model_layer_load(ctx, model, layer));
    if (!ws)
        CALL(ctx, mxq_workspace_create(ctx, &model->cfg, s->batch, s->seq_len, &own));
    for (int mb = 0; mb < mxq_calib_share_batches(s); mb++) {
        int n;
        float *x = mxq_calib_share_batch(s, mb, &n);
        CALL(ctx, mxq_model_run_layers(ctx, model, layer, layer + 1, x, n, s->seq_len, NULL, ws ? ws : own));
    }
fail:
    if (mxq_model_layer_unload(ctx, model, layer) != MXQ_OK && status == MXQ_OK)
        status = mxq_error_code(ctx);
    mxq_workspace_free(own);
    return status;
}

void mxq_calib_share_free(mxq_calib_share *s)
{
    free(s->acts);
    s->acts = NULL;
}

mxq_status mxq_group_log_layers(mxq_ctx *ctx, const mxq_dist *dist, const mxq_model *model,
                                const mxq_layer_result *results, int layer, mxq_layer_record *records)
{
    mxq_status status = MXQ_OK;
    mxq_layer_record rec = {.layer = -1};
    if (layer >= 0)
        mxq_layer_record_of(&results[layer - model->first_layer], dist->rank, &rec);
    CALL_MPI(ctx, dist->comm,
             MPI_Gather(&rec, (int)sizeof(rec), MPI_BYTE, records, (int)sizeof(rec), MPI_BYTE, 0, dist->comm));
    for (int r = 0; dist->rank == 0 && r < dist->size; r++)
        if (records[r].layer >= 0)
            mxq_layer_record_log(ctx, model->cfg.n_layers, &records[r]);
fail:
    return status;
}
