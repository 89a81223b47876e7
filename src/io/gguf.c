#include "io/gguf.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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

mxq_status mxq_gguf_kv_raw(mxq_ctx *ctx, mxq_gguf *g, const char *key, mxq_gguf_value_type type, const void *value,
                           size_t size)
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
    return mxq_gguf_kv_raw(ctx, g, key, MXQ_GGUF_U32, &value, sizeof(value));
}

mxq_status mxq_gguf_kv_f32(mxq_ctx *ctx, mxq_gguf *g, const char *key, float value)
{
    return mxq_gguf_kv_raw(ctx, g, key, MXQ_GGUF_F32, &value, sizeof(value));
}

mxq_status mxq_gguf_kv_bool(mxq_ctx *ctx, mxq_gguf *g, const char *key, int value)
{
    const uint8_t b = value != 0;
    return mxq_gguf_kv_raw(ctx, g, key, MXQ_GGUF_BOOL, &b, 1);
}

static mxq_status array_begin(mxq_ctx *ctx, mxq_gguf *g, const char *key, uint32_t element_type, size_t n)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, kv_begin(ctx, g, key, MXQ_GGUF_ARRAY));
    CALL(ctx, put_u32(ctx, &g->kv, element_type));
    CALL(ctx, put_u64(ctx, &g->kv, n));
fail:
    return status;
}

mxq_status mxq_gguf_kv_strings(mxq_ctx *ctx, mxq_gguf *g, const char *key, const char *const *values, size_t n)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, array_begin(ctx, g, key, MXQ_GGUF_STRING, n));
    for (size_t i = 0; i < n; i++)
        CALL(ctx, put_string(ctx, &g->kv, values[i]));
fail:
    return status;
}

mxq_status mxq_gguf_kv_f32s(mxq_ctx *ctx, mxq_gguf *g, const char *key, const float *values, size_t n)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, array_begin(ctx, g, key, MXQ_GGUF_F32, n));
    CALL(ctx, append(ctx, &g->kv, values, n * sizeof(*values)));
fail:
    return status;
}

mxq_status mxq_gguf_kv_i32s(mxq_ctx *ctx, mxq_gguf *g, const char *key, const int32_t *values, size_t n)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, array_begin(ctx, g, key, MXQ_GGUF_I32, n));
    CALL(ctx, append(ctx, &g->kv, values, n * sizeof(*values)));
fail:
    return status;
}

static uint64_t padded(uint64_t n) { return (n + MXQ_GGUF_ALIGNMENT - 1) / MXQ_GGUF_ALIGNMENT * MXQ_GGUF_ALIGNMENT; }

mxq_status mxq_gguf_add_tensor(mxq_ctx *ctx, mxq_gguf *g, const char *name, mxq_ggml_type type, int n_dims,
                               const int64_t *ne)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, n_dims >= 1 && n_dims <= GGUF_MAX_DIMS, MXQ_ERR_ARG, "GGUF tensor '%s': %d dimensions", name, n_dims);
    uint64_t rows = 1, size = 0;
    for (int d = 0; d < n_dims; d++)
        CHECK(ctx, ne[d] >= 0 && (d == 0 || !__builtin_mul_overflow(rows, (uint64_t)ne[d], &rows)), MXQ_ERR_ARG,
              "GGUF tensor '%s': dimension %d (%lld) is negative or the size overflows", name, d, (long long)ne[d]);
    const size_t row = mxq_ggml_row_bytes(type, ne[0]);
    CHECK(ctx, row > 0 || ne[0] == 0, MXQ_ERR_ARG, "GGUF tensor '%s': rows of %lld elements cannot be %s", name,
          (long long)ne[0], mxq_ggml_type_name(type));
    CHECK(ctx, !__builtin_mul_overflow(rows, (uint64_t)row, &size) && size <= UINT64_MAX - g->data_size - MXQ_GGUF_ALIGNMENT,
          MXQ_ERR_ARG, "GGUF tensor '%s': its size overflows", name);
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
    t->size = size;
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

/* n bytes at the reader's position; `what` names them in the error */
static mxq_status take(gguf_reader *r, size_t n, const char *what, const uint8_t **out)
{
    mxq_status status = MXQ_OK;
    CHECK(r->ctx, n <= r->size - r->at, MXQ_ERR_FORMAT, "%s: ends inside %s (at byte %zu): not a whole GGUF file",
          r->path, what, r->at);
    *out = r->bytes + r->at;
    r->at += n;
fail:
    return status;
}

/* a little-endian value of n bytes, as this host's */
static mxq_status take_value(gguf_reader *r, size_t n, const char *what, void *v)
{
    const uint8_t *p;
    mxq_status status = take(r, n, what, &p);
    if (status == MXQ_OK)
        memcpy(v, p, n);
    return status;
}

static mxq_status take_u32(gguf_reader *r, const char *what, uint32_t *v) { return take_value(r, 4, what, v); }
static mxq_status take_u64(gguf_reader *r, const char *what, uint64_t *v) { return take_value(r, 8, what, v); }

/* bytes of a scalar type's value; 0 for strings, arrays and non-types */
static size_t scalar_size(uint32_t type)
{
    static const uint8_t sizes[] = {
        [MXQ_GGUF_U8] = 1,  [MXQ_GGUF_I8] = 1,  [MXQ_GGUF_U16] = 2, [MXQ_GGUF_I16] = 2,  [MXQ_GGUF_U32] = 4,
        [MXQ_GGUF_I32] = 4, [MXQ_GGUF_F32] = 4, [MXQ_GGUF_BOOL] = 1, [MXQ_GGUF_U64] = 8, [MXQ_GGUF_I64] = 8,
        [MXQ_GGUF_F64] = 8, /* strings and arrays: 0 */
    };
    return type < sizeof(sizes) ? sizes[type] : 0;
}

/* Skips one value of type `type`, as llama.cpp reads them: scalars,
 * strings, and arrays of scalars or strings (not of arrays). An array's
 * element type and count go to *array (when it is one). */
static mxq_status skip_value(gguf_reader *r, uint32_t type, mxq_gguf_array *array)
{
    mxq_status status = MXQ_OK;
    const uint8_t *p;
    uint64_t n = 0;
    CHECK(r->ctx, type <= MXQ_GGUF_F64, MXQ_ERR_FORMAT, "%s: value type %u at byte %zu is not a GGUF type", r->path,
          type, r->at);
    if (type == MXQ_GGUF_STRING) {
        CALL(r->ctx, take_u64(r, "a string's length", &n));
        CALL(r->ctx, take(r, (size_t)n, "a string", &p));
    } else if (type == MXQ_GGUF_ARRAY) {
        uint32_t element;
        CALL(r->ctx, take_u32(r, "an array's type", &element));
        CALL(r->ctx, take_u64(r, "an array's length", &n));
        CHECK(r->ctx, element <= MXQ_GGUF_F64 && element != MXQ_GGUF_ARRAY, MXQ_ERR_FORMAT,
              "%s: an array of element type %u at byte %zu (llama.cpp reads arrays of scalars or strings)", r->path,
              element, r->at);
        array->element = element, array->count = n, array->first = r->at;
        if (element == MXQ_GGUF_STRING) {
            for (uint64_t i = 0; i < n; i++)
                CALL(r->ctx, skip_value(r, element, NULL));
        } else {
            CHECK(r->ctx, n <= (r->size - r->at) / scalar_size(element), MXQ_ERR_FORMAT,
                  "%s: an array at byte %zu runs past the end", r->path, r->at);
            CALL(r->ctx, take(r, (size_t)n * scalar_size(element), "an array", &p));
        }
    } else {
        CALL(r->ctx, take(r, scalar_size(type), "a value", &p));
    }
fail:
    return status;
}

/* The arrays of the vocabulary keys, for the caller to check. */
static mxq_gguf_array *vocab_array(mxq_gguf_kvs *kvs, const char *key)
{
    return strcmp(key, "tokenizer.ggml.tokens") == 0       ? &kvs->tokens
           : strcmp(key, "tokenizer.ggml.scores") == 0     ? &kvs->scores
           : strcmp(key, "tokenizer.ggml.token_type") == 0 ? &kvs->token_types
           : strcmp(key, "tokenizer.ggml.model") == 0      ? &kvs->model
           : strcmp(key, "tokenizer.ggml.merges") == 0     ? &kvs->merges
                                                           : NULL;
}

/* The type llama.cpp reads tokenizer.ggml.`key` as, if `type` is not it
 * (NULL when it is, or when the key is not one it types): ids u32, flags
 * bool, the pre-tokenizer's name a string. */
static const char *vocab_key_type(const char *key, uint32_t type)
{
    static const char prefix[] = "tokenizer.ggml.";
    static const char *const flags[] = {"add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix",
                                        "remove_extra_whitespaces"};
    if (strncmp(key, prefix, strlen(prefix)) != 0)
        return NULL;
    const char *name = key + strlen(prefix);
    const size_t len = strlen(name), suffix = strlen("_token_id");
    if (len > suffix && strcmp(name + len - suffix, "_token_id") == 0)
        return type == MXQ_GGUF_U32 ? NULL : "u32";
    for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++)
        if (strcmp(name, flags[i]) == 0)
            return type == MXQ_GGUF_BOOL ? NULL : "bool";
    if (strcmp(name, "pre") == 0)
        return type == MXQ_GGUF_STRING ? NULL : "string";
    return NULL;
}

/* Key i: no NUL inside (it would be cut short). */
static mxq_status read_key(gguf_reader *r, uint64_t i, char *key)
{
    mxq_status status = MXQ_OK;
    uint64_t len;
    const uint8_t *p;
    CALL(r->ctx, take_u64(r, "a key's length", &len));
    CHECK(r->ctx, len > 0 && len < MXQ_GGUF_MAX_KEY, MXQ_ERR_FORMAT, "%s: key %llu is %llu bytes long (1 to %d are read)",
          r->path, (unsigned long long)i, (unsigned long long)len, MXQ_GGUF_MAX_KEY - 1);
    CALL(r->ctx, take(r, (size_t)len, "a key", &p));
    CHECK(r->ctx, memchr(p, 0, (size_t)len) == NULL, MXQ_ERR_FORMAT, "%s: key %llu has a NUL byte in it", r->path,
          (unsigned long long)i);
    memcpy(key, p, (size_t)len);
    key[len] = '\0';
fail:
    return status;
}

static int compare_keys(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* llama.cpp refuses a file with a key twice: sorted, neighbours differ. */
static mxq_status check_unique_keys(gguf_reader *r, char **keys, uint64_t n)
{
    mxq_status status = MXQ_OK;
    qsort(keys, (size_t)n, sizeof(char *), compare_keys);
    for (uint64_t i = 1; i < n; i++)
        CHECK(r->ctx, strcmp(keys[i - 1], keys[i]) != 0, MXQ_ERR_FORMAT, "%s: key '%s' appears twice", r->path, keys[i]);
fail:
    return status;
}

/* The header: magic, version 2 or 3, tensor and key-value counts. */
static mxq_status read_header(gguf_reader *r, uint64_t *n_kv)
{
    mxq_status status = MXQ_OK;
    const uint8_t *p;
    uint32_t version;
    uint64_t n_tensors;
    CALL(r->ctx, take(r, 4, "its magic", &p));
    CHECK(r->ctx, memcmp(p, "GGUF", 4) == 0, MXQ_ERR_FORMAT, "%s: not a GGUF file (no 'GGUF' magic)", r->path);
    CALL(r->ctx, take_u32(r, "its header", &version));
    CHECK(r->ctx, version == 2 || version == 3, MXQ_ERR_FORMAT, "%s: GGUF version %u (2 and 3 are read)", r->path,
          version);
    CALL(r->ctx, take_u64(r, "its header", &n_tensors));
    CALL(r->ctx, take_u64(r, "its header", n_kv));
    /* a key-value takes 12 bytes at least: a count beyond that is a lie */
    CHECK(r->ctx, *n_kv <= (r->size - r->at) / 12, MXQ_ERR_FORMAT, "%s: claims %llu key-values in %zu bytes", r->path,
          (unsigned long long)*n_kv, r->size);
fail:
    return status;
}

mxq_status mxq_gguf_copy_kvs(mxq_ctx *ctx, mxq_gguf *g, const char *path, const void *bytes, size_t size,
                             const char *prefix, mxq_gguf_kvs *kvs)
{
    mxq_status status = MXQ_OK;
    gguf_reader r = {ctx, path, bytes, size, 0};
    uint64_t n_kv = 0;
    char **keys = NULL;
    memset(kvs, 0, sizeof(*kvs));
    CALL(ctx, read_header(&r, &n_kv));
    keys = calloc(n_kv ? (size_t)n_kv : 1, sizeof(*keys));
    CHECK_ALLOC(ctx, keys, (size_t)n_kv * sizeof(*keys), "the GGUF's keys");
    for (uint64_t i = 0; i < n_kv; i++) {
        char key[MXQ_GGUF_MAX_KEY];
        uint32_t type;
        CALL(ctx, read_key(&r, i, key));
        keys[i] = strdup(key);
        CHECK_ALLOC(ctx, keys[i], strlen(key) + 1, "a GGUF key");
        CALL_IN(ctx, take_u32(&r, "a value's type", &type), "key '%s'", key);
        const size_t value_at = r.at;
        mxq_gguf_array scratch = {0}, *array = vocab_array(kvs, key);
        CALL_IN(ctx, skip_value(&r, type, array && type == MXQ_GGUF_ARRAY ? array : &scratch), "key '%s'", key);
        if (array) {
            array->present = 1, array->type = type;
            if (type != MXQ_GGUF_ARRAY)
                array->first = value_at;
        }
        const char *expected = vocab_key_type(key, type);
        if (expected && !kvs->bad_type_key[0]) {
            snprintf(kvs->bad_type_key, sizeof(kvs->bad_type_key), "%s", key);
            kvs->bad_type_expected = expected;
        }
        if (strncmp(key, prefix, strlen(prefix)) == 0) {
            CALL(ctx, mxq_gguf_kv_raw(ctx, g, key, (mxq_gguf_value_type)type, r.bytes + value_at, r.at - value_at));
            kvs->copied++;
        }
    }
    kvs->end = r.at;
    CALL(ctx, check_unique_keys(&r, keys, n_kv));
fail:
    for (uint64_t i = 0; keys && i < n_kv; i++)
        free(keys[i]);
    free(keys);
    return status;
}

/* Whether the GGUF in `map` has `key` exactly (not just a key it begins),
 * and when `want_string`, a string value. */
static int has_key(mxq_ctx *ctx, const char *path, const void *map, size_t size, const char *key, int want_string)
{
    mxq_gguf *scratch = NULL;
    mxq_gguf_kvs kvs;
    uint64_t len = 0;
    int found = mxq_gguf_create(ctx, &scratch) == MXQ_OK &&
                mxq_gguf_copy_kvs(ctx, scratch, path, map, size, key, &kvs) == MXQ_OK && scratch->kv.len >= 8;
    if (found) {
        memcpy(&len, scratch->kv.bytes, 8); /* the first key copied: the one, or one it begins */
        found = len == strlen(key);
    }
    if (found && want_string) {
        uint32_t type = 0;
        found = scratch->kv.len >= 12 + len;
        if (found)
            memcpy(&type, scratch->kv.bytes + 8 + len, 4), found = type == MXQ_GGUF_STRING;
    }
    mxq_gguf_free(scratch);
    return found;
}

/* mxq's own: its version key-value, and no general.quantization_version,
 * which llama.cpp's llama-quantize writes into what it makes of one (and
 * copies mxq.version into). */
int mxq_gguf_file_is_ours(const char *path)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC), ours = 0; /* a FIFO put in its place must not block */
    struct stat st;
    void *map = MAP_FAILED;
    mxq_ctx *ctx = NULL;
    if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0)
        map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    /* a context of its own: what is wrong with a file that is not mxq's is
     * no error of the caller's */
    if (map != MAP_FAILED && mxq_ctx_create(&ctx) == MXQ_OK)
        ours = has_key(ctx, path, map, (size_t)st.st_size, MXQ_GGUF_VERSION_KEY, 1) &&
               !has_key(ctx, path, map, (size_t)st.st_size, "general.quantization_version", 0);
    mxq_ctx_destroy(ctx);
    if (map != MAP_FAILED)
        munmap(map, (size_t)st.st_size);
    if (fd >= 0)
        close(fd);
    return ours;
}
