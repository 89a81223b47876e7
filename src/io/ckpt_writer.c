/* Output directories of checkpoints: the record of what mxq wrote, --force,
 * and the index. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "io/ckpt_writer.h"

typedef struct {
    char **names;
    size_t n;
} name_list;

static void name_list_free(name_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->names[i]);
    free(l->names);
    memset(l, 0, sizeof(*l));
}

static int is_plain_name(const char *name)
{
    return name[0] && !strchr(name, '/') && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

static mxq_status add_name(mxq_ctx *ctx, name_list *l, const char *name)
{
    mxq_status status = MXQ_OK;
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->names[i], name) == 0)
            return MXQ_OK;
    char **names = realloc(l->names, (l->n + 1) * sizeof(char *));
    CHECK_ALLOC(ctx, names, (l->n + 1) * sizeof(char *), "the record of mxq's files");
    l->names = names;
    l->names[l->n] = strdup(name);
    CHECK_ALLOC(ctx, l->names[l->n], strlen(name) + 1, "a file name");
    l->n++;
fail:
    return status;
}

/* A JSON file of dir, or NULL (absent or unreadable: then it is not
 * evidence of anything). */
static json_t *read_optional_json(mxq_ctx *ctx, const char *dir, const char *name)
{
    char path[MXQ_PATH_BUF];
    json_t *value = NULL;
    mxq_path_join(path, dir, name);
    if (access(path, F_OK) == 0 && mxq_json_read(ctx, path, name, &value) != MXQ_OK) {
        mxq_error_clear(ctx);
        value = NULL;
    }
    return value;
}

/* A directory mxq wrote before it kept records: a checkpoint whose index
 * says "format": "mxq" (its shards, the index, config.json, the report), or
 * a synthetic model whose config.json says "mxq_synthetic" (model.safetensors
 * or the shards its index names, the index, config.json). Anything else:
 * no record, and nothing will be removed. */
static mxq_status read_legacy_record(mxq_ctx *ctx, const char *dir, name_list *out)
{
    mxq_status status = MXQ_OK;
    json_t *index = read_optional_json(ctx, dir, "model.safetensors.index.json");
    json_t *config = read_optional_json(ctx, dir, "config.json");
    const char *format = json_string_value(json_object_get(json_object_get(index, "metadata"), "format"));
    json_t *map = json_object_get(index, "weight_map");
    int quantized = format && strcmp(format, "mxq") == 0, synthetic = json_object_get(config, "mxq_synthetic") != NULL;
    if (!quantized && !synthetic)
        goto fail;
    CALL(ctx, add_name(ctx, out, "config.json"));
    CALL(ctx, add_name(ctx, out, quantized ? "mxq_report.json" : "model.safetensors"));
    if (!json_is_object(map))
        goto fail;
    const char *key;
    json_t *value;
    json_object_foreach(map, key, value)
    {
        const char *shard = json_string_value(value);
        if (shard && is_plain_name(shard))
            CALL(ctx, add_name(ctx, out, shard));
    }
    CALL(ctx, add_name(ctx, out, "model.safetensors.index.json"));
fail:
    json_decref(index);
    json_decref(config);
    return status;
}

/* The record of an earlier run; an absent record is an empty one. */
static mxq_status read_record(mxq_ctx *ctx, const char *dir, name_list *out)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    json_t *root = NULL;
    memset(out, 0, sizeof(*out));
    mxq_path_join(path, dir, MXQ_RECORD_NAME);
    if (access(path, F_OK) != 0)
        return read_legacy_record(ctx, dir, out);
    CALL(ctx, mxq_json_read(ctx, path, "record of mxq's files", &root));
    json_t *files = json_object_get(root, "files");
    CHECK(ctx, json_is_array(files), MXQ_ERR_FORMAT, "%s: no 'files' list (remove it if mxq did not write it)", path);
    for (size_t i = 0; i < json_array_size(files); i++) {
        const char *name = json_string_value(json_array_get(files, i));
        CHECK(ctx, name && is_plain_name(name), MXQ_ERR_FORMAT, "%s: entry %zu is not a file name in that directory",
              path, i);
        CALL(ctx, add_name(ctx, out, name));
    }
fail:
    json_decref(root);
    if (status != MXQ_OK)
        name_list_free(out);
    return status;
}

static int in_list(const char *const *names, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0)
            return 1;
    return 0;
}

/* A temporary a killed run left: of a recorded or a planned file, or of
 * the record itself. */
static int stale_temporary(const char *name, const name_list *rec, const char *const *planned, size_t n_planned)
{
    for (size_t i = 0; i < rec->n; i++)
        if (mxq_is_temp_name_of(name, rec->names[i]))
            return 1;
    for (size_t i = 0; i < n_planned; i++)
        if (mxq_is_temp_name_of(name, planned[i]))
            return 1;
    return mxq_is_temp_name_of(name, MXQ_RECORD_NAME);
}

/* No planned file may replace one mxq did not write, or an input. */
static mxq_status check_planned(mxq_ctx *ctx, const char *dir, const name_list *rec, const char *const *planned,
                                size_t n_planned, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    for (size_t i = 0; i < n_planned; i++) {
        mxq_path_join(path, dir, planned[i]);
        CALL(ctx, mxq_output_check(ctx, path, inputs));
        CHECK(ctx, access(path, F_OK) != 0 || in_list((const char *const *)rec->names, rec->n, planned[i]),
              MXQ_ERR_IO,
              "'%s' was not written by mxq (it is not in %s/%s); mxq will not replace it: move it away or choose "
              "another output directory",
              path, dir, MXQ_RECORD_NAME);
    }
fail:
    return status;
}

/* Remove one entry, if it is a regular file that is not an input. */
static mxq_status remove_ours(mxq_ctx *ctx, const char *dir, const char *name, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    struct stat st;
    mxq_path_join(path, dir, name);
    if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode) || mxq_input_set_find(inputs, path))
        return MXQ_OK;
    CHECK(ctx, unlink(path) == 0 || errno == ENOENT, MXQ_ERR_IO, "cannot remove '%s': %s", path, strerror(errno));
fail:
    return status;
}

static mxq_status remove_stale_temporaries(mxq_ctx *ctx, const char *dir, const name_list *rec,
                                           const char *const *planned, size_t n_planned, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    DIR *d = opendir(dir);
    CHECK(ctx, d != NULL, MXQ_ERR_IO, "cannot read output directory '%s': %s", dir, strerror(errno));
    for (struct dirent *e = readdir(d); e; e = readdir(d))
        if (stale_temporary(e->d_name, rec, planned, n_planned))
            CALL(ctx, remove_ours(ctx, dir, e->d_name, inputs));
fail:
    if (d)
        closedir(d);
    return status;
}

/* The first entry of `dir` other than . and .., or "" if it is empty. */
static mxq_status first_entry(mxq_ctx *ctx, const char *dir, char *name, size_t size, int *more)
{
    mxq_status status = MXQ_OK;
    DIR *d = opendir(dir);
    name[0] = '\0';
    *more = 0;
    CHECK(ctx, d != NULL, MXQ_ERR_IO, "cannot read output directory '%s': %s", dir, strerror(errno));
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (name[0]) {
            *more = 1;
            break;
        }
        snprintf(name, size, "%s", e->d_name);
    }
    closedir(d);
fail:
    return status;
}

static mxq_status write_record(mxq_ctx *ctx, const char *dir, char *const *names, size_t n,
                               const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    json_t *files = json_array(), *root = NULL;
    CHECK_ALLOC(ctx, files, 1, "the record of mxq's files");
    for (size_t i = 0; i < n; i++)
        CHECK(ctx, json_array_append_new(files, json_string(names[i])) == 0, MXQ_ERR_NOMEM,
              "out of memory building the record of mxq's files");
    root = json_pack("{s:s, s:O}", "written_by", "mxq " MXQ_VERSION, "files", files);
    CHECK_ALLOC(ctx, root, 1, "the record of mxq's files");
    mxq_path_join(path, dir, MXQ_RECORD_NAME);
    CALL(ctx, mxq_json_write_atomic(ctx, root, path, inputs));
fail:
    json_decref(files);
    json_decref(root);
    return status;
}

/* An existing directory: empty, or with `force` one whose planned files
 * were all written by mxq; its record (empty if none) into *rec. */
/* An existing directory may take the planned files: empty, or with
 * `force` holding only what mxq wrote (*rec: its record). Changes nothing. */
static mxq_status check_contents(mxq_ctx *ctx, const char *dir, int force, const char *const *planned,
                                 size_t n_planned, const mxq_input_set *inputs, name_list *rec)
{
    mxq_status status = MXQ_OK;
    char first[256], path[MXQ_PATH_BUF];
    int more = 0;
    struct stat st;
    CALL(ctx, first_entry(ctx, dir, first, sizeof(first), &more));
    CHECK(ctx, !first[0] || force, MXQ_ERR_IO,
          "output directory '%s' is not empty (it holds '%s'%s); choose another, or pass --force to replace what an "
          "earlier mxq run wrote there",
          dir, first, more ? " and more" : "");
    mxq_path_join(path, dir, MXQ_RECORD_NAME);
    CHECK(ctx, lstat(path, &st) != 0 || S_ISREG(st.st_mode), MXQ_ERR_IO,
          "'%s' is %s; mxq did not write it, and will not trust or replace it", path, mxq_file_kind(st.st_mode));
    CALL(ctx, read_record(ctx, dir, rec));
    CALL(ctx, check_planned(ctx, dir, rec, planned, n_planned, inputs));
fail:
    return status;
}

static mxq_status check_existing_dir(mxq_ctx *ctx, const char *dir, int force, const char *const *planned,
                                     size_t n_planned, const mxq_input_set *inputs, name_list *rec)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, check_contents(ctx, dir, force, planned, n_planned, inputs, rec));
    CALL(ctx, remove_stale_temporaries(ctx, dir, rec, planned, n_planned, inputs));
fail:
    return status;
}

mxq_status mxq_ckpt_dir_check(mxq_ctx *ctx, const char *dir, int force, const char *const *planned, size_t n_planned,
                              const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    name_list rec = {NULL, 0};
    struct stat st;
    if (stat(dir, &st) != 0) {
        CHECK(ctx, errno == ENOENT, MXQ_ERR_IO, "cannot use output directory '%s': %s", dir, strerror(errno));
        return MXQ_OK;
    }
    CHECK(ctx, S_ISDIR(st.st_mode), MXQ_ERR_IO, "output path '%s' exists and is %s, not a directory", dir,
          mxq_file_kind(st.st_mode));
    CALL(ctx, check_contents(ctx, dir, force, planned, n_planned, inputs, &rec));
fail:
    name_list_free(&rec);
    return status;
}

static mxq_status copy_names(mxq_ctx *ctx, const char *const *names, size_t n, name_list *out)
{
    mxq_status status = MXQ_OK;
    for (size_t i = 0; i < n; i++)
        CALL(ctx, add_name(ctx, out, names[i]));
fail:
    return status;
}

/* One run at a time per directory: a second run would take the first one's
 * temporaries for stale ones and remove them. The lock goes with the
 * process, so a killed run leaves none behind. */
static mxq_status lock_dir(mxq_ctx *ctx, mxq_ckpt_dir *d)
{
    mxq_status status = MXQ_OK;
    int fd = open(d->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    CHECK(ctx, fd >= 0, MXQ_ERR_IO, "cannot open output directory '%s': %s", d->dir, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
        d->lock_fd = fd;
        d->locked = 1;
        return MXQ_OK;
    }
    const int err = errno;
    close(fd);
    CHECK(ctx, err != EWOULDBLOCK, MXQ_ERR_IO,
          "another mxq run is writing into output directory '%s'; wait for it to end, or choose another", d->dir);
    mxq_log(ctx, MXQ_LOG_DEBUG, "no lock on '%s' (%s): going on without", d->dir, strerror(err));
fail:
    return status;
}

mxq_status mxq_ckpt_dir_prepare(mxq_ctx *ctx, mxq_ckpt_dir *d, const char *dir, int force, const char *const *planned,
                                size_t n_planned, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    name_list rec = {NULL, 0}, plan = {NULL, 0};
    struct stat st;
    memset(d, 0, sizeof(*d));
    d->inputs = inputs;
    d->dir = strdup(dir);
    CHECK_ALLOC(ctx, d->dir, strlen(dir) + 1, "the output directory's name");
    CALL(ctx, copy_names(ctx, planned, n_planned, &plan));
    if (stat(dir, &st) != 0) {
        CHECK(ctx, errno == ENOENT, MXQ_ERR_IO, "cannot use output directory '%s': %s", dir, strerror(errno));
        CHECK(ctx, mkdir(dir, 0777) == 0, MXQ_ERR_IO, "cannot create output directory '%s': %s", dir,
              strerror(errno));
        d->created = 1;
        CALL(ctx, lock_dir(ctx, d));
    } else {
        CHECK(ctx, S_ISDIR(st.st_mode), MXQ_ERR_IO, "output path '%s' exists and is %s, not a directory", dir,
              mxq_file_kind(st.st_mode));
        CALL(ctx, lock_dir(ctx, d));
        CALL(ctx, check_existing_dir(ctx, dir, force, planned, n_planned, inputs, &rec));
    }
    /* the earlier run's files stay recorded until the new run is complete */
    CALL(ctx, copy_names(ctx, planned, n_planned, &rec));
    CALL(ctx, write_record(ctx, dir, rec.names, rec.n, inputs));
    d->record_written = 1;
fail:
    d->planned = plan.names;
    d->n_planned = plan.n;
    d->recorded = rec.names;
    d->n_recorded = rec.n;
    return status;
}

mxq_status mxq_ckpt_dir_begin_commit(mxq_ctx *ctx, mxq_ckpt_dir *d)
{
    mxq_status status = MXQ_OK;
    /* The index makes a sharded checkpoint, config.json a single-file one. */
    static const char *const markers[] = {"model.safetensors.index.json", "config.json"};
    for (size_t i = 0; i < sizeof(markers) / sizeof(markers[0]); i++)
        if (in_list((const char *const *)d->recorded, d->n_recorded, markers[i])) {
            CALL(ctx, remove_ours(ctx, d->dir, markers[i], d->inputs));
            d->committing = 1; /* once one is gone, the earlier checkpoint is */
        }
    d->committing = 1; /* from here on, this run's files replace the earlier ones */
fail:
    return status;
}

mxq_status mxq_ckpt_dir_finish(mxq_ctx *ctx, mxq_ckpt_dir *d, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    for (size_t i = 0; i < d->n_recorded; i++)
        if (!in_list((const char *const *)d->planned, d->n_planned, d->recorded[i]))
            CALL(ctx, remove_ours(ctx, d->dir, d->recorded[i], inputs));
    CALL(ctx, write_record(ctx, d->dir, d->planned, d->n_planned, inputs));
    d->committing = 0;
fail:
    return status;
}

void mxq_ckpt_dir_abandon(mxq_ckpt_dir *d)
{
    char path[MXQ_PATH_BUF];
    int left = 0;
    if (!d->record_written) {
        if (d->created)
            rmdir(d->dir); /* fails, harmlessly, unless empty */
        return;
    }
    for (size_t i = 0; i < d->n_recorded; i++) {
        mxq_path_join(path, d->dir, d->recorded[i]);
        if (d->committing) {
            /* half a commit is no checkpoint: ours, all of it */
            struct stat st;
            if (lstat(path, &st) == 0 && S_ISREG(st.st_mode) && !mxq_input_set_find(d->inputs, path))
                unlink(path);
        } else {
            left |= access(path, F_OK) == 0;
        }
    }
    if (left)
        return; /* the earlier run's files stay, and their record */
    mxq_path_join(path, d->dir, MXQ_RECORD_NAME);
    unlink(path);
    if (d->created)
        rmdir(d->dir); /* fails, harmlessly, unless empty */
}

void mxq_ckpt_dir_free(mxq_ckpt_dir *d)
{
    name_list rec = {d->recorded, d->n_recorded}, plan = {d->planned, d->n_planned};
    name_list_free(&rec);
    name_list_free(&plan);
    free(d->dir);
    if (d->locked)
        close(d->lock_fd); /* releases the lock */
    memset(d, 0, sizeof(*d));
}

void mxq_shard_name(char *buf, size_t size, int index, int count)
{
    snprintf(buf, size, "model-%05d-of-%05d.safetensors", index + 1, count);
}

mxq_status mxq_ckpt_index_write(mxq_ctx *ctx, const char *dir, json_t *map, uint64_t total_size, const char *format,
                                json_t *shards, const mxq_input_set *inputs, mxq_output *pending)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    json_t *index = NULL, *meta = json_pack("{s:I}", "total_size", (json_int_t)total_size);
    CHECK_ALLOC(ctx, meta, 1, "the checkpoint index");
    if (format)
        CHECK(ctx, json_object_set_new(meta, "format", json_string(format)) == 0, MXQ_ERR_NOMEM,
              "out of memory building the checkpoint index");
    if (shards)
        CHECK(ctx, json_object_set(meta, "mxq_shards", shards) == 0, MXQ_ERR_NOMEM,
              "out of memory building the checkpoint index");
    index = json_pack("{s:O, s:O}", "metadata", meta, "weight_map", map);
    CHECK_ALLOC(ctx, index, 1, "the checkpoint index");
    mxq_path_join(path, dir, "model.safetensors.index.json");
    if (pending)
        CALL(ctx, mxq_json_write_temp(ctx, index, path, inputs, pending));
    else
        CALL(ctx, mxq_json_write_atomic(ctx, index, path, inputs));
fail:
    json_decref(meta);
    json_decref(index);
    return status;
}
