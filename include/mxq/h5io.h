/* HDF5 helpers shared by the CLI verbs, tests and benches. Every function
 * names the file and dataset in its error messages. */
#ifndef MXQ_H5IO_H
#define MXQ_H5IO_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* HDF5 prints its own error stack to stderr by default; mxq reports errors
 * itself, so the CLI turns that off once at start-up. */
void mxq_h5_silence_errors(void);

/* Open an existing HDF5 file read-only; clear errors for a missing file, an
 * unreadable file and a file that is not HDF5. */
mxq_status mxq_h5_open_read(mxq_ctx *ctx, const char *path, hid_t *file_out);

/* Read a whole 2-D float32 dataset into a new buffer (free() it).
 * data [rows, cols]. */
mxq_status mxq_h5_read_f32_2d(mxq_ctx *ctx, hid_t file, const char *path_for_messages,
                              const char *dataset, float **data, size_t *rows, size_t *cols);
mxq_status mxq_h5_read_f64_2d(mxq_ctx *ctx, hid_t file, const char *path_for_messages,
                              const char *dataset, double **data, size_t *rows, size_t *cols);

/* Write a new dataset of `rank` dimensions from a native-typed buffer. */
mxq_status mxq_h5_write(mxq_ctx *ctx, hid_t file, const char *name, hid_t mem_type, int rank,
                        const hsize_t *dims, const void *data);
mxq_status mxq_h5_attr_string(mxq_ctx *ctx, hid_t object, const char *name, const char *value);
mxq_status mxq_h5_attr_double(mxq_ctx *ctx, hid_t object, const char *name, double value);
mxq_status mxq_h5_attr_int(mxq_ctx *ctx, hid_t object, const char *name, long long value);

/* Output files are written under a temporary name beside the final one and
 * renamed into place only when complete, so a crash never leaves a
 * half-written file under the name a user or script looks for.
 * begin: creates `<dir>/.<name>.tmp-<pid>` (fails clearly if the directory
 * is missing or not writable) and returns it open. commit: closes and
 * renames. abort: closes and removes the temporary. */
typedef struct {
    hid_t file;
    char *final_path;
    char *temp_path;
} mxq_h5_output;

mxq_status mxq_h5_output_begin(mxq_ctx *ctx, const char *final_path, mxq_h5_output *out);
mxq_status mxq_h5_output_commit(mxq_ctx *ctx, mxq_h5_output *out);
void mxq_h5_output_abort(mxq_h5_output *out);

#ifdef __cplusplus
}
#endif

#endif
