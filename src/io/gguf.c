#include "io/gguf.h"

#include <stdlib.h>
#include <string.h>

#include "core/check.h"

#define GGUF_MAX_DIMS 4

typedef struct {
    uint8_t *bytes;
    size_t len, cap;
} byte_buf;

typedef struct {
    char *name;
    mxq_ggml_type type;
    int n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    uint64_t size;   /* bytes of data */
    uint64_t offset; /* from the start of the data section */
} tensor_info;

struct mxq_gguf {
    byte_buf kv;
    uint64_t n_kv;
    tensor_info *tensors;
    size_t n_tensors, cap_tensors;
    uint64_t data_size; /* with every tensor's padding */
    size_t next;        /* tensor whose data comes next */
    uint64_t written;   /* of it */
};

static const struct {
    mxq_ggml_type type;
    const char *name;
    int block;       /* elements per block */
    int block_bytes; /* bytes per block */
} ggml_types[] = {
    {MXQ_GGML_F32, "F32", 1, 4},     {MXQ_GGML_F16, "F16", 1, 2},    {MXQ_GGML_Q4_0, "Q4_0", 32, 18},
    {MXQ_GGML_Q8_0, "Q8_0", 32, 34}, {MXQ_GGML_BF16, "BF16", 1, 2}, {MXQ_GGML_MXFP4, "MXFP4", 32, 17},
};

static int type_index(mxq_ggml_type type)
{
    for (size_t i = 0; i < sizeof(ggml_types) / sizeof(ggml_types[0]); i++)
        if (ggml_types[i].type == type)
            return (int)i;
    return -1;
}

size_t mxq_ggml_row_bytes(mxq_ggml_type type, int64_t n)
{
    int i = type_index(type);
    if (i < 0 || n < 0 || n % ggml_types[i].block != 0)
        return 0;
    return (size_t)(n / ggml_types[i].block) * (size_t)ggml_types[i].block_bytes;
}

const char *mxq_ggml_type_name(mxq_ggml_type type)
{
    int i = type_index(type);
    return i < 0 ? "?" : ggml_types[i].name;
}

static mxq_status append(mxq_ctx *ctx, byte_buf *b, const void *data, size_t len)
{
    mxq_status status = MXQ_OK;
    if (len == 0)
        return MXQ_OK;
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len)
            cap *= 2;
        uint8_t *grown = realloc(b->bytes, cap);
        CHECK_ALLOC(ctx, grown, cap, "the GGUF header");
        b->bytes = grown, b->cap = cap;
    }
    memcpy(b->bytes + b->len, data, len);
    b->len += len;
fail:
    return status;
}

/* Little-endian scalars, as the format says, written in host order. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF is written in host byte order");
static mxq_status put_u32(mxq_ctx *ctx, byte_buf *b, uint32_t v) { return append(ctx, b, &v, 4); }
static mxq_status put_u64(mxq_ctx *ctx, byte_buf *b, uint64_t v) { return append(ctx, b, &v, 8); }

static mxq_status put_string(mxq_ctx *ctx, byte_buf *b, const char *s)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, put_u64(ctx, b, strlen(s)));
    CALL(ctx, append(ctx, b, s, strlen(s)));
fail:
    return status;
}

mxq_status mxq_gguf_create(mxq_ctx *ctx, mxq_gguf **out)
{
    mxq_status status = MXQ_OK;
    *out = calloc(1, sizeof(**out));
    CHECK_ALLOC(ctx, *out, sizeof(**out), "a GGUF writer");
fail:
    return status;
}

void mxq_gguf_free(mxq_gguf *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->n_tensors; i++)
        free(g->tensors[i].name);
    free(g->tensors);
    free(g->kv.bytes);
    free(g);
}

/* key and value type; the caller appends the payload */
static mxq_status kv_begin(mxq_ctx *ctx, mxq_gguf *g, const char *key, uint32_t type)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, put_string(ctx, &g->kv, key));
    CALL(ctx, put_u32(ctx, &g->kv, type));
    g->n_kv++;
fail:
    return status;
}

mxq_status mxq_gguf_kv_string(mxq_ctx *ctx, mxq_gguf *g, const char *key, const char *value)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, kv_begin(ctx, g, key, MXQ_GGUF_STRING));
    CALL(ctx, put_string(ctx, &g->kv, value));
fail:
    return status;
}

mxq_status mxq_gguf_kv_raw(mxq_ctx *ctx, mxq_gguf *g, const char *key, uint32_t type, const void *value, size_t size)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, kv_begin(ctx, g, key, type));
    CALL(ctx, append(ctx, &g->kv, value, size));
fail:
    return status;
}

/* Scalars are their little-endian bytes, as this host's. */
mxq_status mxq_gguf_kv_u32(mxq_ctx *ctx, mxq_gguf *g, const char *key, uint32_t value)
{
    return mxq_gguf_kv_raw(ctx, g, key, MXQ_GGUF_U32, &value, 4);
}

mxq_status mxq_gguf_kv_f32(mxq_ctx *ctx, mxq_gguf *g, const char *key, float value)
{
    return mxq_gguf_kv_raw(ctx, g, key, MXQ_GGUF_F32, &value, 4);
}

mxq_status mxq_gguf_kv_bool(mxq_ctx *ctx, mxq_gguf *g, const char *key, int value)
{
    const uint8_t b = value != 0;
    return mxq_gguf_kv_raw(ctx, g, key, MXQ_GGUF_BOOL, &b, 1);
}

/* An array of n elements of element_type; `values` (NULL for strings, which
 * the caller appends) holds them as they are written, `size` bytes. */
static mxq_status kv_array(mxq_ctx *ctx, mxq_gguf *g, const char *key, uint32_t element_type, size_t n,
                           const void *values, size_t size)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, kv_begin(ctx, g, key, MXQ_GGUF_ARRAY));
    CALL(ctx, put_u32(ctx, &g->kv, element_type));
    CALL(ctx, put_u64(ctx, &g->kv, n));
    if (values)
        CALL(ctx, append(ctx, &g->kv, values, size));
fail:
    return status;
}

mxq_status mxq_gguf_kv_strings(mxq_ctx *ctx, mxq_gguf *g, const char *key, const char *const *values, size_t n)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, kv_array(ctx, g, key, MXQ_GGUF_STRING, n, NULL, 0));
    for (size_t i = 0; i < n; i++)
        CALL(ctx, put_string(ctx, &g->kv, values[i]));
fail:
    return status;
}

mxq_status mxq_gguf_kv_f32s(mxq_ctx *ctx, mxq_gguf *g, const char *key, const float *values, size_t n)
{
    return kv_array(ctx, g, key, MXQ_GGUF_F32, n, values, 4 * n);
}

mxq_status mxq_gguf_kv_i32s(mxq_ctx *ctx, mxq_gguf *g, const char *key, const int32_t *values, size_t n)
{
    return kv_array(ctx, g, key, MXQ_GGUF_I32, n, values, 4 * n);
}

static uint64_t padded(uint64_t n) { return (n + MXQ_GGUF_ALIGNMENT - 1) / MXQ_GGUF_ALIGNMENT * MXQ_GGUF_ALIGNMENT; }

mxq_status mxq_gguf_add_tensor(mxq_ctx *ctx, mxq_gguf *g, const char *name, mxq_ggml_type type, int n_dims,
                               const int64_t *ne)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, n_dims >= 1 && n_dims <= GGUF_MAX_DIMS, MXQ_ERR_ARG, "GGUF tensor '%s': %d dimensions", name, n_dims);
    uint64_t rows = 1;
    for (int d = 1; d < n_dims; d++)
        rows *= (uint64_t)ne[d];
    const size_t row = mxq_ggml_row_bytes(type, ne[0]);
    CHECK(ctx, row > 0 || ne[0] == 0, MXQ_ERR_ARG, "GGUF tensor '%s': rows of %lld elements cannot be %s", name,
          (long long)ne[0], mxq_ggml_type_name(type));
    if (g->n_tensors == g->cap_tensors) {
        size_t cap = g->cap_tensors ? 2 * g->cap_tensors : 64;
        tensor_info *grown = realloc(g->tensors, cap * sizeof(*grown));
        CHECK_ALLOC(ctx, grown, cap * sizeof(*grown), "the GGUF tensor list");
        g->tensors = grown, g->cap_tensors = cap;
    }
    tensor_info *t = &g->tensors[g->n_tensors];
    memset(t, 0, sizeof(*t));
    t->name = strdup(name);
    CHECK_ALLOC(ctx, t->name, strlen(name) + 1, "a tensor name");
    t->type = type, t->n_dims = n_dims;
    memcpy(t->ne, ne, (size_t)n_dims * sizeof(int64_t));
    t->size = rows * row;
    t->offset = g->data_size;
    g->data_size += padded(t->size);
    g->n_tensors++;
fail:
    return status;
}

static const uint8_t zeros[MXQ_GGUF_ALIGNMENT];

mxq_status mxq_gguf_write_header(mxq_ctx *ctx, mxq_gguf *g, mxq_output *out)
{
    mxq_status status = MXQ_OK;
    byte_buf head = {0};
    CALL(ctx, append(ctx, &head, "GGUF", 4));
    CALL(ctx, put_u32(ctx, &head, 3));
    CALL(ctx, put_u64(ctx, &head, g->n_tensors));
    CALL(ctx, put_u64(ctx, &head, g->n_kv));
    CALL(ctx, append(ctx, &head, g->kv.bytes, g->kv.len));
    for (size_t i = 0; i < g->n_tensors; i++) {
        const tensor_info *t = &g->tensors[i];
        CALL(ctx, put_string(ctx, &head, t->name));
        CALL(ctx, put_u32(ctx, &head, (uint32_t)t->n_dims));
        for (int d = 0; d < t->n_dims; d++)
            CALL(ctx, put_u64(ctx, &head, (uint64_t)t->ne[d]));
        CALL(ctx, put_u32(ctx, &head, (uint32_t)t->type));
        CALL(ctx, put_u64(ctx, &head, t->offset));
    }
    CALL(ctx, append(ctx, &head, zeros, padded(head.len) - head.len));
    CALL(ctx, mxq_output_write(ctx, out, head.bytes, head.len));
    g->next = 0, g->written = 0;
fail:
    free(head.bytes);
    return status;
}

mxq_status mxq_gguf_write_data(mxq_ctx *ctx, mxq_gguf *g, mxq_output *out, const void *data, size_t size)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, g->next < g->n_tensors, MXQ_ERR_ARG, "GGUF: data after the last tensor");
    const tensor_info *t = &g->tensors[g->next];
    CHECK(ctx, g->written + size <= t->size, MXQ_ERR_ARG, "GGUF tensor '%s': %llu bytes written, it holds %llu",
          t->name, (unsigned long long)(g->written + size), (unsigned long long)t->size);
    CALL(ctx, mxq_output_write(ctx, out, data, size));
    g->written += size;
    if (g->written == t->size) {
        CALL(ctx, mxq_output_write(ctx, out, zeros, padded(t->size) - t->size));
        g->next++, g->written = 0;
    }
fail:
    return status;
}

mxq_status mxq_gguf_finish(mxq_ctx *ctx, mxq_gguf *g)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, g->next == g->n_tensors, MXQ_ERR_ARG, "GGUF: tensor '%s' has not had its data",
          g->next < g->n_tensors ? g->tensors[g->next].name : "?");
fail:
    return status;
}

/* ---- reading another GGUF's key-values (--vocab-from) -------------------- */

typedef struct {
    mxq_ctx *ctx;
    const char *path;
    const uint8_t *bytes;
    size_t size, at;
} gguf_reader;

static mxq_status take(gguf_reader *r, size_t n, const uint8_t **out)
{
    mxq_status status = MXQ_OK;
    CHECK(r->ctx, n <= r->size - r->at, MXQ_ERR_FORMAT, "%s: ends inside its key-values (at byte %zu): not a GGUF file",
          r->path, r->at);
    *out = r->bytes + r->at;
    r->at += n;
fail:
    return status;
}

static mxq_status take_u64(gguf_reader *r, uint64_t *v)
{
    const uint8_t *p;
    mxq_status status = take(r, 8, &p);
    if (status == MXQ_OK)
        memcpy(v, p, 8);
    return status;
}

/* Skips one value of type `type` (depth: arrays of arrays are bounded). */
static mxq_status skip_value(gguf_reader *r, uint32_t type, int depth)
{
    static const uint8_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    mxq_status status = MXQ_OK;
    const uint8_t *p;
    uint64_t n = 0;
    CHECK(r->ctx, type <= 12, MXQ_ERR_FORMAT, "%s: value type %u at byte %zu is not a GGUF type", r->path, type, r->at);
    CHECK(r->ctx, depth < 4, MXQ_ERR_FORMAT, "%s: arrays nested more than 4 deep at byte %zu", r->path, r->at);
    if (type == MXQ_GGUF_STRING) {
        CALL(r->ctx, take_u64(r, &n));
        CALL(r->ctx, take(r, (size_t)n, &p));
    } else if (type == MXQ_GGUF_ARRAY) {
        uint32_t element;
        CALL(r->ctx, take(r, 4, &p));
        memcpy(&element, p, 4);
        CALL(r->ctx, take_u64(r, &n));
        if (element != MXQ_GGUF_STRING && element != MXQ_GGUF_ARRAY && element <= 12) {
            CHECK(r->ctx, n <= (r->size - r->at) / sizes[element], MXQ_ERR_FORMAT, "%s: an array at byte %zu runs past the end",
                  r->path, r->at);
            CALL(r->ctx, take(r, (size_t)n * sizes[element], &p));
        } else {
            for (uint64_t i = 0; i < n; i++)
                CALL(r->ctx, skip_value(r, element, depth + 1));
        }
    } else {
        CALL(r->ctx, take(r, sizes[type], &p));
    }
fail:
    return status;
}

mxq_status mxq_gguf_copy_kvs(mxq_ctx *ctx, mxq_gguf *g, const char *path, const void *bytes, size_t size,
                             const char *prefix, int *copied, uint64_t *n_tokens)
{
    mxq_status status = MXQ_OK;
    gguf_reader r = {ctx, path, bytes, size, 0};
    const uint8_t *p;
    uint32_t version;
    uint64_t n_tensors, n_kv;
    *copied = 0;
    *n_tokens = 0;
    CALL(ctx, take(&r, 8, &p));
    CHECK(ctx, memcmp(p, "GGUF", 4) == 0, MXQ_ERR_FORMAT, "%s: not a GGUF file (no 'GGUF' magic)", path);
    memcpy(&version, p + 4, 4);
    CHECK(ctx, version == 2 || version == 3, MXQ_ERR_FORMAT, "%s: GGUF version %u (2 and 3 are read)", path, version);
    CALL(ctx, take_u64(&r, &n_tensors));
    CALL(ctx, take_u64(&r, &n_kv));
    for (uint64_t i = 0; i < n_kv; i++) {
        uint64_t key_len;
        uint32_t type;
        CALL(ctx, take_u64(&r, &key_len));
        CHECK(ctx, key_len < 256, MXQ_ERR_FORMAT, "%s: key %llu is %llu bytes long (at most 255 are read)", path,
              (unsigned long long)i, (unsigned long long)key_len);
        char key[256];
        CALL(ctx, take(&r, (size_t)key_len, &p));
        memcpy(key, p, (size_t)key_len);
        key[key_len] = '\0';
        CALL(ctx, take(&r, 4, &p));
        memcpy(&type, p, 4);
        const size_t value_at = r.at;
        CALL(ctx, skip_value(&r, type, 0));
        if (strcmp(key, "tokenizer.ggml.tokens") == 0) {
            uint32_t element = 0;
            if (type == MXQ_GGUF_ARRAY)
                memcpy(&element, r.bytes + value_at, 4);
            CHECK(ctx, type == MXQ_GGUF_ARRAY && element == MXQ_GGUF_STRING, MXQ_ERR_FORMAT,
                  "%s: tokenizer.ggml.tokens is not an array of strings", path);
            memcpy(n_tokens, r.bytes + value_at + 4, 8); /* element type, then the count */
        }
        if (strncmp(key, prefix, strlen(prefix)) == 0) {
            CALL(ctx, mxq_gguf_kv_raw(ctx, g, key, type, r.bytes + value_at, r.at - value_at));
            (*copied)++;
        }
    }
fail:
    return status;
}
