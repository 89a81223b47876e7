/* mxq cast: MX-quantize one 2-D float32 HDF5 dataset. */
#include <math.h>
#include <stdlib.h>

#include "io/h5io.h"
#include "jobs/jobs_internal.h"

/* Signal-to-quantization-noise ratio in dB over the finite inputs. */
static double sqnr_db(const float *x, const float *q, size_t n)
{
    double signal = 0.0, noise = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(x[i]) || !isfinite(q[i]))
            continue;
        signal += (double)x[i] * x[i];
        noise += ((double)x[i] - q[i]) * ((double)x[i] - q[i]);
    }
    if (noise == 0.0)
        return INFINITY;
    return 10.0 * log10(signal / noise);
}

typedef struct {
    float *input, *dequant; /* [rows, cols] */
    uint8_t *packed, *scales;
    size_t rows, cols, nblocks, row_bytes;
} cast_data;

static mxq_status write_cast(mxq_ctx *ctx, const mxq_mx_spec *spec, const char *in_dataset, const cast_data *c,
                             mxq_h5_output *out)
{
    mxq_status status = MXQ_OK;
    hsize_t dims_out[2] = {c->rows, c->cols}, dims_scale[2] = {c->rows, c->nblocks},
            dims_packed[2] = {c->rows, c->row_bytes};
    CALL(ctx, mxq_h5_write(ctx, out->file, "/output", H5T_NATIVE_FLOAT, 2, dims_out, c->dequant));
    CALL(ctx, mxq_h5_write(ctx, out->file, "/scale_e8m0", H5T_NATIVE_UINT8, 2, dims_scale, c->scales));
    CALL(ctx, mxq_h5_write(ctx, out->file, "/packed", H5T_NATIVE_UINT8, 2, dims_packed, c->packed));
    CALL(ctx, mxq_h5_attr_string(ctx, out->file, "format", spec->format->name));
    CALL(ctx, mxq_h5_attr_int(ctx, out->file, "block", spec->block));
    CALL(ctx, mxq_h5_attr_string(ctx, out->file, "rounding", mxq_rounding_name(spec->rounding)));
    CALL(ctx, mxq_h5_attr_string(ctx, out->file, "source", in_dataset));
fail:
    return status;
}

mxq_status mxq_cast_file(mxq_ctx *ctx, const mxq_mx_spec *spec, const char *in_path, const char *in_dataset,
                         const char *out_path)
{
    mxq_status status = MXQ_OK;
    mxq_h5_quiet quiet;
    mxq_h5_quiet_begin(&quiet);
    hid_t in = H5I_INVALID_HID;
    cast_data c = {0};
    mxq_h5_output out = {H5I_INVALID_HID, {.fd = -1}};
    mxq_input_set inputs = {0};

    CALL(ctx, mxq_mx_spec_check(ctx, spec));
    CALL(ctx, mxq_input_set_add(ctx, &inputs, in_path, "the input file"));
    /* Before any work: the output may be written and is not the input. */
    CALL(ctx, mxq_h5_output_begin(ctx, out_path, &inputs, &out));
    CALL(ctx, mxq_h5_open_read(ctx, in_path, "input file", &in));
    const size_t max_shape[2] = {(size_t)1 << 31, MXQ_MAX_WIDTH}; /* rows of at most the widest linear */
    CALL(ctx, mxq_h5_read_f32_2d(ctx, in, in_path, in_dataset, max_shape, &c.input, &c.rows, &c.cols));
    H5Fclose(in);
    in = H5I_INVALID_HID;

    c.nblocks = mxq_mx_blocks_per_row(c.cols, spec->block);
    c.row_bytes = mxq_mx_packed_row_bytes(spec->format, c.cols);
    c.dequant = malloc(c.rows * c.cols * sizeof(float));
    c.scales = malloc(c.rows * c.nblocks);
    c.packed = malloc(c.rows * c.row_bytes);
    CHECK_ALLOC(ctx, c.dequant && c.scales && c.packed, c.rows * (c.cols * sizeof(float) + c.nblocks + c.row_bytes),
                "the quantized output");
    double t0 = mxq_time_now();
    CALL(ctx, mxq_mx_quantize_rows(ctx, spec, c.input, c.rows, c.cols, c.packed, c.scales, c.dequant));
    double seconds = mxq_time_now() - t0;
    CALL_IN(ctx, write_cast(ctx, spec, in_dataset, &c, &out), "cannot write '%s'", out_path);
    CALL(ctx, mxq_h5_output_commit(ctx, &out));

    size_t nan_blocks = 0;
    for (size_t i = 0; i < c.rows * c.nblocks; i++)
        nan_blocks += c.scales[i] == MXQ_E8M0_NAN;
    mxq_log(ctx, MXQ_LOG_INFO,
            "cast %s:%s [%zu x %zu] -> %s block %d rounding %s (%s kernel): %.3f ms, SQNR %.2f dB, "
            "%zu NaN block%s, wrote %s",
            in_path, in_dataset, c.rows, c.cols, spec->format->name, spec->block, mxq_rounding_name(spec->rounding),
            mxq_kernel_name(mxq_kernel_resolve(spec->kernel)), seconds * 1e3, sqnr_db(c.input, c.dequant, c.rows * c.cols),
            nan_blocks, nan_blocks == 1 ? "" : "s", out_path);
fail:
    if (in >= 0)
        H5Fclose(in);
    mxq_h5_output_abort(&out);
    mxq_input_set_free(&inputs);
    free(c.input);
    free(c.dequant);
    free(c.scales);
    free(c.packed);
    mxq_h5_quiet_end(&quiet);
    return status;
}
