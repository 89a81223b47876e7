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

static int of_job(const char *file, const mxq_act_store_info *info);

/* The root attributes and the group /layers. */
static mxq_status write_header(mxq_ctx *ctx, mxq_act_store *s, const mxq_act_store_info *info)
{
    mxq_status status = MXQ_OK;
    hid_t group = H5I_INVALID_HID;
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "mxq_activation_store", STORE_VERSION));
    CALL(ctx, mxq_h5_attr_string(ctx, s->file, "model", info->model));
    CALL(ctx, mxq_h5_attr_string(ctx, s->file, "calibration", info->calibration));
    CALL(ctx, mxq_h5_attr_string(ctx, s->file, "mode", info->mode));
    CALL(ctx, mxq_h5_attr_string(ctx, s->file, "job", info->job));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "n_layers", s->n_layers));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "n_seqs", s->n_seqs));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "seq_len", s->seq_len));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "hidden", s->hidden));
    CALL(ctx, mxq_h5_attr_int(ctx, s->file, "layers_complete", 0));
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
                                int force, int clear_temporaries, const mxq_model_config *cfg, int n_seqs, int seq_len,
                                const mxq_act_store_info *info, mxq_act_store *s)
{
    mxq_status status = MXQ_OK, local = MXQ_OK;
    mxq_h5_quiet quiet;
    char temp[4096] = "";
    *s = (mxq_act_store){.file = H5I_INVALID_HID,
                         .out = {.fd = -1},
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
        if (local == MXQ_OK && clear_temporaries)
            mxq_act_store_remove_temporaries(path, NULL, NULL);
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

/* One collective write (or read): sequences [first, first + n) of the open
 * dataset from (into) acts (n may be 0: nothing selected, but the rank
 * takes part). The selection is local and agreed before the transfer,
 * which every rank must reach. */
static mxq_status transfer_part(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, hid_t dset, hid_t dxpl,
                                int first, int n, float *acts, int reading)
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
    const herr_t moved = reading ? H5Dread(dset, H5T_NATIVE_FLOAT, mspace, fspace, dxpl, acts)
                                 : H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace, fspace, dxpl, acts);
    if (moved < 0)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot %s sequences %d..%d %s '%s'", reading ? "read" : "write",
                         first, first + n - 1, reading ? "from" : "to", s->path);
    AGREE(ctx, dist, reading ? "store.read" : "store.write", moved >= 0 ? MXQ_OK : MXQ_ERR_HDF5);
fail:
    if (fspace >= 0)
        H5Sclose(fspace);
    if (mspace >= 0)
        H5Sclose(mspace);
    return status;
}

/* The whole share in calls of up to WRITE_BYTES (one sequence at least);
 * every rank makes as many calls as the largest share needs. */
static mxq_status transfer_layer(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, hid_t dset, hid_t dxpl,
                                 int first, int n, float *acts, int reading)
{
    mxq_status status = MXQ_OK;
    const size_t seq_floats = (size_t)s->seq_len * s->hidden;
    const int per_call = seq_floats * sizeof(float) >= WRITE_BYTES ? 1 : (int)(WRITE_BYTES / (seq_floats * sizeof(float)));
    int largest = n;
    CALL_MPI(ctx, dist->comm, MPI_Allreduce(MPI_IN_PLACE, &largest, 1, MPI_INT, MPI_MAX, dist->comm));
    for (int done = 0; done < largest; done += per_call) {
        const int take = n - done < per_call ? (n - done > 0 ? n - done : 0) : per_call;
        CALL(ctx, transfer_part(ctx, dist, s, dset, dxpl, first + done, take,
                                take > 0 ? acts + (size_t)done * seq_floats : acts, reading));
    }
fail:
    return status;
}

/* Layer `layer` moved between the share [first, first + n) and the file.
 * Collective. */
static mxq_status transfer(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, int layer, int first, int n,
                           float *acts, int reading)
{
    mxq_status status = MXQ_OK;
    mxq_h5_quiet quiet;
    char name[32];
    snprintf(name, sizeof(name), "layers/%d", layer);
    mxq_h5_quiet_begin(&quiet);
    hid_t dset = H5Dopen2(s->file, name, H5P_DEFAULT), dxpl = H5Pcreate(H5P_DATASET_XFER);
    const int opened = dset >= 0 && dxpl >= 0 && H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE) >= 0;
    if (!opened)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot open /%s of '%s'", name, s->path);
    /* agreed before the collective transfers, which every rank must join */
    mxq_status local = mxq_agree(ctx, dist, "store.layer", opened ? MXQ_OK : MXQ_ERR_HDF5);
    if (local == MXQ_OK)
        local = transfer_layer(ctx, dist, s, dset, dxpl, first, n, acts, reading);
    if (dset >= 0)
        H5Dclose(dset);
    if (dxpl >= 0)
        H5Pclose(dxpl);
    mxq_h5_quiet_end(&quiet);
    CALL(ctx, local);
fail:
    return status;
}

/* The count of whole layers, and everything so far on disk: what a killed
 * run leaves is readable up to its last whole layer. Collective. */
static mxq_status mark_complete(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s)
{
    mxq_status status = MXQ_OK;
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    mxq_status local = mxq_h5_attr_int(ctx, s->file, "layers_complete", s->layers_written);
    local = mxq_agree(ctx, dist, "store.count", local); /* the flush is collective: only if every rank got here */
    const int counted = local == MXQ_OK;
    if (counted && H5Fflush(s->file, H5F_SCOPE_GLOBAL) < 0) {
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot flush '%s'", s->path);
        local = MXQ_ERR_HDF5;
    }
    if (counted)
        local = mxq_agree(ctx, dist, "store.flush", local);
    mxq_h5_quiet_end(&quiet);
    CALL(ctx, local);
fail:
    return status;
}

mxq_status mxq_act_store_write(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, int layer, int first, int n,
                               const float *acts)
{
    mxq_status status = MXQ_OK;
    if (layer < s->layers_written && s->reopened) /* whole already, in the store a resumed run took over */
        return MXQ_OK;
    CHECK_AGREED(ctx, dist, "store.order",
                 layer == s->layers_written && first >= 0 && n >= 0 && first + n <= s->n_seqs, MXQ_ERR_INTERNAL,
                 "activation store: layer %d (sequences %d..%d) written after %d of %d layers", layer, first,
                 first + n - 1, s->layers_written, s->n_layers);
    CALL(ctx, transfer(ctx, dist, s, layer, first, n, (float *)acts, 0));
    s->layers_written++;
    CALL(ctx, mark_complete(ctx, dist, s));
fail:
    return status;
}

mxq_status mxq_act_store_read(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, int layer, int first, int n,
                              float *acts)
{
    mxq_status status = MXQ_OK;
    CHECK_AGREED(ctx, dist, "store.order", layer < s->layers_written && first >= 0 && n >= 0 && first + n <= s->n_seqs,
                 MXQ_ERR_INTERNAL, "activation store: layer %d (sequences %d..%d) read, %d of %d layers are whole",
                 layer, first, first + n - 1, s->layers_written, s->n_layers);
    CALL(ctx, transfer(ctx, dist, s, layer, first, n, acts, 1));
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

/* Rank 0: the newest temporary a killed or stopped run left next to
 * `path` ("" if none). */
static void newest_temporary(const char *path, char *temp, size_t size)
{
    char dir[4096];
    const char *base = split_dir(path, dir, sizeof(dir));
    double newest = -1;
    DIR *d = opendir(dir);
    temp[0] = '\0';
    for (struct dirent *e = d ? readdir(d) : NULL; e; e = readdir(d)) {
        char candidate[8192];
        struct stat st;
        snprintf(candidate, sizeof(candidate), "%s/%s", dir, e->d_name);
        if (!mxq_is_temp_name_of(e->d_name, base) || lstat(candidate, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        const double when = (double)st.st_mtim.tv_sec + 1e-9 * (double)st.st_mtim.tv_nsec;
        if (when > newest && strlen(candidate) < size) {
            newest = when;
            snprintf(temp, size, "%s", candidate);
        }
    }
    if (d)
        closedir(d);
}

/* Rank 0: the count of whole layers in `temp` if it is a store of this
 * job (the same header), else 0. */
static int whole_layers(const char *temp, const mxq_act_store *want, const mxq_act_store_info *info)
{
    mxq_h5_quiet quiet;
    long long version = 0, layers = 0, seqs = 0, len = 0, hidden = 0, complete = 0;
    mxq_h5_quiet_begin(&quiet);
    hid_t f = H5Fis_hdf5(temp) > 0 ? H5Fopen(temp, H5F_ACC_RDONLY, H5P_DEFAULT) : H5I_INVALID_HID;
    const int ok = f >= 0 && mxq_h5_attr_int_read(f, "mxq_activation_store", &version) == 0 &&
                   version == STORE_VERSION && mxq_h5_attr_int_read(f, "n_layers", &layers) == 0 &&
                   mxq_h5_attr_int_read(f, "n_seqs", &seqs) == 0 && mxq_h5_attr_int_read(f, "seq_len", &len) == 0 &&
                   mxq_h5_attr_int_read(f, "hidden", &hidden) == 0 &&
                   mxq_h5_attr_int_read(f, "layers_complete", &complete) == 0 && layers == want->n_layers &&
                   seqs == want->n_seqs && len == want->seq_len && hidden == want->hidden && complete > 0 &&
                   complete <= want->n_layers &&
                   mxq_h5_attr_string_equals(f, "model", info->model) &&
                   mxq_h5_attr_string_equals(f, "calibration", info->calibration) &&
                   mxq_h5_attr_string_equals(f, "mode", info->mode) && mxq_h5_attr_string_equals(f, "job", info->job);
    if (f >= 0)
        H5Fclose(f);
    mxq_h5_quiet_end(&quiet);
    return ok ? (int)complete : 0;
}

/* Whether `file` is a store of the job `info` describes (its attribute job). */
static int of_job(const char *file, const mxq_act_store_info *info)
{
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    hid_t f = H5Fis_hdf5(file) > 0 ? H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT) : H5I_INVALID_HID;
    const int ours = f >= 0 && mxq_h5_attr_string_equals(f, "job", info->job);
    if (f >= 0)
        H5Fclose(f);
    mxq_h5_quiet_end(&quiet);
    return ours;
}

void mxq_act_store_remove_temporaries(const char *path, const mxq_act_store_info *info, const char *keep)
{
    char dir[4096];
    const char *base = split_dir(path, dir, sizeof(dir));
    DIR *d = opendir(dir);
    for (struct dirent *e = d ? readdir(d) : NULL; e; e = readdir(d)) {
        char victim[8192];
        struct stat st;
        snprintf(victim, sizeof(victim), "%s/%s", dir, e->d_name);
        if (mxq_is_temp_name_of(e->d_name, base) && (!keep || strcmp(victim, keep) != 0) &&
            lstat(victim, &st) == 0 && S_ISREG(st.st_mode) && (!info || of_job(victim, info)))
            unlink(victim);
    }
    if (d)
        closedir(d);
}

/* Rank 0: no temporary to take over, but the store in place at `path` is
 * this job's and whole (a run killed between its store's rename and its
 * index's): it goes back under a temporary name, to be committed again.
 * Returns its layers (0: not so). */
static int reclaim_committed(const char *path, const mxq_act_store *want, const mxq_act_store_info *info, char *temp,
                             size_t size)
{
    char dir[4096];
    const char *base = split_dir(path, dir, sizeof(dir));
    if (strlen(dir) + strlen(base) + 48 > size || whole_layers(path, want, info) != want->n_layers)
        return 0;
    char tail[48];
    snprintf(tail, sizeof(tail), ".tmp-%ld-9999", (long)getpid());
    strcpy(temp, dir); /* fits: checked above */
    strcat(temp, "/.");
    strcat(temp, base);
    strcat(temp, tail);
    if (rename(path, temp) != 0) {
        temp[0] = '\0';
        return 0;
    }
    return want->n_layers;
}

/* Every rank opens the adopted temporary through MPI-IO. */
static mxq_status open_adopted(mxq_ctx *ctx, const mxq_dist *dist, mxq_act_store *s, const char *temp)
{
    mxq_status status = MXQ_OK;
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl >= 0 && H5Pset_fapl_mpio(fapl, dist->comm, MPI_INFO_NULL) >= 0)
        s->file = H5Fopen(temp, H5F_ACC_RDWR, fapl); /* collective */
    if (s->file < 0)
        mxq_h5_error_set(ctx, __FILE__, __LINE__, "cannot reopen the activation store '%s'", temp);
    if (fapl >= 0)
        H5Pclose(fapl);
    mxq_h5_quiet_end(&quiet);
    const mxq_status opened = mxq_agree(ctx, dist, "store.reopen", s->file >= 0 ? MXQ_OK : MXQ_ERR_HDF5);
    if (opened != MXQ_OK) /* closing is collective too: the ranks that opened it cannot */
        s->file = H5I_INVALID_HID;
    CALL(ctx, opened);
fail:
    return status;
}

mxq_status mxq_act_store_reopen(mxq_ctx *ctx, const mxq_dist *dist, const char *path, const mxq_input_set *inputs,
                                const mxq_model_config *cfg, int n_seqs, int seq_len, const mxq_act_store_info *info,
                                int from, mxq_act_store *s, int *start)
{
    mxq_status status = MXQ_OK, local = MXQ_OK;
    char temp[4096] = "";
    int whole = 0;
    *s = (mxq_act_store){.file = H5I_INVALID_HID, .out = {.fd = -1}, .path = strdup(path), .force = 1,
                         .n_layers = cfg->n_layers, .n_seqs = n_seqs, .seq_len = seq_len, .hidden = cfg->hidden,
                         .reopened = 1};
    if (!s->path) {
        mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory");
        local = MXQ_ERR_NOMEM;
    }
    if (dist->rank == 0 && local == MXQ_OK) {
        newest_temporary(path, temp, sizeof(temp));
        whole = temp[0] ? whole_layers(temp, s, info) : reclaim_committed(path, s, info, temp, sizeof(temp));
        if (temp[0] && whole == 0)
            mxq_log(ctx, MXQ_LOG_INFO,
                    "activation store: %s is not this job's, or has no whole layer (mxq_activation_store, model, "
                    "calibration, mode, job, shape and layers_complete attributes): not taken over",
                    temp);
        if (whole > 0)
            local = mxq_output_adopt(ctx, path, temp, inputs, &s->out);
    }
    AGREE(ctx, dist, "store.adopt", local);
    CALL_MPI(ctx, dist->comm, MPI_Bcast(&whole, 1, MPI_INT, 0, dist->comm));
    CALL_MPI(ctx, dist->comm, MPI_Bcast(temp, (int)sizeof(temp), MPI_CHAR, 0, dist->comm));
    *start = whole > 0 ? (from < whole - 1 ? from : whole - 1) : -1;
    s->layers_written = *start + 1;
    if (*start < 0)
        return MXQ_OK;
    CHECK_AGREED(ctx, dist, "store.shared", access(temp, F_OK) == 0, MXQ_ERR_IO,
                 "--store-activations '%s': this rank does not see '%s', which rank 0 takes over; give a path on a "
                 "file system shared by all nodes",
                 path, temp);
    CALL(ctx, open_adopted(ctx, dist, s, temp));
fail:
    return status;
}

void mxq_act_store_keep(mxq_act_store *s)
{
    if (s->committed) { /* in place already: a failed job leaves no store that looks complete */
        mxq_act_store_abort(s);
        return;
    }
    if (s->file >= 0)
        H5Fclose(s->file);
    s->file = H5I_INVALID_HID;
    mxq_output_leave(&s->out);
    mxq_act_store_release(s);
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
