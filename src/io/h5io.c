#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/check.h"
#include "io/h5io.h"

struct h5_walk_state {
    char text[512];
    int sys_errno; /* from a "errno = N" in some frame's description, 0 if none */
};

static herr_t h5_walk_innermost(unsigned n, const H5E_error2_t *err, void *data)
{
    struct h5_walk_state *state = data;
    /* The stack walk goes from the innermost frame (n = 0) outward; the
     * innermost description is the most specific ("unable to open file").
     * A failed system call is described by a multi-line dump holding
     * "errno = 28"; the user needs strerror(28), not the dump. */
    const char *at = err->desc ? strstr(err->desc, "errno = ") : NULL;
    if (at && !state->sys_errno)
        state->sys_errno = atoi(at + 8);
    if (n == 0 && err->desc && err->desc[0]) {
        snprintf(state->text, sizeof(state->text), "%s", err->desc);
        state->text[strcspn(state->text, "\n:")] = '\0';
    }
    return 0;
}

void mxq_h5_error_set(mxq_ctx *ctx, const char *file, int line, const char *fmt, ...)
{
    char what[8704]; /* two paths and the operation */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    struct h5_walk_state state = {{0}, 0};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, h5_walk_innermost, &state);
    H5Eclear2(H5E_DEFAULT);
    if (state.sys_errno > 0)
        mxq_error_set(ctx, MXQ_ERR_IO, file, line, "%s: %s", what, strerror(state.sys_errno));
    else if (state.text[0])
        mxq_error_set(ctx, MXQ_ERR_HDF5, file, line, "%s (HDF5: %s)", what, state.text);
    else
        mxq_error_set(ctx, MXQ_ERR_HDF5, file, line, "%s", what);
}

void mxq_h5_quiet_begin(mxq_h5_quiet *q)
{
    if (H5Eget_auto2(H5E_DEFAULT, &q->func, &q->data) < 0) {
        q->func = NULL;
        q->data = NULL;
    }
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void mxq_h5_quiet_end(const mxq_h5_quiet *q)
{
    H5Eset_auto2(H5E_DEFAULT, q->func, q->data);
}

/* The name under which HDF5 should open the file behind descriptor fd:
 * /proc/self/fd/N is that very file even if its name has been swapped for a
 * FIFO since it was checked; without /proc, the name itself. */
static const char *fd_path(int fd, const char *path, char *buf, size_t size)
{
    snprintf(buf, size, "/proc/self/fd/%d", fd);
    return access(buf, F_OK) == 0 ? buf : path;
}

mxq_status mxq_h5_open_read(mxq_ctx *ctx, const char *path, const char *what, hid_t *file_out)
{
    mxq_status status = MXQ_OK;
    int fd = -1;
    char proc[64];
    *file_out = H5I_INVALID_HID;
    CALL(ctx, mxq_input_open(ctx, path, what, &fd));
    const char *name = fd_path(fd, path, proc, sizeof(proc));
    htri_t is_hdf5 = H5Fis_hdf5(name);
    H5Eclear2(H5E_DEFAULT);
    CHECK(ctx, is_hdf5 > 0, MXQ_ERR_FORMAT, "%s '%s' is not an HDF5 file", what, path);
    hid_t file = H5Fopen(name, H5F_ACC_RDONLY, H5P_DEFAULT);
    CALL_H5(ctx, file, "cannot open %s '%s'", what, path);
    *file_out = file;
fail:
    if (fd >= 0)
        close(fd);
    return status;
}

/* External links are not followed: one could lead to a FIFO, where the
 * read would wait forever, or to any file at all. */
static herr_t deny_external_link(const char *parent_file, const char *parent_group, const char *child_file,
                                 const char *child_object, unsigned *acc_flags, hid_t fapl, void *data)
{
    (void)parent_file, (void)parent_group, (void)child_file, (void)child_object, (void)acc_flags, (void)fapl;
    (void)data;
    return -1;
}

/* Data stored outside the file (external storage, a virtual dataset) is
 * refused for the same reason. */
static mxq_status check_stored_inside(mxq_ctx *ctx, hid_t dset, const char *path, const char *dataset)
{
    mxq_status status = MXQ_OK;
    hid_t dcpl = H5Dget_create_plist(dset);
    CALL_H5(ctx, dcpl, "cannot read how '%s' is stored in '%s'", dataset, path);
    CHECK(ctx, H5Pget_external_count(dcpl) == 0 && H5Pget_layout(dcpl) != H5D_VIRTUAL, MXQ_ERR_FORMAT,
          "'%s' in '%s' is stored outside the file (external storage or a virtual dataset); mxq reads only data "
          "inside the file",
          dataset, path);
fail:
    if (dcpl >= 0)
        H5Pclose(dcpl);
    return status;
}

mxq_status mxq_h5_open_dataset(mxq_ctx *ctx, hid_t file, const char *path, const char *dataset, hid_t *out)
{
    mxq_status status = MXQ_OK;
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS), dset = H5I_INVALID_HID;
    *out = H5I_INVALID_HID;
    CALL_H5(ctx, dapl, "cannot create a dataset access list");
    CALL_H5(ctx, H5Pset_elink_cb(dapl, deny_external_link, NULL), "cannot create a dataset access list");
    htri_t exists = H5Lexists(file, dataset, dapl);
    /* H5Lexists fails (rather than returning 0) when an intermediate group is
     * missing or is an external link; both mean the same to the user. */
    H5Eclear2(H5E_DEFAULT);
    CHECK(ctx, exists > 0, MXQ_ERR_FORMAT, "'%s' has no dataset '%s' (inside the file)", path, dataset);
    /* Opening as a generic object first tells a group from a dataset
     * portably across HDF5 1.10 and 1.12+. */
    hid_t object = H5Oopen(file, dataset, dapl);
    H5Eclear2(H5E_DEFAULT);
    CHECK(ctx, object >= 0, MXQ_ERR_FORMAT, "cannot open '%s' in '%s' (an external link is not followed)", dataset,
          path);
    H5I_type_t object_type = H5Iget_type(object);
    H5Oclose(object);
    CHECK(ctx, object_type == H5I_DATASET, MXQ_ERR_FORMAT, "'%s' in '%s' is not a dataset", dataset, path);
    dset = H5Dopen2(file, dataset, dapl);
    CALL_H5(ctx, dset, "cannot open dataset '%s' in '%s'", dataset, path);
    CALL(ctx, check_stored_inside(ctx, dset, path, dataset));
    *out = dset;
    dset = H5I_INVALID_HID;
fail:
    if (dset >= 0)
        H5Dclose(dset);
    if (dapl >= 0)
        H5Pclose(dapl);
    return status;
}

static mxq_status read_float_2d(mxq_ctx *ctx, hid_t file, const char *path_for_messages, const char *dataset,
                                size_t width, const size_t max_shape[2], void **data, size_t *rows, size_t *cols)
{
    mxq_status status = MXQ_OK;
    hid_t dset = H5I_INVALID_HID, space = H5I_INVALID_HID, type = H5I_INVALID_HID;
    void *buf = NULL;
    *data = NULL;

    CALL(ctx, mxq_h5_open_dataset(ctx, file, path_for_messages, dataset, &dset));

    type = H5Dget_type(dset);
    CALL_H5(ctx, type, "cannot read the type of '%s' in '%s'", dataset, path_for_messages);
    CHECK(ctx, H5Tget_class(type) == H5T_FLOAT && H5Tget_size(type) == width, MXQ_ERR_FORMAT,
          "dataset '%s' in '%s' must be float%zu, but it is %s of %zu bytes", dataset, path_for_messages, width * 8,
          H5Tget_class(type) == H5T_FLOAT     ? "float"
          : H5Tget_class(type) == H5T_INTEGER ? "integer"
                                              : "a non-numeric type",
          H5Tget_size(type));

    space = H5Dget_space(dset);
    CALL_H5(ctx, space, "cannot read the shape of '%s' in '%s'", dataset, path_for_messages);
    int ndims = H5Sget_simple_extent_ndims(space);
    CHECK(ctx, ndims == 2, MXQ_ERR_FORMAT, "dataset '%s' in '%s' must be 2-D [rows, cols], but it has %d dimension%s",
          dataset, path_for_messages, ndims, ndims == 1 ? "" : "s");
    hsize_t dims[2];
    CALL_H5(ctx, H5Sget_simple_extent_dims(space, dims, NULL), "cannot read the shape of '%s' in '%s'", dataset,
            path_for_messages);
    CHECK(ctx, dims[0] > 0 && dims[1] > 0, MXQ_ERR_FORMAT, "dataset '%s' in '%s' is empty (%llu x %llu)", dataset,
          path_for_messages, (unsigned long long)dims[0], (unsigned long long)dims[1]);
    /* from the declared shape, before anything proportional to it exists */
    CHECK(ctx, dims[0] <= max_shape[0] && dims[1] <= max_shape[1], MXQ_ERR_FORMAT,
          "dataset '%s' in '%s' is [%llu, %llu]; expected at most [%zu, %zu] here", dataset, path_for_messages,
          (unsigned long long)dims[0], (unsigned long long)dims[1], max_shape[0], max_shape[1]);
    size_t count = (size_t)dims[0] * (size_t)dims[1];
    buf = malloc(count * width);
    CHECK_ALLOC(ctx, buf, count * width, dataset);
    CALL_H5(ctx, H5Dread(dset, width == 4 ? H5T_NATIVE_FLOAT : H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf),
            "cannot read dataset '%s' in '%s'", dataset, path_for_messages);
    *data = buf;
    *rows = (size_t)dims[0];
    *cols = (size_t)dims[1];
    buf = NULL;
fail:
    free(buf);
    if (space >= 0)
        H5Sclose(space);
    if (type >= 0)
        H5Tclose(type);
    if (dset >= 0)
        H5Dclose(dset);
    return status;
}

mxq_status mxq_h5_read_f32_2d(mxq_ctx *ctx, hid_t file, const char *path_for_messages, const char *dataset,
                              const size_t max_shape[2], float **data, size_t *rows, size_t *cols)
{
    return read_float_2d(ctx, file, path_for_messages, dataset, 4, max_shape, (void **)data, rows, cols);
}

mxq_status mxq_h5_read_f64_2d(mxq_ctx *ctx, hid_t file, const char *path_for_messages, const char *dataset,
                              const size_t max_shape[2], double **data, size_t *rows, size_t *cols)
{
    return read_float_2d(ctx, file, path_for_messages, dataset, 8, max_shape, (void **)data, rows, cols);
}

mxq_status mxq_h5_write(mxq_ctx *ctx, hid_t file, const char *name, hid_t mem_type, int rank,
                        const hsize_t *dims, const void *data)
{
    mxq_status status = MXQ_OK;
    hid_t space = H5I_INVALID_HID, dset = H5I_INVALID_HID;
    space = H5Screate_simple(rank, dims, NULL);
    CALL_H5(ctx, space, "cannot create the dataspace of '%s'", name);
    dset = H5Dcreate2(file, name, mem_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    CALL_H5(ctx, dset, "cannot create dataset '%s'", name);
    CALL_H5(ctx, H5Dwrite(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), "cannot write dataset '%s'", name);
fail:
    if (dset >= 0)
        H5Dclose(dset);
    if (space >= 0)
        H5Sclose(space);
    return status;
}

mxq_status mxq_h5_attr_string(mxq_ctx *ctx, hid_t object, const char *name, const char *value)
{
    mxq_status status = MXQ_OK;
    hid_t type = H5I_INVALID_HID, space = H5I_INVALID_HID, attr = H5I_INVALID_HID;
    type = H5Tcopy(H5T_C_S1);
    CALL_H5(ctx, type, "cannot create a string type for attribute '%s'", name);
    CALL_H5(ctx, H5Tset_size(type, strlen(value) + 1), "cannot size attribute '%s'", name);
    space = H5Screate(H5S_SCALAR);
    CALL_H5(ctx, space, "cannot create the dataspace of attribute '%s'", name);
    attr = H5Acreate2(object, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    CALL_H5(ctx, attr, "cannot create attribute '%s'", name);
    CALL_H5(ctx, H5Awrite(attr, type, value), "cannot write attribute '%s'", name);
fail:
    if (attr >= 0)
        H5Aclose(attr);
    if (space >= 0)
        H5Sclose(space);
    if (type >= 0)
        H5Tclose(type);
    return status;
}

/* A scalar attribute stored as file_type from one value of mem_type. */
static mxq_status attr_scalar(mxq_ctx *ctx, hid_t object, const char *name, hid_t file_type, hid_t mem_type,
                              const void *value)
{
    mxq_status status = MXQ_OK;
    hid_t space = H5I_INVALID_HID, attr = H5I_INVALID_HID;
    space = H5Screate(H5S_SCALAR);
    CALL_H5(ctx, space, "cannot create the dataspace of attribute '%s'", name);
    /* an existing attribute is updated (a store's count of whole layers) */
    attr = H5Aexists(object, name) > 0 ? H5Aopen(object, name, H5P_DEFAULT)
                                       : H5Acreate2(object, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    CALL_H5(ctx, attr, "cannot create attribute '%s'", name);
    CALL_H5(ctx, H5Awrite(attr, mem_type, value), "cannot write attribute '%s'", name);
fail:
    if (attr >= 0)
        H5Aclose(attr);
    if (space >= 0)
        H5Sclose(space);
    return status;
}

mxq_status mxq_h5_attr_double(mxq_ctx *ctx, hid_t object, const char *name, double value)
{
    return attr_scalar(ctx, object, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

mxq_status mxq_h5_attr_int(mxq_ctx *ctx, hid_t object, const char *name, long long value)
{
    return attr_scalar(ctx, object, name, H5T_STD_I64LE, H5T_NATIVE_LLONG, &value);
}

int mxq_h5_attr_int_read(hid_t object, const char *name, long long *value)
{
    if (H5Aexists(object, name) <= 0)
        return -1;
    hid_t attr = H5Aopen(object, name, H5P_DEFAULT);
    const int ok = attr >= 0 && H5Aread(attr, H5T_NATIVE_LLONG, value) >= 0;
    if (attr >= 0)
        H5Aclose(attr);
    return ok ? 0 : -1;
}

int mxq_h5_attr_string_equals(hid_t object, const char *name, const char *expected)
{
    if (H5Aexists(object, name) <= 0)
        return 0;
    hid_t attr = H5Aopen(object, name, H5P_DEFAULT), type = attr >= 0 ? H5Aget_type(attr) : H5I_INVALID_HID;
    int equal = 0;
    if (type >= 0 && H5Tget_class(type) == H5T_STRING && !H5Tis_variable_str(type)) {
        const size_t size = H5Tget_size(type);
        char *text = calloc(size + 1, 1);
        equal = text && H5Aread(attr, type, text) >= 0 && strlen(expected) <= size &&
                strncmp(text, expected, size) == 0 && (strlen(expected) == size || text[strlen(expected)] == '\0');
        free(text);
    }
    if (type >= 0)
        H5Tclose(type);
    if (attr >= 0)
        H5Aclose(attr);
    return equal;
}

int mxq_h5_file_is_ours(const char *path)
{
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    const int ours = file >= 0 && H5Aexists(file, MXQ_VERSION_MARK) > 0;
    if (file >= 0)
        H5Fclose(file);
    mxq_h5_quiet_end(&quiet);
    return ours;
}

mxq_status mxq_h5_output_begin(mxq_ctx *ctx, const char *final_path, const mxq_input_set *inputs,
                               mxq_h5_output *out)
{
    mxq_status status = MXQ_OK;
    out->file = H5I_INVALID_HID;
    out->out = (mxq_output){.fd = -1};
    CALL(ctx, mxq_output_begin_ours(ctx, final_path, inputs, mxq_h5_file_is_ours, MXQ_VERSION_MARK " attribute",
                                    &out->out));
    /* HDF5 opens files by name: give it the one of the temporary just
     * created (its descriptor stays open for the commit's fsync). */
    char proc[64];
    out->file = H5Fcreate(fd_path(out->out.fd, out->out.temp_path, proc, sizeof(proc)), H5F_ACC_TRUNC, H5P_DEFAULT,
                          H5P_DEFAULT);
    CALL_H5(ctx, out->file, "cannot create '%s'", final_path);
    CALL(ctx, mxq_h5_attr_string(ctx, out->file, MXQ_VERSION_MARK, MXQ_VERSION));
    return MXQ_OK;
fail:
    mxq_h5_output_abort(out);
    return status;
}

mxq_status mxq_h5_output_commit(mxq_ctx *ctx, mxq_h5_output *out)
{
    mxq_status status = MXQ_OK;
    herr_t closed = H5Fclose(out->file);
    out->file = H5I_INVALID_HID;
    CALL_H5(ctx, closed, "cannot write '%s'", out->out.final_path);
    CALL(ctx, mxq_output_commit(ctx, &out->out));
fail:
    mxq_h5_output_abort(out);
    return status;
}

void mxq_h5_output_abort(mxq_h5_output *out)
{
    if (out->file >= 0)
        H5Fclose(out->file);
    out->file = H5I_INVALID_HID;
    mxq_output_abort(&out->out);
}
