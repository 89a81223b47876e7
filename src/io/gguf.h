/* GGUF v3 writing (llama.cpp's model file). Internal.
 *
 * A file is: "GGUF", version 3, tensor count, key-value count (little-endian
 * u32, u32, u64, u64); the key-values (key: u64 length + bytes; value: u32
 * type + payload, arrays as element type + u64 count + elements); the tensor
 * infos (name, u32 n_dims, u64 ne[n_dims] with ne[0] the fastest-varying
 * dimension, u32 ggml type, u64 offset into the data); padding to the
 * alignment (general.alignment, 32 by default); the tensors' data, each at
 * its offset, padded to the alignment.
 *
 * Usage: collect the key-values and tensor infos, then write the header
 * through an mxq_output and stream each tensor's bytes in the order added. */
#ifndef MXQ_GGUF_H
#define MXQ_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "formats/mx_ggml.h"
#include "io/fsutil.h"
#include "mxq/core.h"

#define MXQ_GGUF_ALIGNMENT 32
/* the key-value mxq writes its version in: a GGUF with it is mxq's */
#define MXQ_GGUF_VERSION_KEY "mxq.version"

/* gguf value types */
typedef enum {
    MXQ_GGUF_U8 = 0,
    MXQ_GGUF_I8 = 1,
    MXQ_GGUF_U16 = 2,
    MXQ_GGUF_I16 = 3,
    MXQ_GGUF_U32 = 4,
    MXQ_GGUF_I32 = 5,
    MXQ_GGUF_F32 = 6,
    MXQ_GGUF_BOOL = 7,
    MXQ_GGUF_STRING = 8,
    MXQ_GGUF_ARRAY = 9,
    MXQ_GGUF_U64 = 10,
    MXQ_GGUF_I64 = 11,
    MXQ_GGUF_F64 = 12,
} mxq_gguf_value_type;

typedef struct mxq_gguf mxq_gguf;

mxq_status mxq_gguf_create(mxq_ctx *ctx, mxq_gguf **out);
void mxq_gguf_free(mxq_gguf *g);

mxq_status mxq_gguf_kv_string(mxq_ctx *ctx, mxq_gguf *g, const char *key, const char *value);
mxq_status mxq_gguf_kv_u32(mxq_ctx *ctx, mxq_gguf *g, const char *key, uint32_t value);
mxq_status mxq_gguf_kv_f32(mxq_ctx *ctx, mxq_gguf *g, const char *key, float value);
mxq_status mxq_gguf_kv_bool(mxq_ctx *ctx, mxq_gguf *g, const char *key, int value);
mxq_status mxq_gguf_kv_strings(mxq_ctx *ctx, mxq_gguf *g, const char *key, const char *const *values, size_t n);
mxq_status mxq_gguf_kv_f32s(mxq_ctx *ctx, mxq_gguf *g, const char *key, const float *values, size_t n);
mxq_status mxq_gguf_kv_i32s(mxq_ctx *ctx, mxq_gguf *g, const char *key, const int32_t *values, size_t n);
/* A key-value from its serialized value of type `type` (for an array:
 * element type, count, elements), `size` bytes: the scalar setters' path,
 * and a key-value copied from another GGUF as it is. */
mxq_status mxq_gguf_kv_raw(mxq_ctx *ctx, mxq_gguf *g, const char *key, mxq_gguf_value_type type, const void *value,
                           size_t size);

#define MXQ_GGUF_MAX_KEY 256 /* bytes of a key read, with its NUL */

/* An array value found by mxq_gguf_copy_kvs. */
typedef struct {
    int present;      /* the key was there */
    uint32_t type;    /* its value type (MXQ_GGUF_ARRAY when it is an array) */
    uint32_t element; /* an array's element type, its count, and where its first element is in the file */
    uint64_t count;
    size_t first;
} mxq_gguf_array;

/* What mxq_gguf_copy_kvs read: how many key-values it copied, where they
 * end in the file, and the vocabulary's arrays for the caller to check. */
typedef struct {
    int copied;
    size_t end;
    mxq_gguf_array tokens, scores, token_types; /* tokenizer.ggml.{tokens,scores,token_type} */
    mxq_gguf_array model, merges;               /* tokenizer.ggml.{model,merges}; a string's `first` is its length */
    /* the first tokenizer.ggml.* key of a type llama.cpp does not read it
     * as (*_token_id u32, add_* and the like bool, pre string), or "" */
    char bad_type_key[MXQ_GGUF_MAX_KEY];
    const char *bad_type_expected; /* "u32", "bool", "string" */
} mxq_gguf_kvs;

/* Copy every key-value of the GGUF file in `bytes` (`size` bytes, from
 * `path`) whose key starts with `prefix` ("tokenizer."). Reads the header
 * and key-values only, each bounded by the size, as llama.cpp would accept
 * them: no key twice, none with a NUL, no array of arrays. */
mxq_status mxq_gguf_copy_kvs(mxq_ctx *ctx, mxq_gguf *g, const char *path, const void *bytes, size_t size,
                             const char *prefix, mxq_gguf_kvs *kvs);

/* A GGUF file with the key-value MXQ_GGUF_VERSION_KEY. */
int mxq_gguf_file_is_ours(const char *path);

/* A tensor of `n_dims` dimensions, ne[0] the fastest-varying (a [rows, cols]
 * matrix is ne = {cols, rows}). Its data follows in the order added. */
mxq_status mxq_gguf_add_tensor(mxq_ctx *ctx, mxq_gguf *g, const char *name, mxq_ggml_type type, int n_dims,
                               const int64_t *ne);

/* Header, key-values, tensor infos and padding. */
mxq_status mxq_gguf_write_header(mxq_ctx *ctx, mxq_gguf *g, mxq_output *out);
/* The next tensor's data, in pieces of any size; a tensor's last piece
 * brings the padding after it. */
mxq_status mxq_gguf_write_data(mxq_ctx *ctx, mxq_gguf *g, mxq_output *out, const void *data, size_t size);
/* Every tensor's data was written in full. */
mxq_status mxq_gguf_finish(mxq_ctx *ctx, mxq_gguf *g);

#endif
