/* Writing checkpoint directories (mxq quantize, mxq synth). Internal.
 *
 * A directory mxq writes into keeps a record, MXQ_RECORD_NAME, of the files
 * mxq wrote there; it is written before any of them. With `force`, an
 * earlier run's files may be replaced, and nothing else: a file the new run
 * would write that is not in the record (another model's config.json, say)
 * stops the run instead. The earlier run's checkpoint stays whole until the
 * new one is committed: its index goes when the new shards are put in
 * place (mxq_ckpt_dir_begin_commit), its other files once the new index is
 * (mxq_ckpt_dir_finish). A run that fails before its commit leaves the
 * directory as it found it; one that fails during its commit removes every
 * recorded file (the earlier run's are half replaced by then: what is left
 * would be no checkpoint). While a run prepares and writes, it holds an
 * exclusive lock on the directory (flock), so that a second run into the
 * same directory is refused instead of removing the first one's files;
 * where the file system has no locks, it goes on without. */
#ifndef MXQ_CKPT_WRITER_H
#define MXQ_CKPT_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "io/fsutil.h"
#include "mxq/safetensors.h"

#define MXQ_RECORD_NAME ".mxq-output.json"

typedef struct {
    char *dir;
    char **planned;  /* the files this run writes (plain names) */
    size_t n_planned;
    char **recorded; /* the earlier run's files, then also the planned ones */
    size_t n_recorded;
    int created;        /* this run made the directory */
    int record_written; /* this run's record is in place */
    int committing;     /* files of this run have replaced the earlier run's */
    int locked;         /* lock_fd is open and holds the directory's lock */
    int lock_fd;
    const mxq_input_set *inputs; /* never removed, whatever the record says */
} mxq_ckpt_dir;

/* What mxq_ckpt_dir_prepare would refuse, found without changing anything
 * (for --dry-run): a path that is not a directory, a non-empty directory
 * without `force`, a planned file mxq did not write or that is an input. */
mxq_status mxq_ckpt_dir_check(mxq_ctx *ctx, const char *dir, int force, const char *const *planned, size_t n_planned,
                              const mxq_input_set *inputs);

/* Make `dir` ready for the files named in `planned`: create it, or check
 * that it is empty, or with `force` that every planned file it holds was
 * written by mxq; remove temporaries a killed run left; record the earlier
 * files and the planned ones. No planned file may be one of `inputs`. */
mxq_status mxq_ckpt_dir_prepare(mxq_ctx *ctx, mxq_ckpt_dir *d, const char *dir, int force, const char *const *planned,
                                size_t n_planned, const mxq_input_set *inputs);
/* Before the first file of the new run is put in place: the earlier
 * index and config.json go, so that the directory never looks like a mixed
 * checkpoint. */
mxq_status mxq_ckpt_dir_begin_commit(mxq_ctx *ctx, mxq_ckpt_dir *d);
/* After the new index is in place: the earlier run's other files go, and
 * the record lists the new run's files alone. */
mxq_status mxq_ckpt_dir_finish(mxq_ctx *ctx, mxq_ckpt_dir *d, const mxq_input_set *inputs);
/* After a failure: during a commit, remove every recorded file (the
 * directory is no checkpoint any more); before it, keep the earlier run's
 * files. Then the record if it lists nothing that exists, and the
 * directory if this run made it and it is empty. Best effort; each rank
 * removes its own temporaries first. */
void mxq_ckpt_dir_abandon(mxq_ckpt_dir *d);
/* Frees the names and releases the lock. */
void mxq_ckpt_dir_free(mxq_ckpt_dir *d);

/* The Hugging Face name of shard `index` (from 0) of `count`:
 * "model-0000k-of-0000N.safetensors". */
void mxq_shard_name(char *buf, size_t size, int index, int count);

/* One shard: header and data of `tensors` into an output begun with
 * mxq_output_begin (committed by the caller). */
mxq_status mxq_st_write(mxq_ctx *ctx, mxq_output *out, const mxq_tensor_write *tensors, size_t count);

/* model.safetensors.index.json: {"metadata": {"total_size": N[, "format":
 * format][, "mxq_shards": shards]}, "weight_map": map}; `map` is a JSON
 * object tensor -> shard, `shards` (NULL: none) shard -> {"sha256",
 * "bytes"} of each whole file, for mxq verify.
 * With `pending`, it is left under its temporary name for the caller to
 * commit: the index is what makes a directory a checkpoint. */
struct json_t;
mxq_status mxq_ckpt_index_write(mxq_ctx *ctx, const char *dir, struct json_t *map, uint64_t total_size,
                                const char *format, struct json_t *shards, const mxq_input_set *inputs,
                                mxq_output *pending);

#endif
