/* What a quantize job leaves to resume from (--resume).
 *
 *   <out>/.mxq-resume/job.json          what the bytes depend on: the
 *                                       inputs' checksums, mxq's version,
 *                                       the ranks and their layout
 *   <out>/.mxq-resume/layer-NNNNN.safetensors
 *                                       one per quantized layer, written by
 *                                       its owner as soon as it is final:
 *                                       the tensors the shard takes from
 *                                       the algorithms (packed weights,
 *                                       scales, folded norms), the layer's
 *                                       figures (mxq.layer_record), the
 *                                       job's digest (mxq.job) and a
 *                                       SHA-256 of all that (mxq.sha256)
 *
 * Each file is written under a temporary name, flushed and renamed, so a
 * record that exists is whole. A resumed run checks job.json against its
 * own, takes the recorded layers as they are and redoes the others; the
 * checkpoint is the same bytes as an uninterrupted run's. The directory
 * goes once the checkpoint is complete. Internal. */
#ifndef MXQ_RESUME_H
#define MXQ_RESUME_H

#include <jansson.h>

#include "io/fsutil.h"
#include "jobs/quantize_report.h"
#include "mxq/safetensors.h"
#include "parallel/parallel.h"

#define MXQ_RESUME_DIR ".mxq-resume"

typedef struct {
    char *dir;           /* <out>/.mxq-resume */
    int n_layers;
    unsigned char *done; /* [n_layers], every rank: recorded by the earlier run */
    int n_done;
    mxq_st_file **open;  /* [n_layers]: the records this rank has opened for its shard */
    int begun;           /* rank 0: this run records its layers (mxq_resume_begin) */
    int clear;           /* rank 0, --force: the unfinished run's records go once the directory is locked */
    char job[65];        /* the job's digest (SHA-256 of job.json's text), in every record */
} mxq_resume;

/* Rank 0, before the output directory is prepared (r->job set). With
 * `resume`: the earlier run's job.json must equal `fingerprint` (else the
 * first key that differs is named), and its layer records are found and
 * checked (another job's, or changed data: the layer is redone). Without:
 * records of an unfinished run stop the job, unless `force`, which removes
 * them once the directory is locked (mxq_resume_begin). */
mxq_status mxq_resume_check(mxq_ctx *ctx, mxq_resume *r, const char *out_dir, int n_layers,
                            const json_t *fingerprint, int resume, int force);

/* Rank 0, once the output directory is prepared: a fresh run creates the
 * records directory and its job.json. */
mxq_status mxq_resume_begin(mxq_ctx *ctx, mxq_resume *r, const json_t *fingerprint, const mxq_input_set *inputs);

/* Collective: rank 0's list of done layers to every rank (which allocate
 * what mxq_resume_check did not run on them). */
mxq_status mxq_resume_share(mxq_ctx *ctx, const mxq_dist *dist, const char *out_dir, int n_layers, mxq_resume *r);

/* Layer `layer`'s record (its owner): `tensors` and the figures. */
mxq_status mxq_resume_write_layer(mxq_ctx *ctx, const mxq_resume *r, int layer, const mxq_tensor_write *tensors,
                                  size_t count, const mxq_layer_record *figures, const mxq_input_set *inputs);

/* The shard writer of a done layer: its record opened (kept open until
 * mxq_resume_free) and its figures. */
mxq_status mxq_resume_open_layer(mxq_ctx *ctx, mxq_resume *r, int layer, mxq_layer_record *figures);
/* A tensor of an opened record, or NULL if the record has none of that name. */
const mxq_tensor_view *mxq_resume_tensor(const mxq_resume *r, int layer, const char *name);

/* Rank 0, after a failure (every rank's records written or abandoned), if
 * this run began recording: records of no layer go; else how to resume is
 * said. Returns 1 if records are kept. */
int mxq_resume_abandon(mxq_ctx *ctx, mxq_resume *r); /* 1: records kept */

/* Rank 0, once the checkpoint is complete: the records go (best effort;
 * what is left is said). */
void mxq_resume_remove(mxq_ctx *ctx, mxq_resume *r);
void mxq_resume_free(mxq_resume *r);

#endif
