/* The rank-to-rank micro-batch pipeline shared by evaluation and fp-mode
 * calibration. Internal. */
#ifndef MXQ_PIPELINE_H
#define MXQ_PIPELINE_H

#include "parallel/parallel.h"

/* Message tags between neighbouring ranks: data, or "stop, nothing more is
 * coming" (also used by sequential calibration). */
enum { MXQ_TAG_DATA = 1, MXQ_TAG_ABORT = 2 };

typedef mxq_status (*mxq_stage_fn)(mxq_ctx *ctx, void *user, int mb, int first_seq, int n_seqs, float *buf);

typedef struct {
    const mxq_dist *dist;
    int n_seqs, seq_len, hidden;
    int batch;   /* sequences per micro-batch */
    int n_micro;
    const char *label; /* for progress lines: "eval", "calibration" */
    const char *step;  /* fault-injection step of a failure midway through, e.g. "eval.pipeline.midway" */
    mxq_stage_fn stage;
    void *user;
    float *buf[2]; /* [batch * seq_len * hidden] each, allocated by the caller */
} mxq_pipeline;

/* Sequences in micro-batch mb of n_seqs cut into batches (the last may be short). */
int mxq_micro_batch_seqs(int n_seqs, int batch, int mb);

/* Collective over p->dist (every rank must call it once buffers exist on all
 * ranks). The caller agrees on the returned status. */
mxq_status mxq_pipeline_run(mxq_ctx *ctx, mxq_pipeline *p);

#endif
