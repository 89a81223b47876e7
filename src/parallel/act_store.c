/* The activation store: parallel HDF5 (MPI-IO) on the group's communicator.
 * See act_store.h for the file's layout. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "io/h5io.h"
#include "parallel/act_store.h"

#define STORE_VERSION 1
/* Bytes per collective write: whole sequences up to 1 GB a call (or one
 * sequence, if larger), so that MPI-IO requests stay far from INT_MAX
 * bytes for any shape short of 2 GB a sequence. */
#define WRITE_BYTES ((size_t)1 << 30)

mxq_status mxq_act_store_check(mxq_ctx *ctx, const char *path, const mxq_input_set *inputs, int force)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    CALL(ctx, mxq_output_check(ctx, path, inputs));
    if (lstat(path, &st) != 0)
        return MXQ_OK;
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    int is_store = 0;
    if (H5Fis_hdf5(path) > 0) { /* HDF5 1.10: no H5Fis_accessible */
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        is_store = f >= 0 && H5Aexists(f, "mxq_activation_store") > 0;
        if (f >= 0)
            H5Fclose(f);
    }
    mxq_h5_quiet_end(&quiet);
    CHECK(ctx, is_store, MXQ_ERR_ARG,
          "--store-activations '%s' exists and is not an mxq activation store; mxq replaces only a store it wrote "
          "(remove the file or give another path)",
          path);
    CHECK(ctx, force, MXQ_ERR_ARG, "--store-activations '%s' holds an earlier activation store; pass --force to replace it",
          path);
fail:
    return status;
}

/* The directory of `path` ("." for a bare name, "/" at the root); returns
 * the base name. */
static const char *split_dir(const char *path, char *dir, size_t size)
{
    const char *slash = strrchr(path, '/');
    snprintf(dir, size, "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
    if (!dir[0])
        snprintf(dir, size, "/");
    return slash ? slash + 1 : path;
}

mxq_status mxq_act_store_check_space(mxq_ctx *ctx, const char *path, double bytes)
{
    mxq_status status = MXQ_OK;
    char dir[4096];
    split_dir(path, dir, sizeof(dir));
    struct statvfs fs;
    if (statvfs(dir, &fs) != 0) /* a directory made later (inside --out): found at create */
        return MXQ_OK;
    const double free_bytes = (double)fs.f_bavail * (double)fs.f_frsize;
    CHECK(ctx, free_bytes >= bytes, MXQ_ERR_IO,
          "--store-activations '%s' needs %.2f GB, and its file system has %.2f GB free", path, bytes / 1e9,
          free_bytes / 1e9);
fail:
    return status;
}

/* --force: the temporaries that killed runs left next to the path (a 7B
 * store's is 8.6 GB, in a hidden file). */
static void remove_stale_temporaries(const char *path)
{
    char dir[4096];
    const char *base = split_dir(path, dir, sizeof(dir));
    DIR *d = opendir(dir);
    for (struct dirent *e = d ? readdir(d) : NULL; e; e = readdir(d))
        if (mxq_is_temp_name_of(e->d_name, base)) {
            char victim[8192];
            snprintf(victim, sizeof(victim), "%s/%s", dir, e->d_name);
            unlink(victim);
        }
    if (d)
        closedir(d);
}

/* The root attributes and the group /layers. */
static mxq_status write_header(mxq_ctx *ctx, mxq_act_store *s, const mxq_act_store_info *info)
{
    mxq_status status = MXQ_OK;
    hid_t group = H5I_INVALID_HID;
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "mxq_activation_store", STORE_VERSION));
    CALL(ctx, mxq_h5_attr_string(ctx, s->file, "model", info->model));
    CALL(ctx, mxq_h5_attr_string(ctx, s->file, "calibration", info->calibration));
    CALL(ctx, mxq_h5_attr_string(ctx, s->file, "mode", info->mode));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "n_layers", s->n_layers));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "n_seqs", s->n_seqs));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "seq_len", s->seq_len));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "hidden", s->hidden));
    group = H5Gcreate2(s->file, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    CALL_H5(ctx, group, "cannot create the group /layers in '%s'", s->path);
fail:
    if (group >= 0)
        H5Gclose(group);
    return status;
}

/* /layers/<l> for every layer, one sequence per chunk, never filled (each
 * is written whole). Collective. */
static mxq_status create_datasets(mxq_ctx *ctx, mxq_act_store *s)
{
    mxq_status status = MXQ_OK;
    const hsize_t dims[3] = {(hsize_t)s->n_seqs, (hsize_t)s->seq_len, (hsize_t)s->hidden};
    const hsize_t chunk[3] = {1, (hsize_t)s->seq_len, (hsize_t)s->hidden};
    hid_t space = H5Screate_simple(3, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    CALL_H5(ctx, space, "cannot describe the layers' inputs in '%s'", s->path);
    CALL_H5(ctx, dcpl, "cannot describe the layers' inputs in '%s'", s->path);
    CALL_H5(ctx, H5Pset_chunk(dcpl, 3, chunk), "cannot chunk the layers' inputs in '%s'", s->path);
    CALL_H5(ctx, H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER), "cannot set the fill of '%s'", s->path);
    for (int l = 0; l < s->n_layers; l++) {
        char name[32];
        snprintf(name, sizeof(name), "layers/%d", l);
        hid_t d = H5Dcreate2(s->file, name, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        CALL_H5(ctx, d, "cannot create /%s in '%s'", name, s->path);
        H5Dclose(d);
    }
fail:
    if (space >= 0)
        H5Sclose(space);
    if (dcpl >= 0)
        H5Pclose(dcpl);
    return status;
}

/* Every rank opens rank 0's temporary file through MPI-IO, then lays out
 * the file; each collective phase is agreed before the next. */
static mxq_status open_parallel(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, const char *temp,
                                const mxq_act_store_info *info)
{
    mxq_status status = MXQ_OK;
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    mxq_status local = fapl >= 0 && H5Pset_fapl_mpio(fapl, dist->comm, MPI_INFO_NULL) >= 0 ? MXQ_OK : MXQ_ERR_HDF5;
    if (local != MXQ_OK)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot open '%s' for parallel writing", s->path);
    AGREE(ctx, dist, "store.access", local);
    s->file = H5Fcreate(temp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl); /* collective */
    if (s->file < 0)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot create '%s'", s->path);
    AGREE(ctx, dist, "store.open", s->file >= 0 ? MXQ_OK : MXQ_ERR_HDF5);
    local = write_header(ctx, s, info); /* collective metadata, the same on every rank */
    if (local == MXQ_OK)
        local = create_datasets(ctx, s);
    AGREE(ctx, dist, "store.layout", local);
fail:
    if (fapl >= 0)
        H5Pclose(fapl);
    return status;
}

mxq_status mxq_act_store_create(mxq_ctx *ctx, const mxq_dist *dist, const char *path, const mxq_input_set *inputs,
                                int force, const mxq_model_config *cfg, int n_seqs, int seq_len,
                                const mxq_act_store_info *info, mxq_act_store *s)
{
    mxq_status status = MXQ_OK, local = MXQ_OK;
    mxq_h5_quiet quiet;
    char temp[4096] = "";
    *s = (mxq_act_store){.file = H5I_INVALID_HID,
                         .out = {NULL, NULL, -1},
                         .path = strdup(path),
                         .force = force,
                         .n_layers = cfg->n_layers,
                         .n_seqs = n_seqs,
                         .seq_len = seq_len,
                         .hidden = cfg->hidden};
    CHECK_ALLOC(ctx, s->path, strlen(path) + 1, "a path");
    /* HDF5 limits a chunk (here one sequence) to 4 GiB */
    CHECK(ctx, (double)seq_len * cfg->hidden * sizeof(float) < 4294967296.0, MXQ_ERR_ARG,
          "--store-activations: one sequence of %d tokens x %d features exceeds HDF5's 4 GiB chunk limit", seq_len,
          cfg->hidden);
    if (dist->rank == 0) {
        local = mxq_act_store_check(ctx, path, inputs, force); /* again: the path may have changed since setup */
        if (local == MXQ_OK && force)
            remove_stale_temporaries(path);
        if (local == MXQ_OK)
            local = mxq_output_begin(ctx, path, inputs, &s->out);
        if (local == MXQ_OK)
            snprintf(temp, sizeof(temp), "%s", s->out.temp_path);
    }
    AGREE(ctx, dist, "store.create", local);
    CALL_MPI(ctx, dist->comm, MPI_Bcast(temp, (int)sizeof(temp), MPI_CHAR, 0, dist->comm));
    /* MPI-IO needs one file seen by every rank: on a node-local path the
     * other nodes would each write a file of their own */
    CHECK_AGREED(ctx, dist, "store.shared", access(temp, F_OK) == 0, MXQ_ERR_IO,
                 "--store-activations '%s': this rank does not see the file rank 0 created there; give a path on a "
                 "file system shared by all nodes",
                 path);
    mxq_h5_quiet_begin(&quiet);
    status = open_parallel(ctx, dist, s, temp, info);
    mxq_h5_quiet_end(&quiet);
fail:
    return status;
}

/* One collective write: sequences [first, first + n) of the open dataset
 * from acts (n may be 0: nothing selected, but the rank takes part). The
 * selection is local and agreed before the write, which every rank must
 * reach. */
static mxq_status write_part(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, hid_t dset, hid_t dxpl, int first,
                             int n, const float *acts)
{
    mxq_status status = MXQ_OK;
    const hsize_t start[3] = {(hsize_t)first, 0, 0},
                  count[3] = {(hsize_t)(n > 0 ? n : 1), (hsize_t)s->seq_len, (hsize_t)s->hidden};
    hid_t fspace = H5Dget_space(dset), mspace = H5Screate_simple(3, count, NULL);
    int selected = fspace >= 0 && mspace >= 0;
    if (selected && n > 0)
        selected = H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL) >= 0;
    else if (selected)
        selected = H5Sselect_none(fspace) >= 0 && H5Sselect_none(mspace) >= 0;
    if (!selected)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot select sequences %d..%d in '%s'", first, first + n - 1,
                         s->path);
    AGREE(ctx, dist, "store.select", selected ? MXQ_OK : MXQ_ERR_HDF5);
    const herr_t written = H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, fspace, dxpl, acts);
    if (written < 0)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot write sequences %d..%d to '%s'", first, first + n - 1,
                         s->path);
    AGREE(ctx, dist, "store.write", written >= 0 ? MXQ_OK : MXQ_ERR_HDF5);
fail:
    if (fspace >= 0)
        H5Sclose(fspace);
    if (mspace >= 0)
        H5Sclose(mspace);
    return status;
}

/* The whole share in calls of up to WRITE_BYTES (one sequence at least);
 * every rank makes as many calls as the largest share needs. */
static mxq_status write_layer(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, hid_t dset, hid_t dxpl,
                              int first, int n, const float *acts)
{
    mxq_status status = MXQ_OK;
    const size_t seq_floats = (size_t)s->seq_len * s->hidden;
    const int per_call = seq_floats * sizeof(float) >= WRITE_BYTES ? 1 : (int)(WRITE_BYTES / (seq_floats * sizeof(float)));
    int largest = n;
    CALL_MPI(ctx, dist->comm, MPI_Allreduce(MPI_IN_PLACE, &largest, 1, MPI_INT, MPI_MAX, dist->comm));
    for (int done = 0; done < largest; done += per_call) {
        const int take = n - done < per_call ? (n - done > 0 ? n - done : 0) : per_call;
        CALL(ctx, write_part(ctx, dist, s, dset, dxpl, first + done, take,
                             take > 0 ? acts + (size_t)done * seq_floats : acts));
    }
fail:
    return status;
}

mxq_status mxq_act_store_write(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, int layer, int first, int n,
                               const float *acts)
{
    mxq_status status = MXQ_OK;
    mxq_h5_quiet quiet;
    char name[32];
    snprintf(name, sizeof(name), "layers/%d", layer);
    CHECK_AGREED(ctx, dist, "store.order",
                 layer == s->layers_written && first >= 0 && n >= 0 && first + n <= s->n_seqs, MXQ_ERR_INTERNAL,
                 "activation store: layer %d (sequences %d..%d) written after %d of %d layers", layer, first,
                 first + n - 1, s->layers_written, s->n_layers);
    mxq_h5_quiet_begin(&quiet);
    hid_t dset = H5Dopen2(s->file, name, H5P_DEFAULT), dxpl = H5Pcreate(H5P_DATASET_XFER);
    const int opened = dset >= 0 && dxpl >= 0 && H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE) >= 0;
    if (!opened)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot open /%s of '%s'", name, s->path);
    /* agreed before the collective writes, which every rank must join */
    mxq_status local = mxq_agree(ctx, dist, "store.layer", opened ? MXQ_OK : MXQ_ERR_HDF5);
    if (local == MXQ_OK)
        local = write_layer(ctx, dist, s, dset, dxpl, first, n, acts);
    if (dset >= 0)
        H5Dclose(dset);
    if (dxpl >= 0)
        H5Pclose(dxpl);
    mxq_h5_quiet_end(&quiet);
    CALL(ctx, local);
    s->layers_written++;
fail:
    return status;
}

mxq_status mxq_act_store_commit(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s)
{
    mxq_status status = MXQ_OK, local = MXQ_OK;
    CHECK(ctx, s->layers_written == s->n_layers, MXQ_ERR_INTERNAL, "the activation store holds %d of %d layers",
          s->layers_written, s->n_layers);
    herr_t closed = H5Fclose(s->file);
    s->file = H5I_INVALID_HID;
    if (closed < 0) {
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot write '%s'", s->path);
        local = MXQ_ERR_HDF5;
    }
    AGREE(ctx, dist, "store.close", local);
    /* hours may have passed: what is at the path now is checked again */
    if (dist->rank == 0) {
        local = mxq_act_store_check(ctx, s->path, NULL, s->force);
        if (local == MXQ_OK)
            local = mxq_output_commit(ctx, &s->out);
    }
    s->committed = dist->rank == 0 && local == MXQ_OK;
    AGREE(ctx, dist, "store.commit", local);
fail:
    return status;
}

void mxq_act_store_abort(mxq_act_store *s)
{
    if (s->file >= 0)
        H5Fclose(s->file);
    s->file = H5I_INVALID_HID;
    if (s->committed && s->out.final_path)
        unlink(s->out.final_path);
    s->committed = 0;
    mxq_act_store_release(s);
}

void mxq_act_store_release(mxq_act_store *s)
{
    mxq_output_abort(&s->out); /* removes the temporary, if one is left */
    free(s->path);
    s->path = NULL;
}
