/* The records a quantize job leaves to resume from (resume.h). */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "io/ckpt_writer.h"
#include "jobs/resume.h"

#define JOB_NAME "job.json"
#define FIGURES_NAME "mxq.layer_record"
#define DIGEST_NAME "mxq.job"  /* the job's digest: a record of another job is not taken */
#define CHECKSUM_NAME "mxq.sha256" /* of every other tensor's name and data, in name order */

static int cmp_writes(const void *a, const void *b)
{
    return strcmp(((const mxq_tensor_write *)a)->name, ((const mxq_tensor_write *)b)->name);
}

/* The SHA-256 of tensors' names and data in name order (sorts t): what a
 * record's CHECKSUM_NAME holds of its other tensors, whatever order the
 * file has them in. */
static void tensors_checksum(mxq_tensor_write *t, size_t n, char hex[65])
{
    mxq_sha256 s;
    qsort(t, n, sizeof(*t), cmp_writes);
    mxq_sha256_init(&s);
    for (size_t i = 0; i < n; i++) {
        size_t bytes = mxq_dtype_size(t[i].dtype);
        for (int d = 0; d < t[i].rank; d++)
            bytes *= (size_t)t[i].shape[d];
        mxq_sha256_update(&s, t[i].name, strlen(t[i].name) + 1);
        mxq_sha256_update(&s, t[i].data, bytes);
    }
    mxq_sha256_hex(&s, hex);
}

/* The same of a record read back, but its CHECKSUM_NAME. 0 on success. */
static int record_checksum(const mxq_st_file *f, char hex[65])
{
    const size_t n = mxq_st_file_count(f);
    mxq_tensor_write *t = calloc(n + 1, sizeof(*t));
    size_t k = 0;
    if (!t)
        return -1;
    for (size_t i = 0; i < n; i++) {
        const mxq_tensor_view *v = mxq_st_file_tensor(f, i);
        if (strcmp(v->name, CHECKSUM_NAME) == 0)
            continue;
        t[k] = (mxq_tensor_write){v->name, v->dtype, v->rank, {0}, v->data};
        memcpy(t[k++].shape, v->shape, sizeof(v->shape));
    }
    tensors_checksum(t, k, hex);
    free(t);
    return 0;
}

static void layer_name(char *buf, size_t size, int layer) { snprintf(buf, size, "layer-%05d.safetensors", layer); }

static void layer_path(const mxq_resume *r, int layer, char path[MXQ_PATH_BUF])
{
    char name[64];
    layer_name(name, sizeof(name), layer);
    mxq_path_join(path, r->dir, name);
}

static mxq_status resume_init(mxq_ctx *ctx, mxq_resume *r, const char *out_dir, int n_layers)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    mxq_path_join(path, out_dir, MXQ_RESUME_DIR);
    r->n_layers = n_layers;
    r->dir = strdup(path);
    r->done = calloc((size_t)n_layers, 1);
    r->open = calloc((size_t)n_layers, sizeof(*r->open));
    CHECK_ALLOC(ctx, r->dir && r->done && r->open, (size_t)n_layers * sizeof(*r->open), "the resume records' list");
fail:
    return status;
}

/* The layers whose records exist (a record that exists is whole). */
static void find_done(mxq_resume *r)
{
    char path[MXQ_PATH_BUF];
    struct stat st;
    r->n_done = 0;
    for (int l = 0; l < r->n_layers; l++) {
        layer_path(r, l, path);
        r->done[l] = lstat(path, &st) == 0 && S_ISREG(st.st_mode);
        r->n_done += r->done[l];
    }
}

/* Whether `name` is a file of the records directory, or the temporary of
 * one a killed run left. */
static int record_file(const char *name)
{
    int layer, end = 0;
    char final[64];
    if (strcmp(name, JOB_NAME) == 0 || mxq_is_temp_name_of(name, JOB_NAME))
        return 1;
    if (sscanf(name, "layer-%5d.safetensors%n", &layer, &end) == 1 && name[end] == '\0' && layer >= 0) {
        layer_name(final, sizeof(final), layer); /* exactly the name mxq gives: not "layer-1.safetensors" */
        return strcmp(name, final) == 0;
    }
    if (sscanf(name, ".layer-%5d", &layer) != 1 || layer < 0)
        return 0;
    layer_name(final, sizeof(final), layer);
    return mxq_is_temp_name_of(name, final);
}

/* Remove the records directory: its own files, then the directory (which
 * stays if something else is in it). */
static mxq_status remove_records(mxq_ctx *ctx, const mxq_resume *r)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    DIR *d = opendir(r->dir);
    if (!d && errno == ENOENT)
        return MXQ_OK;
    CHECK(ctx, d != NULL, MXQ_ERR_IO, "cannot read '%s': %s", r->dir, strerror(errno));
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        if (!record_file(e->d_name))
            continue;
        mxq_path_join(path, r->dir, e->d_name);
        CHECK(ctx, unlink(path) == 0 || errno == ENOENT, MXQ_ERR_IO, "cannot remove '%s': %s", path, strerror(errno));
    }
    CHECK(ctx, rmdir(r->dir) == 0 || errno == ENOENT, MXQ_ERR_IO,
          "cannot remove '%s' (%s): it holds files mxq did not write there", r->dir, strerror(errno));
fail:
    if (d)
        closedir(d);
    return status;
}

/* The first key whose value differs between the recorded job and this one
 * (for an object, its first differing key in *inner, else NULL). */
static const char *first_difference_in(const json_t *recorded, const json_t *now);

static const char *first_difference(const json_t *recorded, const json_t *now, const char **inner)
{
    const char *key = first_difference_in(recorded, now);
    const json_t *a = key ? json_object_get(recorded, key) : NULL, *b = key ? json_object_get(now, key) : NULL;
    *inner = json_is_object(a) && json_is_object(b) ? first_difference_in(a, b) : NULL;
    return key;
}

static const char *first_difference_in(const json_t *recorded, const json_t *now)
{
    const char *key;
    json_t *value;
    json_object_foreach((json_t *)now, key, value)
    {
        if (!json_equal(value, json_object_get(recorded, key)))
            return key;
    }
    json_object_foreach((json_t *)recorded, key, value)
    {
        if (!json_object_get(now, key))
            return key;
    }
    return NULL;
}

/* --resume: job.json must say the same as this run. */
static mxq_status check_same_job(mxq_ctx *ctx, const mxq_resume *r, const json_t *fingerprint)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    json_t *recorded = NULL;
    char *was = NULL, *is = NULL;
    mxq_path_join(path, r->dir, JOB_NAME);
    CALL(ctx, mxq_json_read(ctx, path, "the record of the run to resume", &recorded));
    const char *inner = NULL, *key = first_difference(recorded, fingerprint, &inner);
    if (key) {
        const json_t *a = json_object_get(recorded, key), *b = json_object_get(fingerprint, key);
        if (inner)
            a = json_object_get(a, inner), b = json_object_get(b, inner);
        was = a ? json_dumps(a, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
        is = b ? json_dumps(b, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
        FAIL(ctx, MXQ_ERR_ARG,
             "--resume: the run recorded in %s differs in '%s%s%s' (it had %.200s, this run has %.200s); resume with "
             "the same inputs, mxq, layout and OpenBLAS settings, or start over with --force instead of --resume",
             path, key, inner ? "." : "", inner ? inner : "", was ? was : "nothing", is ? is : "nothing");
    }
fail:
    free(was);
    free(is);
    json_decref(recorded);
    return status;
}

/* Whether `dir` is missing or has no entries (a run that failed before its
 * first record leaves it so). */
static int absent_or_empty(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return errno == ENOENT;
    int entries = 0;
    for (struct dirent *e = readdir(d); e; e = readdir(d))
        entries += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return entries == 0;
}

static void validate_records(mxq_ctx *ctx, mxq_resume *r);

mxq_status mxq_resume_check(mxq_ctx *ctx, mxq_resume *r, const char *out_dir, int n_layers,
                            const json_t *fingerprint, int resume, int force)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    CALL(ctx, resume_init(ctx, r, out_dir, n_layers));
    const int exists = lstat(r->dir, &st) == 0;
    CHECK(ctx, !exists || S_ISDIR(st.st_mode), MXQ_ERR_IO, "'%s' is %s; mxq did not make it, and will not use it",
          r->dir, mxq_file_kind(st.st_mode));
    if (exists)
        find_done(r);
    if (!resume) {
        CHECK(ctx, !exists || force, MXQ_ERR_ARG,
              "output directory '%s' holds an unfinished run (%d of %d layers quantized, recorded in %s): pass "
              "--resume to continue it, or --force to start over",
              out_dir, r->n_done, n_layers, r->dir);
        r->clear = exists; /* once the output directory is locked (mxq_resume_begin) */
        memset(r->done, 0, (size_t)n_layers);
        r->n_done = 0;
        return MXQ_OK;
    }
    if (!exists) { /* killed before its first record, or never started: a run from the start */
        char index[MXQ_PATH_BUF];
        mxq_path_join(index, out_dir, "model.safetensors.index.json");
        CHECK(ctx, access(index, F_OK) != 0, MXQ_ERR_ARG,
              "--resume: output directory '%s' holds a complete checkpoint and no unfinished run: nothing to resume "
              "(--force writes it again)",
              out_dir);
        CHECK(ctx, absent_or_empty(out_dir), MXQ_ERR_ARG,
              "--resume: output directory '%s' holds no unfinished run (no %s) but other files: choose another "
              "directory, or --force to replace what an earlier mxq run wrote there",
              out_dir, r->dir);
        return MXQ_OK;
    }
    CALL(ctx, check_same_job(ctx, r, fingerprint));
    validate_records(ctx, r);
fail:
    return status;
}

mxq_status mxq_resume_begin(mxq_ctx *ctx, mxq_resume *r, const json_t *fingerprint, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    struct stat st;
    if (r->clear) /* --force: the unfinished run's records go, now that the directory is this run's */
        CALL(ctx, remove_records(ctx, r));
    r->clear = 0;
    r->begun = 1;
    if (lstat(r->dir, &st) == 0) /* --resume: the earlier run's job.json stays */
        return MXQ_OK;
    CHECK(ctx, mkdir(r->dir, 0777) == 0, MXQ_ERR_IO, "cannot create '%s': %s", r->dir, strerror(errno));
    mxq_path_join(path, r->dir, JOB_NAME);
    CALL(ctx, mxq_json_write_atomic(ctx, fingerprint, path, inputs));
fail:
    return status;
}

mxq_status mxq_resume_share(mxq_ctx *ctx, const mxq_dist *dist, const char *out_dir, int n_layers, mxq_resume *r)
{
    mxq_status status = MXQ_OK;
    AGREE(ctx, dist, "resume.share", dist->rank != 0 ? resume_init(ctx, r, out_dir, n_layers) : MXQ_OK);
    CALL_MPI(ctx, dist->comm, MPI_Bcast(r->done, n_layers, MPI_UNSIGNED_CHAR, 0, dist->comm));
    CALL_MPI(ctx, dist->comm, MPI_Bcast(r->job, (int)sizeof(r->job), MPI_CHAR, 0, dist->comm));
    r->n_done = 0;
    for (int l = 0; l < n_layers; l++)
        r->n_done += r->done[l] != 0;
fail:
    return status;
}

/* Why layer l's record cannot be taken ("" if it can): not a safetensors
 * file, another job's, or data that changed after it was written. */
static void record_problem(mxq_ctx *ctx, const mxq_resume *r, int l, char *why, size_t size)
{
    char path[MXQ_PATH_BUF], sum[65];
    mxq_st_file *f = NULL;
    layer_path(r, l, path);
    why[0] = '\0';
    if (mxq_st_file_open(ctx, path, &f) != MXQ_OK) {
        snprintf(why, size, "%s", mxq_error_message(ctx));
        mxq_error_clear(ctx);
        return;
    }
    const mxq_tensor_view *job = mxq_st_file_find(f, DIGEST_NAME), *want = mxq_st_file_find(f, CHECKSUM_NAME);
    if (!job || job->nbytes != 64 || memcmp(job->data, r->job, 64) != 0)
        snprintf(why, size, "it is a record of another job");
    else if (!want || want->nbytes != 64 || record_checksum(f, sum) != 0 || memcmp(want->data, sum, 64) != 0)
        snprintf(why, size, "its data changed after it was written (SHA-256)");
    mxq_st_file_close(f);
}

/* Rank 0, --resume: every record is checked now, not when the shard is
 * written hours later; a damaged one is set aside and its layer quantized
 * again (its new record replaces it). */
static void validate_records(mxq_ctx *ctx, mxq_resume *r)
{
    char why[512], path[MXQ_PATH_BUF];
    for (int l = 0; l < r->n_layers; l++) {
        if (!r->done[l])
            continue;
        record_problem(ctx, r, l, why, sizeof(why));
        if (!why[0])
            continue;
        layer_path(r, l, path);
        mxq_log(ctx, MXQ_LOG_WARN, "%s cannot be taken (%s): layer %d is quantized again", path, why, l);
        r->done[l] = 0;
        r->n_done--;
    }
}

mxq_status mxq_resume_write_layer(mxq_ctx *ctx, const mxq_resume *r, int layer, const mxq_tensor_write *tensors,
                                  size_t count, const mxq_layer_record *figures, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    mxq_output out = {.fd = -1};
    mxq_tensor_write *all = calloc(count + 3, sizeof(*all));
    char sum[65];
    CHECK_ALLOC(ctx, all, (count + 3) * sizeof(*all), "a layer's record");
    memcpy(all, tensors, count * sizeof(*all));
    all[count] = (mxq_tensor_write){FIGURES_NAME, MXQ_DT_U8, 1, {(int64_t)sizeof(*figures)}, figures};
    all[count + 1] = (mxq_tensor_write){DIGEST_NAME, MXQ_DT_U8, 1, {64}, r->job};
    tensors_checksum(all, count + 2, sum);
    all[count + 2] = (mxq_tensor_write){CHECKSUM_NAME, MXQ_DT_U8, 1, {64}, sum};
    layer_path(r, layer, path);
    CALL(ctx, mxq_output_begin(ctx, path, inputs, &out));
    CALL(ctx, mxq_st_write(ctx, &out, all, count + 3));
    /* a fault injected here, but no stop: the layer is done, its record takes milliseconds */
    CALL(ctx, mxq_fault_inject(ctx, "resume.record"));
    CALL(ctx, mxq_output_commit(ctx, &out));
fail:
    mxq_output_abort(&out);
    free(all);
    return status;
}

mxq_status mxq_resume_open_layer(mxq_ctx *ctx, mxq_resume *r, int layer, mxq_layer_record *figures)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    layer_path(r, layer, path);
    if (!r->open[layer])
        CALL(ctx, mxq_st_file_open(ctx, path, &r->open[layer]));
    const mxq_tensor_view *v = mxq_st_file_find(r->open[layer], FIGURES_NAME);
    CHECK(ctx, v && v->dtype == MXQ_DT_U8 && v->nbytes == sizeof(*figures), MXQ_ERR_FORMAT,
          "%s: no layer figures of this mxq build ('%s', %zu bytes); start over with --force", path, FIGURES_NAME,
          sizeof(*figures));
    memcpy(figures, v->data, sizeof(*figures));
    CHECK(ctx, figures->layer == layer, MXQ_ERR_FORMAT, "%s holds the figures of layer %d, not %d", path,
          figures->layer, layer);
fail:
    return status;
}

const mxq_tensor_view *mxq_resume_tensor(const mxq_resume *r, int layer, const char *name)
{
    return r->open && r->open[layer] ? mxq_st_file_find(r->open[layer], name) : NULL;
}

int mxq_resume_abandon(mxq_ctx *ctx, mxq_resume *r)
{
    struct stat st;
    if (!r->begun || lstat(r->dir, &st) != 0)
        return 0;
    find_done(r);
    if (r->n_done == 0) {
        if (remove_records(ctx, r) != MXQ_OK)
            mxq_error_clear(ctx); /* the job's own failure is the one to report */
        return 0;
    }
    mxq_log(ctx, MXQ_LOG_WARN, "%d of %d layers %s recorded in %s: the same command with --resume continues the run",
            r->n_done, r->n_layers, r->n_done == 1 ? "is" : "are", r->dir);
    return 1;
}

void mxq_resume_remove(mxq_ctx *ctx, mxq_resume *r)
{
    if (remove_records(ctx, r) != MXQ_OK) {
        mxq_log(ctx, MXQ_LOG_WARN, "the checkpoint is complete, but: %s", mxq_error_message(ctx));
        mxq_error_clear(ctx);
    }
}

void mxq_resume_free(mxq_resume *r)
{
    for (int l = 0; r->open && l < r->n_layers; l++)
        if (r->open[l])
            mxq_st_file_close(r->open[l]);
    free(r->open);
    free(r->done);
    free(r->dir);
    memset(r, 0, sizeof(*r));
}
