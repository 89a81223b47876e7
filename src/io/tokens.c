#include <hdf5.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "io/h5io.h"
#include "io/tokens.h"

static const char *int_kind(hid_t type)
{
    switch (H5Tget_class(type)) {
    case H5T_INTEGER: return H5Tget_sign(type) == H5T_SGN_2 ? "a signed integer" : "an unsigned integer";
    case H5T_FLOAT: return "a float";
    default: return "a non-numeric type";
    }
}

/* The shape of /tokens, checked before anything is allocated: int32, 2-D,
 * at least one sequence of 2, none longer than the model's context. */
static mxq_status check_tokens_dataset(mxq_ctx *ctx, const char *path, const char *what, int max_len, hid_t dset,
                                       hsize_t dims[2])
{
    mxq_status status = MXQ_OK;
    hid_t type = H5Dget_type(dset), space = H5Dget_space(dset);
    CALL_H5(ctx, type, "cannot read the type of '/tokens' in '%s'", path);
    CALL_H5(ctx, space, "cannot read the shape of '/tokens' in '%s'", path);
    CHECK(ctx, H5Tget_class(type) == H5T_INTEGER && H5Tget_size(type) == 4 && H5Tget_sign(type) == H5T_SGN_2,
          MXQ_ERR_FORMAT, "'/tokens' in '%s' must be int32, but it is %s of %zu bytes", path, int_kind(type),
          H5Tget_size(type));
    int ndims = H5Sget_simple_extent_ndims(space);
    CHECK(ctx, ndims == 2, MXQ_ERR_FORMAT, "'/tokens' in '%s' must be 2-D [n_sequences, seq_len], but it has %d dimension%s",
          path, ndims, ndims == 1 ? "" : "s");
    CALL_H5(ctx, H5Sget_simple_extent_dims(space, dims, NULL), "cannot read the shape of '/tokens' in '%s'", path);
    CHECK(ctx, dims[0] > 0 && dims[1] >= 2 && dims[0] < (1u << 30) && dims[1] < (1u << 24), MXQ_ERR_FORMAT,
          "'/tokens' in '%s' has shape [%llu, %llu]; expected 1 to 2^30-1 sequences of 2 to 2^24-1 tokens", path,
          (unsigned long long)dims[0], (unsigned long long)dims[1]);
    CHECK(ctx, dims[1] <= (hsize_t)max_len, MXQ_ERR_FORMAT,
          "%s '%s' has sequences of %llu tokens, longer than the model's context of %d (max_position_embeddings)", what,
          path, (unsigned long long)dims[1], max_len);
fail:
    if (space >= 0)
        H5Sclose(space);
    if (type >= 0)
        H5Tclose(type);
    return status;
}

/* Whether the file holds the data its shape declares. A few hundred bytes
 * can declare [2^29, 2^23] tokens that were never written (HDF5 reads them
 * as the fill value): allocating and reading that would take the machine's
 * memory before any id is checked (found by tests/fuzz/fuzz_tokens), and a
 * half-written file would score its missing part as token 0. Chunked data
 * must have every chunk written; contiguous data must be stored in full.
 * (Contiguous storage allocated and never written still passes: HDF5 does
 * not tell it from written data.) */
static mxq_status check_tokens_stored(mxq_ctx *ctx, const char *path, const char *what, hid_t dset,
                                      const hsize_t dims[2])
{
    mxq_status status = MXQ_OK;
    hid_t dcpl = H5Dget_create_plist(dset), space = H5Dget_space(dset);
    CALL_H5(ctx, dcpl, "cannot read the layout of '/tokens' in '%s'", path);
    CALL_H5(ctx, space, "cannot read the shape of '/tokens' in '%s'", path);
    const int filters = H5Pget_nfilters(dcpl);
    for (int i = 0; i < filters; i++) {
        unsigned flags;
        size_t n_values = 0;
        char filter_name[64] = "";
        const H5Z_filter_t id = H5Pget_filter2(dcpl, (unsigned)i, &flags, &n_values, NULL, sizeof(filter_name),
                                               filter_name, NULL);
        CHECK(ctx, id >= 0 && H5Zfilter_avail(id) > 0, MXQ_ERR_FORMAT,
              "%s '%s': '/tokens' is stored through HDF5 filter %d (%s), which this HDF5 cannot decode (write it "
              "without it, or with gzip)",
              what, path, (int)id, filter_name[0] ? filter_name : "unnamed");
    }
    const H5D_layout_t layout = H5Pget_layout(dcpl);
    if (layout == H5D_CHUNKED) {
        hsize_t chunk[2] = {1, 1}, written = 0;
        CALL_H5(ctx, H5Pget_chunk(dcpl, 2, chunk), "cannot read the chunks of '/tokens' in '%s'", path);
        const hsize_t expected = ((dims[0] + chunk[0] - 1) / chunk[0]) * ((dims[1] + chunk[1] - 1) / chunk[1]);
        CALL_H5(ctx, H5Dget_num_chunks(dset, space, &written), "cannot count the chunks of '/tokens' in '%s'", path);
        CHECK(ctx, written == expected, MXQ_ERR_FORMAT,
              "%s '%s': only %llu of the %llu chunks of '/tokens' [%llu, %llu] were written", what, path,
              (unsigned long long)written, (unsigned long long)expected, (unsigned long long)dims[0],
              (unsigned long long)dims[1]);
    } else if (layout == H5D_CONTIGUOUS) {
        const double declared = (double)dims[0] * (double)dims[1] * sizeof(int32_t);
        const double stored = (double)H5Dget_storage_size(dset);
        CHECK(ctx, stored >= declared, MXQ_ERR_FORMAT,
              "%s '%s': '/tokens' declares [%llu, %llu] int32 but holds only %.0f bytes: it was never written in full",
              what, path, (unsigned long long)dims[0], (unsigned long long)dims[1], stored);
    }
fail:
    if (space >= 0)
        H5Sclose(space);
    if (dcpl >= 0)
        H5Pclose(dcpl);
    return status;
}

static mxq_status check_ids(mxq_ctx *ctx, const char *path, const mxq_tokens *t, int vocab)
{
    mxq_status status = MXQ_OK;
    const size_t count = (size_t)t->n_seqs * (size_t)t->seq_len;
    for (size_t i = 0; i < count; i++) {
        int32_t id = t->ids[i];
        CHECK(ctx, id >= 0 && id < vocab, MXQ_ERR_FORMAT,
              "token file '%s': id %d at sequence %zu, position %zu is outside the model's vocabulary [0, %d)", path,
              id, i / (size_t)t->seq_len, i % (size_t)t->seq_len, vocab);
    }
fail:
    return status;
}

mxq_status mxq_tokens_read(mxq_ctx *ctx, const char *path, const char *what, int limit, int vocab, int max_len,
                           mxq_tokens *out)
{
    mxq_status status = MXQ_OK;
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    hid_t file = H5I_INVALID_HID, dset = H5I_INVALID_HID, space = H5I_INVALID_HID, memspace = H5I_INVALID_HID;
    hsize_t dims[2];
    memset(out, 0, sizeof(*out));

    CALL(ctx, mxq_h5_open_read(ctx, path, what, &file));
    CALL_IN(ctx, mxq_h5_open_dataset(ctx, file, path, "/tokens", &dset), "%s", what);
    CALL(ctx, check_tokens_dataset(ctx, path, what, max_len, dset, dims));
    CALL(ctx, check_tokens_stored(ctx, path, what, dset, dims));

    out->total_seqs = (int)dims[0];
    out->n_seqs = (limit > 0 && limit < (int)dims[0]) ? limit : (int)dims[0];
    out->seq_len = (int)dims[1];
    size_t count = (size_t)out->n_seqs * (size_t)out->seq_len;
    out->ids = malloc(count * sizeof(int32_t));
    CHECK_ALLOC(ctx, out->ids, count * sizeof(int32_t), "the token ids");
    hsize_t start[2] = {0, 0}, block[2] = {(hsize_t)out->n_seqs, dims[1]};
    space = H5Dget_space(dset);
    CALL_H5(ctx, space, "cannot read the shape of '/tokens' in '%s'", path);
    CALL_H5(ctx, H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, block, NULL), "cannot select tokens in '%s'",
            path);
    memspace = H5Screate_simple(2, block, NULL);
    CALL_H5(ctx, memspace, "cannot create a memory space for tokens");
    CALL_H5(ctx, H5Dread(dset, H5T_NATIVE_INT32, memspace, space, H5P_DEFAULT, out->ids),
            "cannot read '/tokens' from '%s'", path);
    CALL(ctx, check_ids(ctx, path, out, vocab));
fail:
    if (memspace >= 0)
        H5Sclose(memspace);
    if (space >= 0)
        H5Sclose(space);
    if (dset >= 0)
        H5Dclose(dset);
    if (file >= 0)
        H5Fclose(file);
    if (status != MXQ_OK)
        mxq_tokens_free(out);
    mxq_h5_quiet_end(&quiet);
    return status;
}

void mxq_tokens_free(mxq_tokens *tokens)
{
    free(tokens->ids);
    tokens->ids = NULL;
}
