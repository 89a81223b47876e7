/* libFuzzer target: the token-file reader (HDF5 dataset /tokens, int32
 * [n_sequences, seq_len]), as `--calib` and `--tokens` read it.
 *
 * Structure-aware: the fuzzed bytes describe an HDF5 file (the dataset's
 * type, rank, shape, layout, whether its data was written, and the data)
 * that is written through libhdf5 and then read by mxq. This fuzzes mxq's
 * checks of what a well-formed HDF5 file may hold; it does not fuzz
 * libhdf5's own parser of the file format, which is not mxq's code.
 *
 * Input layout: [type][rank][flags][dim0][dim1][dim2][limit][vocab lo hi]
 * [max_len lo hi][data ...] */
#include <hdf5.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "io/tokens.h"

enum { FLAG_CHUNKED = 1, FLAG_DEFLATE = 2, FLAG_UNWRITTEN = 4, FLAG_BIG = 8, FLAG_GROUP = 16, FLAG_OTHER_NAME = 32 };

static hid_t file_type(uint8_t selector)
{
    /* libhdf5's type ids are run-time values, hence no table. */
    switch (selector % 7) {
    case 0: return H5T_STD_I32LE;
    case 1: return H5T_STD_I32BE;
    case 2: return H5T_STD_I64LE;
    case 3: return H5T_STD_U32LE;
    case 4: return H5T_IEEE_F32LE;
    case 5: return H5T_STD_I16LE;
    default: return H5T_STD_I8LE;
    }
}

/* Writes the described file; returns 0 if libhdf5 refused the description
 * (an input the harness cannot express, not a finding). */
static int write_file(const char *path, const uint8_t *p, size_t size)
{
    const uint8_t flags = p[2];
    const int rank = p[1] % 4;
    hsize_t dims[3], count = 1;
    for (int d = 0; d < rank; d++) {
        dims[d] = p[3 + d] % 64 + ((flags & FLAG_BIG) && d < 2 ? (hsize_t)p[3 + d] << 20 : 0);
        count *= dims[d];
    }
    int ok = 0;
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t space = rank ? H5Screate_simple(rank, dims, NULL) : H5Screate(H5S_SCALAR);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    if (file < 0 || space < 0 || dcpl < 0)
        goto done;
    if (flags & FLAG_GROUP) {
        hid_t group = H5Gcreate2(file, "/tokens", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ok = group >= 0;
        H5Gclose(group);
        goto done;
    }
    if (rank && (flags & (FLAG_CHUNKED | FLAG_DEFLATE)) && count > 0) {
        hsize_t chunk[3];
        for (int d = 0; d < rank; d++)
            chunk[d] = dims[d] < 16 ? dims[d] : 16;
        H5Pset_chunk(dcpl, rank, chunk);
        if (flags & FLAG_DEFLATE)
            H5Pset_deflate(dcpl, 1);
    }
    hid_t type = file_type(p[0]);
    hid_t dset = H5Dcreate2(file, (flags & FLAG_OTHER_NAME) ? "/tok" : "/tokens", type, space, H5P_DEFAULT, dcpl,
                            H5P_DEFAULT);
    if (dset < 0)
        goto done;
    ok = 1;
    if (!(flags & (FLAG_UNWRITTEN | FLAG_BIG)) && count > 0) {
        /* The data, in the dataset's own type: the remaining bytes, repeated. */
        size_t bytes = (size_t)count * H5Tget_size(type);
        uint8_t *buf = malloc(bytes);
        if (!buf)
            abort(); /* the harness's fault: at most 64^3 * 8 bytes */
        const uint8_t *src = p + 10;
        size_t src_size = size - 10;
        for (size_t i = 0; i < bytes; i++)
            buf[i] = src_size ? src[i % src_size] : 0;
        ok = H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) >= 0;
        free(buf);
    }
    H5Dclose(dset);
done:
    if (dcpl >= 0)
        H5Pclose(dcpl);
    if (space >= 0)
        H5Sclose(space);
    if (file >= 0)
        H5Fclose(file);
    return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 10)
        return 0;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    const char *path = fuzz_path("tokens.h5");
    if (!write_file(path, data, size))
        return 0;
    const int limit = (int8_t)data[6];
    const int vocab = data[7] | data[8] << 8;
    const int max_len = data[9] ? data[9] * 16 : 1 << 24;
    mxq_ctx *ctx = fuzz_ctx();
    mxq_tokens tokens;
    if (mxq_tokens_read(ctx, path, "token file", limit, vocab, max_len, &tokens) == MXQ_OK) {
        /* What a reader promised: ids in [0, vocab), the limit kept. */
        if (tokens.n_seqs < 1 || tokens.seq_len < 2 || (limit > 0 && tokens.n_seqs > limit))
            abort();
        for (size_t i = 0; i < (size_t)tokens.n_seqs * (size_t)tokens.seq_len; i++)
            if (tokens.ids[i] < 0 || tokens.ids[i] >= vocab)
                abort();
        mxq_tokens_free(&tokens);
    }
    mxq_ctx_destroy(ctx);
    return 0;
}
