/* HDF5 helpers of the jobs that read and write HDF5 files (cast,
 * quantize-linear, token files). Internal. Every function names the file and
 * dataset in its error messages. */
#ifndef MXQ_H5IO_H
#define MXQ_H5IO_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#include "io/fsutil.h"
#include "mxq/core.h"

/* HDF5 calls return a negative value on failure. The HDF5 error stack's
 * innermost description is appended to the message, or, when a system call
 * failed, the system's reason (errno) alone. */
void mxq_h5_error_set(mxq_ctx *ctx, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
#define CALL_H5(ctx, expr, ...)                                                   \
    do {                                                                          \
        if ((expr) < 0) {                                                         \
            mxq_h5_error_set((ctx), __FILE__, __LINE__, __VA_ARGS__);             \
            status = MXQ_ERR_HDF5;                                                \
            goto fail;                                                            \
        }                                                                         \
    } while (0)

/* HDF5 prints its own error stack to stderr by default; mxq reports errors
 * itself. A job that calls HDF5 turns that printing off for its duration
 * and restores whatever the host program had set. */
typedef struct {
    H5E_auto2_t func;
    void *data;
} mxq_h5_quiet;
void mxq_h5_quiet_begin(mxq_h5_quiet *q);
void mxq_h5_quiet_end(const mxq_h5_quiet *q);

/* An HDF5 file whose root has the attribute MXQ_VERSION_MARK. */
int mxq_h5_file_is_ours(const char *path);

/* Open an existing HDF5 file read-only; clear errors for a missing file, an
 * unreadable file, a file that is not regular (a FIFO would block) and a
 * file that is not HDF5. */
mxq_status mxq_h5_open_read(mxq_ctx *ctx, const char *path, const char *what, hid_t *file_out);

/* Open dataset `dataset` of `file` (path: the file's name, for messages):
 * it must exist and be a dataset whose data lies inside the file; external
 * links are not followed. */
mxq_status mxq_h5_open_dataset(mxq_ctx *ctx, hid_t file, const char *path, const char *dataset, hid_t *out);

/* Read a whole 2-D float32 dataset into a new buffer (free() it).
 * data [rows, cols]; a declared shape beyond max_shape [rows, cols] is
 * refused before anything is allocated. */
mxq_status mxq_h5_read_f32_2d(mxq_ctx *ctx, hid_t file, const char *path_for_messages, const char *dataset,
                              const size_t max_shape[2], float **data, size_t *rows, size_t *cols);
mxq_status mxq_h5_read_f64_2d(mxq_ctx *ctx, hid_t file, const char *path_for_messages, const char *dataset,
                              const size_t max_shape[2], double **data, size_t *rows, size_t *cols);

/* Write a new dataset of `rank` dimensions from a native-typed buffer. */
mxq_status mxq_h5_write(mxq_ctx *ctx, hid_t file, const char *name, hid_t mem_type, int rank,
                        const hsize_t *dims, const void *data);
mxq_status mxq_h5_attr_string(mxq_ctx *ctx, hid_t object, const char *name, const char *value);
mxq_status mxq_h5_attr_double(mxq_ctx *ctx, hid_t object, const char *name, double value);
mxq_status mxq_h5_attr_int(mxq_ctx *ctx, hid_t object, const char *name, long long value);
/* An integer attribute's value (0), or -1 if it is missing or unreadable. */
int mxq_h5_attr_int_read(hid_t object, const char *name, long long *value);
/* 1 if the string attribute `name` (as mxq_h5_attr_string writes it) equals `expected`. */
int mxq_h5_attr_string_equals(hid_t object, const char *name, const char *expected);

/* An HDF5 output through mxq_output (fsutil.h): checked against the job's
 * inputs, written under a temporary name, renamed into place when complete.
 * begin fails at once if the output may not or cannot be written. */
typedef struct {
    hid_t file;
    mxq_output out;
} mxq_h5_output;

mxq_status mxq_h5_output_begin(mxq_ctx *ctx, const char *final_path, const mxq_input_set *inputs,
                               mxq_h5_output *out);
mxq_status mxq_h5_output_commit(mxq_ctx *ctx, mxq_h5_output *out);
void mxq_h5_output_abort(mxq_h5_output *out);

#endif
