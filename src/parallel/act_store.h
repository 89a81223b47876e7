/* The activation store (--store-activations): every decoder layer's inputs
 * over the calibration set, in one parallel-HDF5 file that all ranks of a
 * data-parallel group write collectively, each its share of the sequences.
 *
 *   /layers/<l>   float32 [n_seqs, seq_len, hidden]: the inputs of layer l
 *                 (FP model's in fp mode; the quantized layers' in
 *                 sequential mode), chunked one sequence per chunk, so that
 *                 a reader of a layer's range of sequences touches only its
 *                 chunks
 *   attributes of /: mxq_activation_store (format version), model,
 *                 calibration, mode, job, n_layers, n_seqs, seq_len,
 *                 hidden, layers_complete (the whole layers, flushed
 *                 after each: what a killed run leaves is read up to it)
 *
 * The file is written under a temporary name and renamed into place when
 * every layer is in it (mxq_act_store_commit); an existing file at the
 * path is replaced only if it is an earlier store, and with --force.
 * Internal. */
#ifndef MXQ_ACT_STORE_H
#define MXQ_ACT_STORE_H

#include <hdf5.h>

#include "io/fsutil.h"
#include "mxq/model.h"
#include "parallel/parallel.h"

typedef struct {
    hid_t file;
    mxq_output out; /* rank 0: the temporary file and its final name */
    char *path;     /* the final name, on every rank (messages) */
    int force;      /* an earlier store at the path may be replaced */
    int n_layers, n_seqs, seq_len, hidden;
    int layers_written; /* layers 0 .. layers_written - 1, in order */
    int committed; /* rank 0: renamed into place (an abort after it removes the file) */
    int reopened;  /* taken over from a killed run: layers before layers_written are whole */
} mxq_act_store;

/* What the store says of itself (its root attributes). */
typedef struct {
    const char *model, *calibration, *mode;
    const char *job; /* the SHA-256 of the job's record (what its bytes depend on): a resumed run takes over only its own store */
} mxq_act_store_info;

/* Whether the path may take the store (local): not an input, not a
 * device, link or directory, and if a file exists, an earlier store and
 * `force`. */
mxq_status mxq_act_store_check(mxq_ctx *ctx, const char *path, const mxq_input_set *inputs, int force);

/* Whether the path's file system has `bytes` free (local; a directory
 * that does not exist yet passes). */
mxq_status mxq_act_store_check_space(mxq_ctx *ctx, const char *path, double bytes);

/* Check the path on rank 0 (force: an earlier store there may be
 * replaced; clear_temporaries: what killed runs left as its temporaries
 * goes), then create the file and every layer's dataset on all ranks.
 * Collective (agreed). */
mxq_status mxq_act_store_create(mxq_ctx *ctx, const mxq_dist *dist, const char *path, const mxq_input_set *inputs,
                                int force, int clear_temporaries, const mxq_model_config *cfg, int n_seqs, int seq_len,
                                const mxq_act_store_info *info, mxq_act_store *store);

/* Layer `layer`'s inputs (layers in order 0, 1, ...): this rank's
 * sequences [first, first + n) from acts [n, seq_len, hidden] (n may be
 * 0). Collective. */
mxq_status mxq_act_store_write(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *store, int layer, int first, int n,
                               const float *acts);

/* Layer `layer`'s inputs (a whole one) of this rank's sequences
 * [first, first + n) into acts [n, seq_len, hidden]. Collective. */
mxq_status mxq_act_store_read(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *store, int layer, int first, int n,
                              float *acts);

/* --resume: take over the store a killed or stopped run of the same job
 * left under its temporary name next to `path` (the newest, if several),
 * if its header matches and a layer is whole in it (the store records its
 * whole layers in the attribute layers_complete and flushes the file after
 * each). *start: the layer to restart from, `from` or the last whole layer
 * before it; the run reads that layer from the store and goes on writing
 * it. *start = -1 (and nothing open) if there is no such store.
 * Collective. */
mxq_status mxq_act_store_reopen(mxq_ctx *ctx, const mxq_dist *dist, const char *path, const mxq_input_set *inputs,
                                const mxq_model_config *cfg, int n_seqs, int seq_len, const mxq_act_store_info *info,
                                int from, mxq_act_store *store, int *start);

/* Close the file (collective) and, on rank 0, rename it into place. Every
 * layer must have been written. */
mxq_status mxq_act_store_commit(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *store);

/* Close (collective: every rank must call it) and remove the temporary, or
 * the committed file: a job that fails after the commit leaves no store.
 * Then as release. */
void mxq_act_store_abort(mxq_act_store *store);
/* Remove the temporaries that killed or failed runs left next to `path`
 * (a 7B store's is 8.6 GB, in a hidden file): all of them (info NULL,
 * --force), or those of the job `info` names (its digest) but `keep`
 * (--resume: what the run it continues left and could not be taken over).
 * Local. */
void mxq_act_store_remove_temporaries(const char *path, const mxq_act_store_info *info, const char *keep);

/* Close (collective) and leave the temporary for a later --resume (a
 * failed run whose layers are recorded); a store already renamed into
 * place goes, as with abort. Then as release. */
void mxq_act_store_keep(mxq_act_store *store);
/* Free what the store holds, after a commit or an abort (local). */
void mxq_act_store_release(mxq_act_store *store);

#endif
