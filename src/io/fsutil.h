/* Safe file handling. Internal.
 *
 * Inputs are opened only once they are known to be regular files, so a FIFO
 * or a device given as an input fails at once instead of blocking forever.
 * Outputs are written under a temporary name beside the final one and renamed
 * into place only when complete; before any work, each output is checked: it
 * is absent or a regular file (never a device, FIFO, directory or symbolic
 * link), it is not one of the job's inputs (compared by device and inode, so
 * hard links, symbolic links and ".." are seen through), and its directory
 * is writable (the temporary file is created at once). */
#ifndef MXQ_FSUTIL_H
#define MXQ_FSUTIL_H

#include <stddef.h>
#include <sys/types.h>

#include "io/sha256.h"
#include "mxq/core.h"

/* Room for a directory of up to PATH_MAX and a file name: a join that does
 * not fit is longer than any path the kernel takes, so it fails as too long
 * rather than naming another file. */
#define MXQ_PATH_BUF 4352
/* dir + "/" + name into buf, of MXQ_PATH_BUF bytes. */
void mxq_path_join(char *buf, const char *dir, const char *name);

/* ---- inputs ------------------------------------------------------------- */

/* Open `path` read-only, failing unless it is a regular file. `what` names
 * it in messages ("token file", "recipe"). */
mxq_status mxq_input_open(mxq_ctx *ctx, const char *path, const char *what, int *fd);
/* Read a whole regular file of at most max_bytes into a NUL-terminated
 * buffer (free() it). */
mxq_status mxq_input_read_all(mxq_ctx *ctx, const char *path, const char *what, size_t max_bytes, char **text,
                              size_t *len);

/* The files a job reads, by identity, so that no output can replace one. */
typedef struct {
    dev_t dev;
    ino_t ino;
    char *path;
    const char *what;
} mxq_file_id;

typedef struct {
    mxq_file_id *ids;
    size_t n, cap;
} mxq_input_set;

/* Add `path` (followed through symbolic links) if it exists; a missing file
 * is not an error here: reading it will say so. */
mxq_status mxq_input_set_add(mxq_ctx *ctx, mxq_input_set *set, const char *path, const char *what);
/* Add a model directory's config.json, index and every safetensors file. */
mxq_status mxq_input_set_add_model(mxq_ctx *ctx, mxq_input_set *set, const char *model_dir);
void mxq_input_set_free(mxq_input_set *set);
/* The input `path` is, or NULL. */
const mxq_file_id *mxq_input_set_find(const mxq_input_set *set, const char *path);

/* ---- outputs ------------------------------------------------------------ */

/* `path` may be written: it is absent or a regular file, and not an input. */
mxq_status mxq_output_check(mxq_ctx *ctx, const char *path, const mxq_input_set *inputs);

/* The mark every single-file output of mxq carries, holding its version:
 * the JSON key or HDF5 root attribute MXQ_VERSION_MARK, the GGUF key-value
 * MXQ_GGUF_VERSION_KEY (io/gguf.h). A file without it was not written by
 * mxq, and is never replaced. */
#define MXQ_VERSION_MARK "mxq_version"
/* 1 if the regular file `path` carries the mark of its kind. */
typedef int (*mxq_file_is_ours_fn)(const char *path);
/* An existing regular file at `path` may be replaced only if `is_ours`
 * says mxq wrote it; `mark` names what was looked for. */
mxq_status mxq_output_check_ours(mxq_ctx *ctx, const char *path, mxq_file_is_ours_fn is_ours, const char *mark);
/* A JSON object with a string MXQ_VERSION_MARK (files of at most 64 MB). */
int mxq_json_file_is_ours(const char *path);

typedef struct {
    char *final_path;
    char *temp_path; /* <dir>/.<name>.tmp-<pid>-<n>, or NULL when not begun / committed */
    int fd;          /* open for writing until commit or abort; -1 after */
    mxq_sha256 *hash; /* when set, every byte written goes through it too */
    /* when set (mxq_output_begin_ours), an existing target is replaced only
     * if it is mxq's: checked at begin and again just before the rename */
    mxq_file_is_ours_fn is_ours;
    const char *ours_mark;
} mxq_output;

/* Check `final_path` (with out->is_ours set, as mxq_output_begin_ours
 * does, also that an existing file is mxq's) and create its temporary. */
mxq_status mxq_output_begin(mxq_ctx *ctx, const char *final_path, const mxq_input_set *inputs, mxq_output *out);
/* The same for a single-file output that never replaces a file mxq did not
 * write: `is_ours` tells (mxq_output_check_ours), `mark` names its mark. */
mxq_status mxq_output_begin_ours(mxq_ctx *ctx, const char *final_path, const mxq_input_set *inputs,
                                 mxq_file_is_ours_fn is_ours, const char *mark, mxq_output *out);
/* Write all of `data`; errors name the final path and the system's reason. */
mxq_status mxq_output_write(mxq_ctx *ctx, mxq_output *out, const void *data, size_t len);
/* Flush to disk, check the target once more, rename into place. */
mxq_status mxq_output_commit(mxq_ctx *ctx, mxq_output *out);
/* Remove the temporary (safe to call after commit, or twice). */
void mxq_output_abort(mxq_output *out);
/* Take over `temp_path`, the temporary of `final_path` that an earlier,
 * killed run left (a resumed run goes on writing it): committed or aborted
 * like one begun here. */
mxq_status mxq_output_adopt(mxq_ctx *ctx, const char *final_path, const char *temp_path, const mxq_input_set *inputs,
                            mxq_output *out);
/* Close, and leave the temporary where it is (for a later --resume). */
void mxq_output_leave(mxq_output *out);

/* 1 if `name` is the temporary name mxq gives `final_name` in some process. */
int mxq_is_temp_name_of(const char *name, const char *final_name);

/* Write a jansson value as indented JSON (doubles with 17 significant
 * digits, so they read back exactly) through mxq_output. */
struct json_t;
mxq_status mxq_json_write_atomic(mxq_ctx *ctx, const struct json_t *value, const char *path,
                                 const mxq_input_set *inputs);
/* The same up to the commit: the caller commits `out` (or aborts it). */
mxq_status mxq_json_write_temp(mxq_ctx *ctx, const struct json_t *value, const char *path, const mxq_input_set *inputs,
                               mxq_output *out);
/* Parse a JSON file read through mxq_input_read_all (size-bounded). */
mxq_status mxq_json_read(mxq_ctx *ctx, const char *path, const char *what, struct json_t **out);

/* json_object_set_new and json_array_append_new that remember a failure
 * (out of memory shows as a NULL object or value) in *ok, so that a
 * document built in many steps is checked once, at the end. */
void mxq_json_put(struct json_t *object, const char *key, struct json_t *value, int *ok);
void mxq_json_push(struct json_t *array, struct json_t *value, int *ok);

/* "a FIFO", "a directory", ... for a stat mode. */
const char *mxq_file_kind(mode_t mode);

#endif
