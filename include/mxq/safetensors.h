/* safetensors checkpoints: one file, or shards listed by
 * model.safetensors.index.json. Files are mmap'ed read-only, so a rank only
 * pages in the tensors it actually touches. Headers are validated in full
 * when a file is opened: bounded size, well-formed JSON, known dtypes,
 * offsets inside the data area, no overlapping tensors, and shape x dtype size
 * equal to the byte length. */
#ifndef MXQ_SAFETENSORS_H
#define MXQ_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MXQ_ST_HEADER_MAX ((uint64_t)100 * 1000 * 1000) /* 100 MB */
#define MXQ_ST_MAX_RANK 8

typedef enum {
    MXQ_DT_F32 = 0,
    MXQ_DT_F16,
    MXQ_DT_BF16,
    MXQ_DT_F64,
    MXQ_DT_I8,
    MXQ_DT_U8,
    MXQ_DT_I16,
    MXQ_DT_I32,
    MXQ_DT_I64,
    MXQ_DT_BOOL,
    MXQ_DT_COUNT
} mxq_dtype;

const char *mxq_dtype_name(mxq_dtype dtype); /* "F32", "BF16", ... as in the files */
size_t mxq_dtype_size(mxq_dtype dtype);
/* -1 if the name is not a safetensors dtype mxq knows */
int mxq_dtype_by_name(const char *name, mxq_dtype *out);

typedef struct {
    const char *name;
    mxq_dtype dtype;
    int rank;
    int64_t shape[MXQ_ST_MAX_RANK];
    size_t numel;
    size_t nbytes;
    const void *data;  /* inside the mapping; valid while the file is open */
    const char *file;  /* path of the file holding it, for messages */
} mxq_tensor_view;

typedef struct mxq_st_file mxq_st_file;

mxq_status mxq_st_file_open(mxq_ctx *ctx, const char *path, mxq_st_file **out);
void mxq_st_file_close(mxq_st_file *file);
size_t mxq_st_file_count(const mxq_st_file *file);
const mxq_tensor_view *mxq_st_file_tensor(const mxq_st_file *file, size_t index);
const mxq_tensor_view *mxq_st_file_find(const mxq_st_file *file, const char *name);

/* A checkpoint directory: model.safetensors, or the shards named by
 * model.safetensors.index.json (every shard it names must exist; shards are
 * opened on first use). */
typedef struct mxq_checkpoint mxq_checkpoint;

mxq_status mxq_checkpoint_open(mxq_ctx *ctx, const char *dir, mxq_checkpoint **out);
void mxq_checkpoint_close(mxq_checkpoint *ckpt);
const char *mxq_checkpoint_dir(const mxq_checkpoint *ckpt);
/* Fails with a message naming the tensor and the directory if it is absent. */
mxq_status mxq_checkpoint_get(mxq_ctx *ctx, mxq_checkpoint *ckpt, const char *name, const mxq_tensor_view **out);
/* Like mxq_checkpoint_get, but an absent tensor gives *out = NULL and MXQ_OK;
 * only unreadable files are errors. */
mxq_status mxq_checkpoint_lookup(mxq_ctx *ctx, mxq_checkpoint *ckpt, const char *name, const mxq_tensor_view **out);
/* Every tensor name in the checkpoint (pointers valid while it is open; the
 * array is the caller's to free). */
mxq_status mxq_checkpoint_names(mxq_ctx *ctx, mxq_checkpoint *ckpt, const char ***names, size_t *count);

/* Convert a floating-point tensor (F32, F16, BF16) to float32, checking that
 * its shape is exactly `shape[rank]`. `out` holds numel floats. */
mxq_status mxq_tensor_to_f32(mxq_ctx *ctx, const mxq_tensor_view *tensor, int rank, const int64_t *shape,
                             float *out);

/* Writing (mxq synth, mxq quantize): one shard from a list of tensors, under
 * a temporary name renamed into place when complete. */
typedef struct {
    const char *name;
    mxq_dtype dtype;
    int rank;
    int64_t shape[MXQ_ST_MAX_RANK];
    const void *data; /* numel * dtype size bytes */
} mxq_tensor_write;

mxq_status mxq_st_write_file(mxq_ctx *ctx, const char *path, const mxq_tensor_write *tensors, size_t count);

float mxq_bf16_to_f32(uint16_t bits);
uint16_t mxq_f32_to_bf16(float value); /* round to nearest even; NaN stays NaN */
float mxq_f16_to_f32(uint16_t bits);

#ifdef __cplusplus
}
#endif

#endif
