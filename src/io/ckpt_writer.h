/* Writing checkpoint directories (mxq quantize, mxq synth). Internal.
 *
 * A directory mxq writes into keeps a record, MXQ_RECORD_NAME, of the files
 * mxq writes there; it is written before any of them. With `force`, an
 * earlier run's files (and its temporaries, also of a run that was killed)
 * are removed, and nothing else: a file the new run would write that is
 * not in the record (another model's config.json, say) stops the run
 * instead of being replaced. */
#ifndef MXQ_CKPT_WRITER_H
#define MXQ_CKPT_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "io/fsutil.h"
#include "mxq/safetensors.h"

#define MXQ_RECORD_NAME ".mxq-output.json"

/* Make `dir` ready for the files named in `planned` (plain names): create
 * it, or check that it is empty, or with `force` remove what the record
 * says an earlier run wrote. Then record `planned`. No planned file may be
 * one of `inputs`. */
mxq_status mxq_ckpt_dir_prepare(mxq_ctx *ctx, const char *dir, int force, const char *const *planned,
                                size_t n_planned, const mxq_input_set *inputs, int *created);

/* After a failed run that wrote its record: if none of `planned` exists
 * (nothing was completed), remove the record, and the directory if this
 * run created it and it is now empty. Best effort; each rank removes its
 * own temporaries. */
void mxq_ckpt_dir_abandon(const char *dir, const char *const *planned, size_t n_planned, int created);

/* One shard: header and data of `tensors` into an output begun with
 * mxq_output_begin (committed by the caller). */
mxq_status mxq_st_write(mxq_ctx *ctx, mxq_output *out, const mxq_tensor_write *tensors, size_t count);

/* model.safetensors.index.json: {"metadata": {"total_size": N[, "format":
 * format]}, "weight_map": map}; `map` is a JSON object tensor -> shard.
 * With `pending`, it is left under its temporary name for the caller to
 * commit: the index is what makes a directory a checkpoint. */
struct json_t;
mxq_status mxq_ckpt_index_write(mxq_ctx *ctx, const char *dir, struct json_t *map, uint64_t total_size,
                                const char *format, const mxq_input_set *inputs, mxq_output *pending);

#endif
