#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "io/fsutil.h"

const char *mxq_file_kind(mode_t mode)
{
    if (S_ISREG(mode))
        return "a regular file";
    if (S_ISDIR(mode))
        return "a directory";
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISCHR(mode))
        return "a character device";
    if (S_ISBLK(mode))
        return "a block device";
    if (S_ISSOCK(mode))
        return "a socket";
    if (S_ISLNK(mode))
        return "a symbolic link";
    return "not a regular file";
}

/* ---- inputs ---------------------------------------------------------------- */

void mxq_path_join(char *buf, const char *dir, const char *name)
{
    snprintf(buf, MXQ_PATH_BUF, "%s/%s", dir, name);
}

mxq_status mxq_input_open(mxq_ctx *ctx, const char *path, const char *what, int *fd_out)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    *fd_out = -1;
    /* O_NONBLOCK: opening a FIFO for reading must not wait for a writer. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    CHECK(ctx, fd >= 0, MXQ_ERR_IO, "cannot open %s '%s': %s", what, path, strerror(errno));
    CHECK(ctx, fstat(fd, &st) == 0, MXQ_ERR_IO, "cannot stat %s '%s': %s", what, path, strerror(errno));
    CHECK(ctx, S_ISREG(st.st_mode), MXQ_ERR_IO, "%s '%s' is %s, not a regular file", what, path,
          mxq_file_kind(st.st_mode));
    int flags = fcntl(fd, F_GETFL);
    CHECK(ctx, flags >= 0 && fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == 0, MXQ_ERR_IO, "cannot use %s '%s': %s", what,
          path, strerror(errno));
    *fd_out = fd;
    return MXQ_OK;
fail:
    if (fd >= 0)
        close(fd);
    return status;
}

mxq_status mxq_input_read_all(mxq_ctx *ctx, const char *path, const char *what, size_t max_bytes, char **text,
                              size_t *len)
{
    mxq_status status = MXQ_OK;
    int fd = -1;
    char *buf = NULL;
    struct stat st;
    *text = NULL;
    CALL(ctx, mxq_input_open(ctx, path, what, &fd));
    CHECK(ctx, fstat(fd, &st) == 0, MXQ_ERR_IO, "cannot stat %s '%s': %s", what, path, strerror(errno));
    CHECK(ctx, (size_t)st.st_size <= max_bytes, MXQ_ERR_FORMAT, "%s '%s' is %lld bytes; at most %zu are expected",
          what, path, (long long)st.st_size, max_bytes);
    size_t size = (size_t)st.st_size, got = 0;
    buf = malloc(size + 1);
    CHECK_ALLOC(ctx, buf, size + 1, what);
    while (got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(ctx, n >= 0, MXQ_ERR_IO, "cannot read %s '%s': %s", what, path, strerror(errno));
        CHECK(ctx, n > 0, MXQ_ERR_IO, "cannot read %s '%s': it shrank while being read", what, path);
        got += (size_t)n;
    }
    buf[size] = '\0';
    *text = buf;
    buf = NULL;
    if (len)
        *len = size;
fail:
    if (fd >= 0)
        close(fd);
    free(buf);
    return status;
}

mxq_status mxq_json_read(mxq_ctx *ctx, const char *path, const char *what, json_t **out)
{
    mxq_status status = MXQ_OK;
    char *text = NULL;
    size_t len = 0;
    json_error_t jerr;
    *out = NULL;
    CALL(ctx, mxq_input_read_all(ctx, path, what, (size_t)64 << 20, &text, &len));
    *out = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    CHECK(ctx, *out != NULL, MXQ_ERR_FORMAT, "%s: not valid JSON: %s (line %d)", path, jerr.text, jerr.line);
fail:
    free(text);
    return status;
}

void mxq_json_put(json_t *object, const char *key, json_t *value, int *ok)
{
    if (!object || !value || json_object_set_new(object, key, value) != 0)
        *ok = 0;
}

void mxq_json_push(json_t *array, json_t *value, int *ok)
{
    if (!array || !value || json_array_append_new(array, value) != 0)
        *ok = 0;
}

mxq_status mxq_input_set_add(mxq_ctx *ctx, mxq_input_set *set, const char *path, const char *what)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    if (!path || stat(path, &st) != 0)
        return MXQ_OK;
    if (set->n == set->cap) {
        size_t cap = set->cap ? 2 * set->cap : 16;
        mxq_file_id *ids = realloc(set->ids, cap * sizeof(*ids));
        CHECK_ALLOC(ctx, ids, cap * sizeof(*ids), "the list of input files");
        set->ids = ids;
        set->cap = cap;
    }
    mxq_file_id *id = &set->ids[set->n];
    id->path = strdup(path);
    CHECK_ALLOC(ctx, id->path, strlen(path) + 1, "an input file name");
    id->dev = st.st_dev;
    id->ino = st.st_ino;
    id->what = what;
    set->n++;
fail:
    return status;
}

mxq_status mxq_input_set_add_model(mxq_ctx *ctx, mxq_input_set *set, const char *model_dir)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    DIR *d = opendir(model_dir);
    if (!d)
        return MXQ_OK; /* reading the model will report it */
    /* Every file of the model directory, not only those the job reads:
     * tokenizers and licences are not to be overwritten either. */
    for (struct dirent *e = readdir(d); e; e = readdir(d)) {
        if (e->d_name[0] == '.')
            continue;
        mxq_path_join(path, model_dir, e->d_name);
        CALL(ctx, mxq_input_set_add(ctx, set, path, "a file of the input model"));
    }
fail:
    closedir(d);
    return status;
}

void mxq_input_set_free(mxq_input_set *set)
{
    for (size_t i = 0; i < set->n; i++)
        free(set->ids[i].path);
    free(set->ids);
    memset(set, 0, sizeof(*set));
}

const mxq_file_id *mxq_input_set_find(const mxq_input_set *set, const char *path)
{
    struct stat st;
    if (!set || stat(path, &st) != 0)
        return NULL;
    for (size_t i = 0; i < set->n; i++)
        if (set->ids[i].dev == st.st_dev && set->ids[i].ino == st.st_ino)
            return &set->ids[i];
    return NULL;
}

/* ---- outputs --------------------------------------------------------------- */

mxq_status mxq_output_check_ours(mxq_ctx *ctx, const char *path, mxq_file_is_ours_fn is_ours, const char *mark)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode))
        return MXQ_OK; /* absent; what is not a regular file mxq_output_check refuses */
    CHECK(ctx, is_ours(path), MXQ_ERR_ARG,
          "output '%s' exists and mxq did not write it (it has no %s); mxq will not replace it: move it away or choose "
          "another name",
          path, mark);
fail:
    return status;
}

int mxq_json_file_is_ours(const char *path)
{
    struct stat st;
    json_t *root = NULL;
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC); /* a FIFO put in its place must not block */
    if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size <= (64 << 20))
        root = json_loadfd(fd, 0, NULL);
    const int ours = json_is_string(json_object_get(root, MXQ_VERSION_MARK));
    json_decref(root);
    if (fd >= 0)
        close(fd);
    return ours;
}

mxq_status mxq_output_check(mxq_ctx *ctx, const char *path, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    if (lstat(path, &st) != 0) {
        CHECK(ctx, errno == ENOENT, MXQ_ERR_IO, "cannot use output '%s': %s", path, strerror(errno));
        return MXQ_OK;
    }
    /* rename() would replace a link, not what it points to: say so rather
     * than surprise. Devices, FIFOs and directories are never replaced. */
    CHECK(ctx, !S_ISLNK(st.st_mode), MXQ_ERR_IO,
          "output '%s' is a symbolic link; mxq replaces only regular files (give the link's target instead)", path);
    CHECK(ctx, S_ISREG(st.st_mode), MXQ_ERR_IO, "output '%s' is %s; mxq writes only regular files", path,
          mxq_file_kind(st.st_mode));
    const mxq_file_id *same = mxq_input_set_find(inputs, path);
    CHECK(ctx, same == NULL, MXQ_ERR_ARG, "output '%s' is %s ('%s'); write the output elsewhere", path,
          same ? same->what : "", same ? same->path : "");
fail:
    return status;
}

/* `<dir>/.<base>.tmp-<pid>-<attempt>`: hidden, and told apart from the
 * temporaries of other processes, also on other nodes of a shared file
 * system (where process ids repeat) through O_EXCL and the attempt count. */
static mxq_status temp_path_for(mxq_ctx *ctx, const char *final_path, int attempt, char **temp_path)
{
    mxq_status status = MXQ_OK;
    char *out = NULL;
    const char *slash = strrchr(final_path, '/');
    size_t dir_len = slash ? (size_t)(slash - final_path) + 1 : 0;
    const char *base = final_path + dir_len;
    CHECK(ctx, base[0] != '\0' && strcmp(base, ".") != 0 && strcmp(base, "..") != 0, MXQ_ERR_ARG,
          "output path '%s' names a directory, not a file", final_path);
    size_t len = strlen(final_path) + 64;
    out = malloc(len);
    CHECK_ALLOC(ctx, out, len, "a temporary file name");
    snprintf(out, len, "%.*s.%s.tmp-%ld-%d", (int)dir_len, final_path, base, (long)getpid(), attempt);
    *temp_path = out;
    return MXQ_OK;
fail:
    free(out);
    return status;
}

int mxq_is_temp_name_of(const char *name, const char *final_name)
{
    size_t len = strlen(final_name);
    if (name[0] != '.' || strncmp(name + 1, final_name, len) != 0 || strncmp(name + 1 + len, ".tmp-", 5) != 0)
        return 0;
    /* <pid>-<attempt>, or <pid> as mxq 0.1 wrote them */
    const char *tail = name + 1 + len + 5;
    if (*tail < '0' || *tail > '9')
        return 0;
    for (; *tail; tail++)
        if ((*tail < '0' || *tail > '9') && *tail != '-')
            return 0;
    return 1;
}

mxq_status mxq_output_begin(mxq_ctx *ctx, const char *final_path, const mxq_input_set *inputs, mxq_output *out)
{
    mxq_status status = MXQ_OK;
    out->fd = -1;
    out->temp_path = NULL;
    out->final_path = strdup(final_path);
    CHECK_ALLOC(ctx, out->final_path, strlen(final_path) + 1, "an output path");
    CALL(ctx, mxq_output_check(ctx, final_path, inputs)); /* an input is named as one first */
    if (out->is_ours)
        CALL(ctx, mxq_output_check_ours(ctx, final_path, out->is_ours, out->ours_mark));
    int err = EEXIST;
    for (int attempt = 0; attempt < 1000 && err == EEXIST; attempt++) {
        char *temp = NULL;
        CALL(ctx, temp_path_for(ctx, final_path, attempt, &temp));
        out->fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        err = out->fd >= 0 ? 0 : errno;
        if (out->fd >= 0)
            out->temp_path = temp; /* ours: removed on abort */
        else
            free(temp); /* someone else's, or none */
    }
    CHECK(ctx, out->fd >= 0, MXQ_ERR_IO, "cannot write '%s': %s", final_path, strerror(err));
    return MXQ_OK;
fail:
    mxq_output_abort(out);
    return status;
}

mxq_status mxq_output_write(mxq_ctx *ctx, mxq_output *out, const void *data, size_t len)
{
    mxq_status status = MXQ_OK;
    const char *p = data;
    if (out->hash)
        mxq_sha256_update(out->hash, data, len);
    while (len > 0) {
        ssize_t n = write(out->fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        CHECK(ctx, n > 0, MXQ_ERR_IO, "cannot write '%s': %s", out->final_path, n < 0 ? strerror(errno) : "no progress");
        p += n;
        len -= (size_t)n;
    }
fail:
    return status;
}

static mxq_status close_fd(mxq_ctx *ctx, mxq_output *out)
{
    mxq_status status = MXQ_OK;
    if (out->fd >= 0) {
        int rc = close(out->fd);
        out->fd = -1;
        CHECK(ctx, rc == 0, MXQ_ERR_IO, "cannot write '%s': %s", out->final_path, strerror(errno));
    }
fail:
    return status;
}

/* The rename itself survives a crash only once the directory is on disk:
 * outputs renamed in order (shards, then the index) stay in that order. */
static void sync_directory_of(const char *path)
{
    char dir[MXQ_PATH_BUF];
    const char *slash = strrchr(path, '/');
    snprintf(dir, sizeof(dir), "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
    if (!dir[0])
        snprintf(dir, sizeof(dir), "/");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

mxq_status mxq_output_begin_ours(mxq_ctx *ctx, const char *final_path, const mxq_input_set *inputs,
                                 mxq_file_is_ours_fn is_ours, const char *mark, mxq_output *out)
{
    out->is_ours = is_ours, out->ours_mark = mark;
    return mxq_output_begin(ctx, final_path, inputs, out);
}

mxq_status mxq_output_commit(mxq_ctx *ctx, mxq_output *out)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, out->temp_path && out->fd >= 0, MXQ_ERR_INTERNAL, "'%s' is not open for writing",
          out->final_path ? out->final_path : "(an output)");
    CHECK(ctx, fsync(out->fd) == 0, MXQ_ERR_IO, "cannot write '%s': %s", out->final_path, strerror(errno));
    CALL(ctx, close_fd(ctx, out));
    /* Between begin and now something may have appeared at the target. */
    CALL(ctx, mxq_output_check(ctx, out->final_path, NULL));
    if (out->is_ours)
        CALL(ctx, mxq_output_check_ours(ctx, out->final_path, out->is_ours, out->ours_mark));
    CHECK(ctx, rename(out->temp_path, out->final_path) == 0, MXQ_ERR_IO, "cannot rename '%s' to '%s': %s",
          out->temp_path, out->final_path, strerror(errno));
    free(out->temp_path);
    out->temp_path = NULL;
    sync_directory_of(out->final_path);
fail:
    return status;
}

void mxq_output_abort(mxq_output *out)
{
    /* Only an output begun and not committed holds a descriptor and a
     * temporary: a zeroed or committed one has no temp_path. */
    if (out->temp_path) {
        if (out->fd >= 0)
            close(out->fd);
        unlink(out->temp_path);
    }
    out->fd = -1;
    free(out->temp_path);
    free(out->final_path);
    out->temp_path = out->final_path = NULL;
}

mxq_status mxq_output_adopt(mxq_ctx *ctx, const char *final_path, const char *temp_path, const mxq_input_set *inputs,
                            mxq_output *out)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    out->fd = -1;
    out->final_path = strdup(final_path);
    out->temp_path = NULL;
    CHECK_ALLOC(ctx, out->final_path, strlen(final_path) + 1, "an output path");
    CALL(ctx, mxq_output_check(ctx, final_path, inputs));
    out->fd = open(temp_path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
    CHECK(ctx, out->fd >= 0, MXQ_ERR_IO, "cannot reopen '%s': %s", temp_path, strerror(errno));
    CHECK(ctx, fstat(out->fd, &st) == 0 && S_ISREG(st.st_mode), MXQ_ERR_IO, "'%s' is not a regular file", temp_path);
    out->temp_path = strdup(temp_path);
    CHECK_ALLOC(ctx, out->temp_path, strlen(temp_path) + 1, "an output path");
    return MXQ_OK;
fail:
    if (out->fd >= 0)
        close(out->fd);
    out->fd = -1;
    free(out->final_path);
    out->final_path = NULL;
    return status;
}

void mxq_output_leave(mxq_output *out)
{
    if (out->fd >= 0)
        close(out->fd);
    out->fd = -1;
    free(out->temp_path);
    free(out->final_path);
    out->temp_path = out->final_path = NULL;
}

mxq_status mxq_json_write_temp(mxq_ctx *ctx, const json_t *value, const char *path, const mxq_input_set *inputs,
                               mxq_output *out)
{
    mxq_status status = MXQ_OK;
    char *text = json_dumps(value, JSON_INDENT(2) | JSON_REAL_PRECISION(17));
    CHECK_ALLOC(ctx, text, 1, "a JSON document");
    CALL(ctx, mxq_output_begin(ctx, path, inputs, out));
    CALL(ctx, mxq_output_write(ctx, out, text, strlen(text)));
fail:
    free(text);
    return status;
}

mxq_status mxq_json_write_atomic(mxq_ctx *ctx, const json_t *value, const char *path, const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    mxq_output out = {.fd = -1};
    CALL(ctx, mxq_json_write_temp(ctx, value, path, inputs, &out));
    CALL(ctx, mxq_output_commit(ctx, &out));
fail:
    mxq_output_abort(&out);
    return status;
}
