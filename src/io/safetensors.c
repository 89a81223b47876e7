#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "io/shape_text.h"
#include "io/ckpt_writer.h"
#include "io/fsutil.h"
#include "io/tensor_views.h"
#include "mxq/safetensors.h"

static const struct {
    const char *name;
    size_t size;
} dtype_table[MXQ_DT_COUNT] = {
    [MXQ_DT_F32] = {"F32", 4}, [MXQ_DT_F16] = {"F16", 2}, [MXQ_DT_BF16] = {"BF16", 2}, [MXQ_DT_F64] = {"F64", 8},
    [MXQ_DT_I8] = {"I8", 1},   [MXQ_DT_U8] = {"U8", 1},   [MXQ_DT_I16] = {"I16", 2},   [MXQ_DT_I32] = {"I32", 4},
    [MXQ_DT_I64] = {"I64", 8}, [MXQ_DT_BOOL] = {"BOOL", 1},
};

const char *mxq_dtype_name(mxq_dtype dtype)
{
    return (unsigned)dtype < MXQ_DT_COUNT ? dtype_table[dtype].name : "?";
}

size_t mxq_dtype_size(mxq_dtype dtype)
{
    return (unsigned)dtype < MXQ_DT_COUNT ? dtype_table[dtype].size : 0;
}

int mxq_dtype_by_name(const char *name, mxq_dtype *out)
{
    for (int i = 0; i < MXQ_DT_COUNT; i++)
        if (strcmp(dtype_table[i].name, name) == 0) {
            *out = (mxq_dtype)i;
            return 0;
        }
    return -1;
}

float mxq_bf16_to_f32(uint16_t bits)
{
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t mxq_f32_to_bf16(float value)
{
    uint32_t u;
    memcpy(&u, &value, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);       /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float mxq_f16_to_f32(uint16_t bits)
{
    uint32_t sign = (uint32_t)(bits >> 15) << 31;
    int exponent = (bits >> 10) & 0x1f;
    uint32_t mantissa = bits & 0x3ffu;
    float magnitude;
    if (exponent == 0)
        magnitude = ldexpf((float)mantissa, -24);
    else if (exponent == 31)
        magnitude = mantissa ? NAN : INFINITY;
    else
        magnitude = ldexpf((float)(mantissa | 0x400u), exponent - 25);
    uint32_t u;
    memcpy(&u, &magnitude, 4);
    u |= sign;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- one file ------------------------------------------------------------ */

struct mxq_st_file {
    char *path;
    void *map;
    size_t map_size;
    size_t count;
    mxq_tensor_view *tensors;
    char **names;
};

static int compare_by_offset(const void *a, const void *b)
{
    const mxq_tensor_view *x = *(const mxq_tensor_view *const *)a;
    const mxq_tensor_view *y = *(const mxq_tensor_view *const *)b;
    const char *px = x->data, *py = y->data;
    return (px > py) - (px < py);
}

static int json_nonneg_int(const json_t *value, int64_t *out)
{
    if (!json_is_integer(value) || json_integer_value(value) < 0)
        return -1;
    *out = (int64_t)json_integer_value(value);
    return 0;
}

/* Validate one header entry and fill `view`. */
static mxq_status parse_entry(mxq_ctx *ctx, const char *path, const char *name, json_t *entry, const char *data,
                              size_t data_size, mxq_tensor_view *view)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, json_is_object(entry), MXQ_ERR_FORMAT, "%s: header entry for tensor '%s' is not a JSON object", path,
          name);
    json_t *dtype = json_object_get(entry, "dtype");
    json_t *shape = json_object_get(entry, "shape");
    json_t *offsets = json_object_get(entry, "data_offsets");
    CHECK(ctx, json_is_string(dtype), MXQ_ERR_FORMAT, "%s: tensor '%s' has no string 'dtype'", path, name);
    CHECK(ctx, mxq_dtype_by_name(json_string_value(dtype), &view->dtype) == 0, MXQ_ERR_FORMAT,
          "%s: tensor '%s' has unknown dtype '%s'", path, name, json_string_value(dtype));
    CHECK(ctx, json_is_array(shape), MXQ_ERR_FORMAT, "%s: tensor '%s' has no 'shape' array", path, name);
    size_t rank = json_array_size(shape);
    CHECK(ctx, rank <= MXQ_ST_MAX_RANK, MXQ_ERR_FORMAT, "%s: tensor '%s' has %zu dimensions (at most %d supported)",
          path, name, rank, MXQ_ST_MAX_RANK);
    view->rank = (int)rank;
    size_t numel = 1;
    for (size_t i = 0; i < rank; i++) {
        int64_t dim;
        CHECK(ctx, json_nonneg_int(json_array_get(shape, i), &dim) == 0, MXQ_ERR_FORMAT,
              "%s: tensor '%s' shape[%zu] is not a non-negative integer", path, name, i);
        view->shape[i] = dim;
        CHECK(ctx, dim == 0 || numel <= SIZE_MAX / (size_t)dim, MXQ_ERR_FORMAT, "%s: tensor '%s' shape overflows",
              path, name);
        numel *= (size_t)dim;
    }
    view->numel = numel;
    CHECK(ctx, json_is_array(offsets) && json_array_size(offsets) == 2, MXQ_ERR_FORMAT,
          "%s: tensor '%s' has no 'data_offsets' [begin, end]", path, name);
    int64_t begin, end;
    CHECK(ctx, json_nonneg_int(json_array_get(offsets, 0), &begin) == 0 &&
                   json_nonneg_int(json_array_get(offsets, 1), &end) == 0,
          MXQ_ERR_FORMAT, "%s: tensor '%s' data_offsets are not non-negative integers", path, name);
    CHECK(ctx, begin <= end, MXQ_ERR_FORMAT, "%s: tensor '%s' data_offsets [%lld, %lld] end before they begin", path,
          name, (long long)begin, (long long)end);
    CHECK(ctx, (uint64_t)end <= data_size, MXQ_ERR_FORMAT,
          "%s: tensor '%s' data_offsets [%lld, %lld] lie outside the data area of %zu bytes (truncated file?)", path, name,
          (long long)begin, (long long)end, data_size);
    size_t dsize = mxq_dtype_size(view->dtype);
    CHECK(ctx, numel <= SIZE_MAX / dsize && (uint64_t)(end - begin) == (uint64_t)numel * dsize, MXQ_ERR_FORMAT,
          "%s: tensor '%s' is %s with %zu elements (%zu bytes) but data_offsets span %lld bytes", path, name,
          mxq_dtype_name(view->dtype), numel, numel * dsize, (long long)(end - begin));
    view->nbytes = (size_t)(end - begin);
    view->data = data + begin;
    view->file = path;
fail:
    return status;
}

/* Map the file and check its 8-byte header length against its size. */
static mxq_status map_file(mxq_ctx *ctx, mxq_st_file *f, uint64_t *header_len)
{
    mxq_status status = MXQ_OK;
    int fd = -1;
    struct stat st;
    const char *path = f->path;
    CALL(ctx, mxq_input_open(ctx, path, "safetensors file", &fd));
    CHECK(ctx, fstat(fd, &st) == 0, MXQ_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
    size_t size = (size_t)st.st_size;
    CHECK(ctx, size >= 8, MXQ_ERR_FORMAT, "%s: truncated safetensors file (%zu bytes, shorter than the 8-byte header length)",
          path, size);
    f->map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    CHECK(ctx, f->map != MAP_FAILED, MXQ_ERR_IO, "cannot map '%s': %s", path, strerror(errno));
    f->map_size = size;
    const unsigned char *bytes = f->map;
    *header_len = 0;
    for (int i = 7; i >= 0; i--)
        *header_len = *header_len << 8 | bytes[i];
    CHECK(ctx, *header_len <= MXQ_ST_HEADER_MAX, MXQ_ERR_FORMAT,
          "%s: safetensors header length %llu exceeds the %llu-byte limit (corrupt or not a safetensors file)", path,
          (unsigned long long)*header_len, (unsigned long long)MXQ_ST_HEADER_MAX);
    CHECK(ctx, *header_len + 8 <= size, MXQ_ERR_FORMAT,
          "%s: truncated safetensors file: 8 + a header of %llu bytes, but the file has %zu", path,
          (unsigned long long)*header_len, size);
fail:
    if (fd >= 0)
        close(fd);
    return status;
}

/* Every header entry into the tensor table. */
static mxq_status parse_header(mxq_ctx *ctx, mxq_st_file *f, json_t *root, const char *data, size_t data_size)
{
    mxq_status status = MXQ_OK;
    size_t n = json_object_size(root) - (json_object_get(root, "__metadata__") ? 1 : 0);
    f->tensors = calloc(n ? n : 1, sizeof(*f->tensors));
    f->names = calloc(n ? n : 1, sizeof(*f->names));
    CHECK_ALLOC(ctx, f->tensors && f->names, n * sizeof(*f->tensors), "the tensor table");
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value)
    {
        if (strcmp(key, "__metadata__") == 0) {
            CHECK(ctx, json_is_object(value), MXQ_ERR_FORMAT, "%s: __metadata__ is not a JSON object", f->path);
            continue;
        }
        mxq_tensor_view *view = &f->tensors[f->count];
        f->names[f->count] = strdup(key);
        CHECK_ALLOC(ctx, f->names[f->count], strlen(key) + 1, "a tensor name");
        view->name = f->names[f->count];
        f->count++;
        CALL(ctx, parse_entry(ctx, f->path, key, value, data, data_size, view));
    }
fail:
    return status;
}

/* No two tensors may share bytes: sort by start, compare neighbours. */
static mxq_status check_overlaps(mxq_ctx *ctx, const mxq_st_file *f)
{
    mxq_status status = MXQ_OK;
    mxq_tensor_view **order = malloc((f->count ? f->count : 1) * sizeof(*order));
    CHECK_ALLOC(ctx, order, f->count * sizeof(*order), "the overlap check");
    size_t nonempty = 0;
    for (size_t i = 0; i < f->count; i++)
        if (f->tensors[i].nbytes > 0)
            order[nonempty++] = &f->tensors[i];
    qsort(order, nonempty, sizeof(*order), compare_by_offset);
    for (size_t i = 1; i < nonempty; i++) {
        const char *prev_end = (const char *)order[i - 1]->data + order[i - 1]->nbytes;
        CHECK(ctx, prev_end <= (const char *)order[i]->data, MXQ_ERR_FORMAT,
              "%s: tensors '%s' and '%s' overlap in the data area", f->path, order[i - 1]->name, order[i]->name);
    }
fail:
    free(order);
    return status;
}

mxq_status mxq_st_file_open(mxq_ctx *ctx, const char *path, mxq_st_file **out)
{
    mxq_status status = MXQ_OK;
    mxq_st_file *f = NULL;
    json_t *root = NULL;
    uint64_t header_len = 0;
    json_error_t jerr;
    *out = NULL;
    f = calloc(1, sizeof(*f));
    CHECK_ALLOC(ctx, f, sizeof(*f), "a safetensors file handle");
    f->path = strdup(path);
    CHECK_ALLOC(ctx, f->path, strlen(path) + 1, "a file name");
    CALL(ctx, map_file(ctx, f, &header_len));
    const char *bytes = f->map;
    root = json_loadb(bytes + 8, (size_t)header_len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    CHECK(ctx, root != NULL, MXQ_ERR_FORMAT, "%s: safetensors header is not valid JSON: %s (at byte %d of the header)",
          path, jerr.text, jerr.position);
    CHECK(ctx, json_is_object(root), MXQ_ERR_FORMAT, "%s: safetensors header is not a JSON object", path);
    CALL(ctx, parse_header(ctx, f, root, bytes + 8 + header_len, f->map_size - 8 - (size_t)header_len));
    CALL(ctx, check_overlaps(ctx, f));
    json_decref(root);
    *out = f;
    return MXQ_OK;
fail:
    json_decref(root);
    mxq_st_file_close(f);
    return status;
}

void mxq_st_file_close(mxq_st_file *f)
{
    if (!f)
        return;
    if (f->map && f->map != MAP_FAILED)
        munmap(f->map, f->map_size);
    for (size_t i = 0; i < f->count; i++)
        free(f->names[i]);
    free(f->names);
    free(f->tensors);
    free(f->path);
    free(f);
}

size_t mxq_st_file_count(const mxq_st_file *f) { return f->count; }
const mxq_tensor_view *mxq_st_file_tensor(const mxq_st_file *f, size_t i) { return i < f->count ? &f->tensors[i] : NULL; }

const mxq_tensor_view *mxq_st_file_find(const mxq_st_file *f, const char *name)
{
    for (size_t i = 0; i < f->count; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    return NULL;
}

/* ---- a checkpoint directory ---------------------------------------------- */

struct mxq_checkpoint {
    char *dir;
    size_t n_shards;
    char **shard_paths;
    mxq_st_file **shards; /* opened on first use */
    json_t *weight_map;   /* name -> shard file name; NULL for a single file */
};

static char *join_path(const char *dir, const char *name)
{
    size_t len = strlen(dir) + strlen(name) + 2;
    char *p = malloc(len);
    if (p)
        snprintf(p, len, "%s/%s", dir, name);
    return p;
}

mxq_status mxq_checkpoint_open(mxq_ctx *ctx, const char *dir, mxq_checkpoint **out)
{
    mxq_status status = MXQ_OK;
    mxq_checkpoint *c = NULL;
    char *index_path = NULL, *single_path = NULL;
    json_t *index = NULL;
    *out = NULL;

    struct stat st;
    CHECK(ctx, stat(dir, &st) == 0, MXQ_ERR_IO, "cannot open model directory '%s': %s", dir, strerror(errno));
    CHECK(ctx, S_ISDIR(st.st_mode), MXQ_ERR_IO, "model path '%s' is not a directory", dir);
    c = calloc(1, sizeof(*c));
    CHECK_ALLOC(ctx, c, sizeof(*c), "a checkpoint handle");
    c->dir = strdup(dir);
    index_path = join_path(dir, "model.safetensors.index.json");
    single_path = join_path(dir, "model.safetensors");
    CHECK_ALLOC(ctx, c->dir && index_path && single_path, strlen(dir) + 64, "checkpoint paths");

    if (access(index_path, F_OK) == 0) {
        CALL(ctx, mxq_json_read(ctx, index_path, "checkpoint index", &index));
        json_t *map = json_object_get(index, "weight_map");
        CHECK(ctx, json_is_object(map), MXQ_ERR_FORMAT, "%s: missing the 'weight_map' object", index_path);
        /* Distinct shard names, in order of first appearance. */
        size_t cap = json_object_size(map) ? json_object_size(map) : 1;
        c->shard_paths = calloc(cap, sizeof(char *));
        c->shards = calloc(cap, sizeof(mxq_st_file *));
        CHECK_ALLOC(ctx, c->shard_paths && c->shards, cap * sizeof(char *), "the shard table");
        const char *key;
        json_t *value;
        json_object_foreach(map, key, value)
        {
            CHECK(ctx, json_is_string(value), MXQ_ERR_FORMAT, "%s: weight_map entry '%s' is not a file name",
                  index_path, key);
            const char *shard = json_string_value(value);
            CHECK(ctx, strchr(shard, '/') == NULL && shard[0] != '\0' && strcmp(shard, "..") != 0, MXQ_ERR_FORMAT,
                  "%s: weight_map entry '%s' names '%s', which is not a file in the model directory", index_path, key,
                  shard);
            int known = 0;
            for (size_t i = 0; i < c->n_shards && !known; i++) {
                const char *base = strrchr(c->shard_paths[i], '/') + 1;
                known = strcmp(base, shard) == 0;
            }
            if (!known) {
                char *p = join_path(dir, shard);
                CHECK_ALLOC(ctx, p, strlen(dir) + strlen(shard) + 2, "a shard path");
                c->shard_paths[c->n_shards++] = p;
                CHECK(ctx, access(p, R_OK) == 0, MXQ_ERR_IO,
                      "%s names shard '%s' (for tensor '%s'), which cannot be read: %s", index_path, shard, key,
                      strerror(errno));
            }
        }
        c->weight_map = json_incref(map);
    } else {
        CHECK(ctx, access(single_path, R_OK) == 0, MXQ_ERR_IO,
              "model directory '%s' has neither model.safetensors nor model.safetensors.index.json", dir);
        c->shard_paths = calloc(1, sizeof(char *));
        c->shards = calloc(1, sizeof(mxq_st_file *));
        CHECK_ALLOC(ctx, c->shard_paths && c->shards, sizeof(char *), "the shard table");
        c->shard_paths[0] = single_path;
        single_path = NULL;
        c->n_shards = 1;
    }
    json_decref(index);
    free(index_path);
    free(single_path);
    *out = c;
    return MXQ_OK;
fail:
    json_decref(index);
    free(index_path);
    free(single_path);
    mxq_checkpoint_close(c);
    return status;
}

void mxq_checkpoint_close(mxq_checkpoint *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->n_shards; i++) {
        mxq_st_file_close(c->shards[i]);
        free(c->shard_paths[i]);
    }
    free(c->shards);
    free(c->shard_paths);
    json_decref(c->weight_map);
    free(c->dir);
    free(c);
}

const char *mxq_checkpoint_dir(const mxq_checkpoint *c) { return c->dir; }

/* Index of the shard that should hold `name`, or -1. */
static long shard_for(const mxq_checkpoint *c, const char *name)
{
    if (!c->weight_map)
        return 0;
    json_t *v = json_object_get(c->weight_map, name);
    if (!json_is_string(v))
        return -1;
    for (size_t i = 0; i < c->n_shards; i++) {
        const char *base = strrchr(c->shard_paths[i], '/') + 1;
        if (strcmp(base, json_string_value(v)) == 0)
            return (long)i;
    }
    return -1;
}

static mxq_status open_shard(mxq_ctx *ctx, mxq_checkpoint *c, size_t i)
{
    mxq_status status = MXQ_OK;
    if (!c->shards[i])
        CALL(ctx, mxq_st_file_open(ctx, c->shard_paths[i], &c->shards[i]));
fail:
    return status;
}

mxq_status mxq_checkpoint_get(mxq_ctx *ctx, mxq_checkpoint *c, const char *name, const mxq_tensor_view **out)
{
    mxq_status status = MXQ_OK;
    *out = NULL;
    long s = shard_for(c, name);
    CHECK(ctx, s >= 0, MXQ_ERR_FORMAT, "tensor '%s' is missing from the checkpoint in '%s' (not in its index)", name,
          c->dir);
    CALL(ctx, open_shard(ctx, c, (size_t)s));
    const mxq_tensor_view *t = mxq_st_file_find(c->shards[s], name);
    CHECK(ctx, t != NULL, MXQ_ERR_FORMAT, "tensor '%s' is missing from '%s'", name, c->shard_paths[s]);
    *out = t;
fail:
    return status;
}

mxq_status mxq_checkpoint_lookup(mxq_ctx *ctx, mxq_checkpoint *c, const char *name, const mxq_tensor_view **out)
{
    mxq_status status = MXQ_OK;
    *out = NULL;
    long s = shard_for(c, name);
    if (s < 0)
        return MXQ_OK;
    CALL(ctx, open_shard(ctx, c, (size_t)s));
    *out = mxq_st_file_find(c->shards[s], name);
    CHECK(ctx, *out != NULL || !c->weight_map, MXQ_ERR_FORMAT,
          "tensor '%s' is listed in the index of '%s' but missing from '%s'", name, c->dir, c->shard_paths[s]);
fail:
    return status;
}

mxq_status mxq_checkpoint_names(mxq_ctx *ctx, mxq_checkpoint *c, const char ***names, size_t *count)
{
    mxq_status status = MXQ_OK;
    const char **list = NULL;
    size_t n = 0;
    if (c->weight_map) {
        list = calloc(json_object_size(c->weight_map) + 1, sizeof(char *));
        CHECK_ALLOC(ctx, list, json_object_size(c->weight_map) * sizeof(char *), "the tensor name list");
        const char *key;
        json_t *value;
        json_object_foreach(c->weight_map, key, value)
            list[n++] = key;
    } else {
        CALL(ctx, open_shard(ctx, c, 0));
        size_t total = mxq_st_file_count(c->shards[0]);
        list = calloc(total + 1, sizeof(char *));
        CHECK_ALLOC(ctx, list, total * sizeof(char *), "the tensor name list");
        for (size_t i = 0; i < total; i++)
            list[n++] = mxq_st_file_tensor(c->shards[0], i)->name;
    }
    *names = list;
    *count = n;
    return MXQ_OK;
fail:
    free(list);
    return status;
}

void mxq_shape_text(char *buf, size_t size, int rank, const int64_t *shape)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < rank && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
}

/* "[r, c]" of flat index i in a tensor of the given shape. */
static void format_index(char *buf, size_t size, int rank, const int64_t *shape, size_t i)
{
    int64_t coord[MXQ_ST_MAX_RANK] = {0};
    for (int d = rank - 1; d >= 0; d--) {
        int64_t n = shape[d] > 0 ? shape[d] : 1;
        coord[d] = (int64_t)(i % (size_t)n);
        i /= (size_t)n;
    }
    mxq_shape_text(buf, size, rank, coord);
}

void mxq_tensor_view_release(const mxq_tensor_view *t)
{
    const long page = sysconf(_SC_PAGESIZE);
    if (!t || !t->nbytes || page <= 0)
        return;
    /* the whole pages the tensor touches: the mapping is read-only and
     * private, so dropping a neighbour's page only costs it a refault */
    uintptr_t lo = (uintptr_t)t->data & ~(uintptr_t)(page - 1);
    uintptr_t hi = ((uintptr_t)t->data + t->nbytes + (uintptr_t)page - 1) & ~(uintptr_t)(page - 1);
    (void)madvise((void *)lo, hi - lo, MADV_DONTNEED); /* advice only: a failure costs memory, not results */
}

mxq_status mxq_tensor_to_f32(mxq_ctx *ctx, const mxq_tensor_view *t, int rank, const int64_t *shape, float *out)
{
    mxq_status status = MXQ_OK;
    int same = t->rank == rank;
    for (int i = 0; same && i < rank; i++)
        same = t->shape[i] == shape[i];
    if (!same) {
        char want[128], have[128];
        mxq_shape_text(want, sizeof(want), rank, shape);
        mxq_shape_text(have, sizeof(have), t->rank, t->shape);
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected %s from config.json", t->file, t->name, have,
             want);
    }
    /* A NaN or Inf weight makes every result built on it meaningless, and
     * quietly: refuse it where it enters, naming where it is (and any
     * dtype that is not a float). */
    CALL(ctx, mxq_tensor_check_float(ctx, t));
    const unsigned char *bytes = t->data; /* safetensors does not align a tensor's data */
    if (t->dtype == MXQ_DT_F32) {
        memcpy(out, t->data, t->numel * 4);
    } else {
        const int bf16 = t->dtype == MXQ_DT_BF16;
        for (size_t i = 0; i < t->numel; i++) {
            uint16_t v;
            memcpy(&v, bytes + 2 * i, sizeof(v));
            out[i] = bf16 ? mxq_bf16_to_f32(v) : mxq_f16_to_f32(v);
        }
    }
fail:
    return status;
}

/* Whether any of n elements has all its exponent bits set: no early exit,
 * so that the loops vectorize and a 7B checkpoint is scanned at memory
 * speed. Elements are read with memcpy: safetensors does not align a
 * tensor's data. */
static int any_bad16(const unsigned char *p, size_t n, uint16_t mask)
{
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t v;
        memcpy(&v, p + 2 * i, sizeof(v));
        bad |= (v & mask) == mask;
    }
    return bad != 0;
}

static int any_bad32(const unsigned char *p, size_t n)
{
    unsigned bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t v;
        memcpy(&v, p + 4 * i, sizeof(v));
        bad |= (v & 0x7F800000u) == 0x7F800000u;
    }
    return bad != 0;
}

/* The first NaN or Inf element of a float tensor (numel if none): blocks
 * are scanned whole, the one with a bad element again, element by element. */
static size_t first_non_finite(const mxq_tensor_view *t)
{
    enum { BLOCK = 4096 };
    const int wide = t->dtype == MXQ_DT_F32;
    const uint16_t mask = t->dtype == MXQ_DT_BF16 ? 0x7F80u : 0x7C00u;
    const unsigned char *bytes = t->data;
    const size_t size = wide ? 4 : 2;
    for (size_t at = 0; at < t->numel; at += BLOCK) {
        const size_t n = t->numel - at < BLOCK ? t->numel - at : BLOCK;
        if (!(wide ? any_bad32(bytes + at * size, n) : any_bad16(bytes + at * size, n, mask)))
            continue;
        for (size_t i = at; i < at + n; i++)
            if (wide ? any_bad32(bytes + i * size, 1) : any_bad16(bytes + i * size, 1, mask))
                return i;
    }
    return t->numel;
}

mxq_status mxq_tensor_check_float(mxq_ctx *ctx, const mxq_tensor_view *t)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, t->dtype == MXQ_DT_F32 || t->dtype == MXQ_DT_BF16 || t->dtype == MXQ_DT_F16, MXQ_ERR_FORMAT,
          "%s: tensor '%s' has dtype %s; expected a floating-point weight (F32, F16 or BF16)", t->file, t->name,
          mxq_dtype_name(t->dtype));
    const size_t i = first_non_finite(t);
    if (i < t->numel) {
        char where[128];
        uint16_t half = 0;
        float value = 0;
        if (t->dtype == MXQ_DT_F32)
            memcpy(&value, (const unsigned char *)t->data + 4 * i, sizeof(value));
        else
            memcpy(&half, (const unsigned char *)t->data + 2 * i, sizeof(half));
        if (t->dtype != MXQ_DT_F32)
            value = t->dtype == MXQ_DT_BF16 ? mxq_bf16_to_f32(half) : mxq_f16_to_f32(half);
        format_index(where, sizeof(where), t->rank, t->shape, i);
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: tensor '%s' has a non-finite value (%g) at %s", t->file, t->name, (double)value,
             where);
    }
fail:
    return status;
}

/* ---- writing --------------------------------------------------------------- */

static size_t write_numel(const mxq_tensor_write *t)
{
    size_t numel = 1;
    for (int d = 0; d < t->rank; d++)
        numel *= (size_t)t->shape[d];
    return numel;
}

/* The JSON header text of a shard, padded with spaces so that the data area
 * starts 8-byte aligned, as the reference implementation does. */
static mxq_status shard_header(mxq_ctx *ctx, const mxq_tensor_write *tensors, size_t count, char **text,
                               size_t *padded)
{
    mxq_status status = MXQ_OK;
    json_t *header = json_object();
    CHECK_ALLOC(ctx, header, 1, "a safetensors header");
    uint64_t offset = 0;
    for (size_t i = 0; i < count; i++) {
        const mxq_tensor_write *t = &tensors[i];
        json_t *shape = json_array();
        int ok = shape != NULL;
        for (int d = 0; ok && d < t->rank; d++)
            ok = json_array_append_new(shape, json_integer(t->shape[d])) == 0;
        if (!ok)
            json_decref(shape);
        CHECK(ctx, ok, MXQ_ERR_NOMEM, "cannot build the safetensors header entry of '%s'", t->name);
        uint64_t nbytes = (uint64_t)write_numel(t) * mxq_dtype_size(t->dtype);
        json_t *entry = json_pack("{s:s, s:o, s:[I, I]}", "dtype", mxq_dtype_name(t->dtype), "shape", shape,
                                  "data_offsets", (json_int_t)offset, (json_int_t)(offset + nbytes));
        CHECK(ctx, entry && json_object_set_new(header, t->name, entry) == 0, MXQ_ERR_NOMEM,
              "cannot build the safetensors header entry of '%s'", t->name);
        offset += nbytes;
    }
    CHECK(ctx, json_object_set_new(header, "__metadata__", json_pack("{s:s}", "format", "pt")) == 0, MXQ_ERR_NOMEM,
          "cannot build a safetensors header");
    *text = json_dumps(header, JSON_COMPACT);
    CHECK_ALLOC(ctx, *text, 1, "the safetensors header text");
    *padded = (strlen(*text) + 7) / 8 * 8;
fail:
    json_decref(header);
    return status;
}

mxq_status mxq_st_write(mxq_ctx *ctx, mxq_output *out, const mxq_tensor_write *tensors, size_t count)
{
    mxq_status status = MXQ_OK;
    char *text = NULL;
    size_t padded = 0;
    CALL(ctx, shard_header(ctx, tensors, count, &text, &padded));
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; i++)
        len_bytes[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    CALL(ctx, mxq_output_write(ctx, out, len_bytes, 8));
    size_t text_len = strlen(text);
    CALL(ctx, mxq_output_write(ctx, out, text, text_len));
    CALL(ctx, mxq_output_write(ctx, out, "        ", padded - text_len));
    for (size_t i = 0; i < count; i++)
        CALL(ctx, mxq_output_write(ctx, out, tensors[i].data, write_numel(&tensors[i]) * mxq_dtype_size(tensors[i].dtype)));
fail:
    free(text);
    return status;
}

mxq_status mxq_st_write_file(mxq_ctx *ctx, const char *path, const mxq_tensor_write *tensors, size_t count)
{
    mxq_status status = MXQ_OK;
    mxq_output out = {.fd = -1};
    CALL(ctx, mxq_output_begin(ctx, path, NULL, &out));
    CALL(ctx, mxq_st_write(ctx, &out, tensors, count));
    CALL(ctx, mxq_output_commit(ctx, &out));
fail:
    mxq_output_abort(&out);
    return status;
}
