/* The figures of mxq quantize: gathered on rank 0, printed as a table,
 * written as mxq_report.json, config.json and the index. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "algo/gptq_internal.h"
#include "algo/layer_quant.h"
#include "formats/mx_spec.h"
#include "io/ckpt_writer.h"
#include "jobs/quantize_report.h"
#include "jobs/jobs_internal.h"
#include "parallel/gptq_grid.h"
#include "parallel/hessian_split.h"

/* What each rank sends ahead of its records and its tensor names. */
typedef struct {
    uint64_t shard_bytes; /* tensor data */
    uint64_t file_bytes;  /* the whole shard file */
    char sha256[65];      /* of the whole shard file */
    double peak_rss;
    int n_records;
} rank_header;

void mxq_layer_record_of(const mxq_layer_result *r, int rank, mxq_layer_record *rec)
{
    memset(rec, 0, sizeof(*rec));
    rec->layer = r->layer;
    rec->rank = rank;
    rec->seconds_calib = r->seconds_calib;
    rec->seconds = r->seconds;
    rec->peak_rss = (double)r->peak_rss;
    rec->seconds_phase[MXQ_PHASE_SCALES] = r->seconds_scales;
    rec->seconds_phase[MXQ_PHASE_CLIP] = r->seconds_clip;
    rec->seconds_phase[MXQ_PHASE_GPTQ] = r->seconds_gptq;
    rec->seconds_phase[MXQ_PHASE_PACK] = r->seconds_pack;
    rec->seconds_phase[MXQ_PHASE_LOSS] = r->seconds_loss;
    memcpy(rec->awq_alpha, r->awq_alpha, sizeof(rec->awq_alpha));
    memcpy(rec->smooth_alpha, r->smooth_alpha, sizeof(rec->smooth_alpha));
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        rec->linear[li].quantized = r->linear[li].quantized;
        rec->linear[li].dead_channels = r->linear[li].dead_channels;
        rec->linear[li].loss_rtn = r->linear[li].loss_rtn;
        rec->linear[li].loss = r->linear[li].loss;
        rec->linear[li].seconds = r->linear[li].seconds;
    }
}

void mxq_layer_result_of_record(const mxq_layer_record *rec, mxq_layer_result *r)
{
    memset(r, 0, sizeof(*r));
    r->layer = rec->layer;
    r->seconds_calib = rec->seconds_calib;
    r->seconds = rec->seconds;
    r->peak_rss = (size_t)rec->peak_rss;
    r->seconds_scales = rec->seconds_phase[MXQ_PHASE_SCALES];
    r->seconds_clip = rec->seconds_phase[MXQ_PHASE_CLIP];
    r->seconds_gptq = rec->seconds_phase[MXQ_PHASE_GPTQ];
    r->seconds_pack = rec->seconds_phase[MXQ_PHASE_PACK];
    r->seconds_loss = rec->seconds_phase[MXQ_PHASE_LOSS];
    memcpy(r->awq_alpha, rec->awq_alpha, sizeof(r->awq_alpha));
    memcpy(r->smooth_alpha, rec->smooth_alpha, sizeof(r->smooth_alpha));
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        r->linear[li].quantized = rec->linear[li].quantized;
        r->linear[li].dead_channels = rec->linear[li].dead_channels;
        r->linear[li].loss_rtn = rec->linear[li].loss_rtn;
        r->linear[li].loss = rec->linear[li].loss;
        r->linear[li].seconds = rec->linear[li].seconds;
    }
}

void mxq_layer_record_log(mxq_ctx *ctx, int n_layers, const mxq_layer_record *rec)
{
    double rtn, loss;
    char alphas[160];
    mxq_layer_record_losses(rec, &rtn, &loss);
    mxq_layer_record_alphas(rec, alphas, sizeof(alphas));
    mxq_log(ctx, MXQ_LOG_INFO, "layer %d (%d/%d): loss rtn %.4e -> %.4e (%+.1f%%)%s%s  calib %.2f s  quant %.2f s  rss %.0f MB",
            rec->layer, rec->layer + 1, n_layers, rtn, loss, rtn > 0 ? 100.0 * (loss - rtn) / rtn : 0.0,
            alphas[0] ? " " : "", alphas, rec->seconds_calib, rec->seconds, rec->peak_rss / 1048576.0);
}

/* [rank_header][records][names, each followed by '\n'] */
mxq_status mxq_quantize_report_pack(mxq_ctx *ctx, int rank, const mxq_layer_result *results, int n_local,
                                    char *const *names, size_t n_names, const mxq_shard_digest *shard, char **out,
                                    size_t *len)
{
    mxq_status status = MXQ_OK;
    size_t text = 0;
    for (size_t i = 0; i < n_names; i++)
        text += strlen(names[i]) + 1;
    int n_records = 0; /* a data-parallel group's results have slots for layers other ranks own (layer -1) */
    for (int i = 0; i < n_local; i++)
        n_records += results[i].layer >= 0;
    *len = sizeof(rank_header) + (size_t)n_records * sizeof(mxq_layer_record) + text;
    char *buf = *out = malloc(*len);
    CHECK_ALLOC(ctx, buf, *len, "the report of this rank");
    rank_header h;
    memset(&h, 0, sizeof(h)); /* padding too: these bytes travel */
    h.shard_bytes = shard->data_bytes;
    h.file_bytes = shard->file_bytes;
    snprintf(h.sha256, sizeof(h.sha256), "%s", shard->sha256);
    h.peak_rss = (double)mxq_peak_rss_bytes();
    h.n_records = n_records;
    memcpy(buf, &h, sizeof(h));
    mxq_layer_record *rec = (mxq_layer_record *)(buf + sizeof(h));
    for (int i = 0, k = 0; i < n_local; i++) {
        mxq_layer_record one;
        if (results[i].layer < 0)
            continue;
        mxq_layer_record_of(&results[i], rank, &one);
        memcpy(&rec[k++], &one, sizeof(one));
    }
    char *p = buf + sizeof(h) + (size_t)n_records * sizeof(mxq_layer_record);
    for (size_t i = 0; i < n_names; i++) {
        size_t n = strlen(names[i]);
        memcpy(p, names[i], n);
        p[n] = '\n';
        p += n + 1;
    }
fail:
    return status;
}

/* Rank 0: one rank's part of the gathered bytes into the report. */
static mxq_status unpack_rank(mxq_ctx *ctx, mxq_quantize_report *rep, int r, const char *part, size_t len)
{
    mxq_status status = MXQ_OK;
    rank_header h;
    char shard[64];
    CHECK(ctx, len >= sizeof(h), MXQ_ERR_INTERNAL, "the report of rank %d is truncated", r);
    memcpy(&h, part, sizeof(h));
    size_t head = sizeof(h) + (size_t)h.n_records * sizeof(mxq_layer_record);
    CHECK(ctx, h.n_records >= 0 && len >= head, MXQ_ERR_INTERNAL, "the report of rank %d is truncated", r);
    CHECK(ctx, rep->n_records + h.n_records <= rep->capacity, MXQ_ERR_INTERNAL,
          "rank %d reports %d layers, more than the model has left", r, h.n_records);
    memcpy(rep->records + rep->n_records, part + sizeof(h), (size_t)h.n_records * sizeof(mxq_layer_record));
    rep->n_records += h.n_records;
    rep->peak_rss[r] = h.peak_rss;
    rep->total_bytes += h.shard_bytes;
    mxq_shard_name(shard, sizeof(shard), r, rep->size);
    h.sha256[sizeof(h.sha256) - 1] = '\0';
    CHECK(ctx, json_object_set_new(rep->shards, shard, json_pack("{s:s, s:I}", "sha256", h.sha256, "bytes",
                                                                  (json_int_t)h.file_bytes)) == 0,
          MXQ_ERR_NOMEM, "out of memory building the checkpoint index");
    for (const char *p = part + head, *end = part + len; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        CHECK(ctx, nl != NULL, MXQ_ERR_INTERNAL, "a tensor name of rank %d is truncated", r);
        CHECK(ctx, json_object_setn_new(rep->weight_map, p, (size_t)(nl - p), json_string(shard)) == 0, MXQ_ERR_NOMEM,
              "out of memory building the checkpoint index");
        p = nl + 1;
    }
fail:
    return status;
}

static int cmp_record_layer(const void *a, const void *b)
{
    const int la = ((const mxq_layer_record *)a)->layer, lb = ((const mxq_layer_record *)b)->layer;
    return (la > lb) - (la < lb);
}

static mxq_status unpack_all(mxq_ctx *ctx, mxq_quantize_report *rep, int n_layers)
{
    const char *all = rep->gathered;
    const size_t *lens = rep->lens;
    mxq_status status = MXQ_OK;
    rep->records = calloc((size_t)n_layers + 1, sizeof(*rep->records));
    rep->capacity = n_layers;
    rep->peak_rss = calloc((size_t)rep->size, sizeof(double));
    rep->weight_map = json_object();
    rep->shards = json_object();
    CHECK_ALLOC(ctx, rep->records && rep->peak_rss && rep->weight_map && rep->shards, (size_t)n_layers * sizeof(*rep->records),
                "the gathered report");
    size_t offset = 0;
    for (int r = 0; r < rep->size; r++) {
        CALL(ctx, unpack_rank(ctx, rep, r, all + offset, lens[r]));
        offset += lens[r];
    }
    /* a data-parallel group's ranks own every R-th layer: the table and the
     * report list layers in order all the same */
    qsort(rep->records, (size_t)rep->n_records, sizeof(*rep->records), cmp_record_layer);
fail:
    return status;
}

mxq_status mxq_quantize_report_gather(mxq_ctx *ctx, const mxq_dist *dist, mxq_quantize_report *report,
                                      const char *packed, size_t len)
{
    mxq_status status = MXQ_OK;
    report->size = dist->size;
    CALL(ctx, mxq_gather_bytes(ctx, dist, "quantize.gather", packed, len, &report->gathered, &report->lens));
fail:
    return status;
}

/* ---- config.json -------------------------------------------------------------- */

/* A spec through the one MX spec serializer. */
static json_t *spec_json(const mxq_mx_spec *spec, int *ok)
{
    json_t *obj = json_object();
    char text[64];
    for (int i = 0; obj && i < MXQ_MX_SPEC_FIELDS; i++) {
        mxq_mx_spec_field_text(spec, i, text, sizeof(text));
        mxq_json_put(obj, mxq_mx_spec_field_key(i),
                            mxq_mx_spec_field_is_int(i) ? json_integer(atoi(text)) : json_string(text), ok);
    }
    return obj;
}

static json_t *algorithm_json(const mxq_algo_step *st, int *ok)
{
    json_t *params;
    if (st->kind == MXQ_ALGO_SMOOTHQUANT)
        params = json_pack("{s:f}", "alpha", st->smoothquant.alpha);
    else if (st->kind == MXQ_ALGO_AWQ)
        params = json_pack("{s:i, s:b, s:i, s:f, s:i}", "grid", st->awq.grid, "clip", st->awq.clip, "clip_grid",
                           st->awq.clip_grid, "max_shrink", st->awq.max_shrink, "sample_rows", st->awq.sample_rows);
    else
        params = json_pack("{s:i, s:i, s:f, s:b}", "block", st->gptq.lazy_block, "microblock", st->gptq.microblock,
                           "damp", st->gptq.damp, "act_order", st->gptq.act_order);
    json_t *step = json_object();
    mxq_json_put(step, mxq_algo_name(st->kind), params, ok);
    return step;
}

static json_t *quantization_config(const mxq_recipe *recipe, const char *calib_path, int *ok)
{
    json_t *q = json_object(), *algos = json_array(), *ex = json_array();
    mxq_json_put(q, "quant_method", json_string("mxq"), ok);
    mxq_json_put(q, "format_version", json_integer(1), ok);
    mxq_json_put(q, "weights", recipe->has_weights ? spec_json(&recipe->weights, ok) : json_null(), ok);
    mxq_json_put(q, "activations", recipe->has_acts ? spec_json(&recipe->acts, ok) : json_null(), ok);
    for (int i = 0; i < recipe->n_steps; i++)
        mxq_json_push(algos, algorithm_json(&recipe->steps[i], ok), ok);
    mxq_json_put(q, "algorithms", algos, ok);
    mxq_json_put(q, "calibration",
                        json_pack("{s:i, s:s, s:s}", "samples", recipe->calib_samples, "mode",
                                  recipe->calib_mode == MXQ_CALIB_FP ? "fp" : "sequential", "file", calib_path), ok);
    for (int i = 0; i < recipe->n_exclude; i++)
        mxq_json_push(ex, json_string(recipe->exclude[i]), ok);
    mxq_json_put(q, "exclude", ex, ok);
    mxq_json_put(q, "storage",
                        json_string("per quantized linear: <name>.weight_packed U8 [out, packed row bytes] with the "
                                    "elements packed along the row as mxq cast packs them, and <name>.weight_scale U8 "
                                    "E8M0 [out, ceil(in/block)]; other tensors as in the input checkpoint, except "
                                    "norms and biases changed by folded scales, which are F32"), ok);
    return q;
}

/* ---- mxq_report.json and the summary table ---------------------------------- */

static json_t *layer_json(const mxq_layer_record *rec, double *tot_rtn, double *tot_loss, int *ok)
{
    json_t *jl = json_pack("{s:i, s:i, s:f, s:f, s:f}", "layer", rec->layer, "rank", rec->rank, "seconds_calib",
                           rec->seconds_calib, "seconds", rec->seconds, "peak_rss_mb", rec->peak_rss / 1048576.0);
    json_t *awq = json_object(), *sq = json_object(), *lins = json_object();
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        if (rec->awq_alpha[i] >= 0)
            mxq_json_put(awq, mxq_input_name((mxq_input_id)i), json_real(rec->awq_alpha[i]), ok);
        if (rec->smooth_alpha[i] >= 0)
            mxq_json_put(sq, mxq_input_name((mxq_input_id)i), json_real(rec->smooth_alpha[i]), ok);
    }
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        if (!rec->linear[li].quantized)
            continue;
        *tot_rtn += rec->linear[li].loss_rtn;
        *tot_loss += rec->linear[li].loss;
        mxq_json_put(lins, mxq_linear_name((mxq_linear_id)li),
                            json_pack("{s:f, s:f, s:i, s:f}", "loss_rtn", rec->linear[li].loss_rtn, "loss",
                                      rec->linear[li].loss, "dead_channels", rec->linear[li].dead_channels, "seconds",
                                      rec->linear[li].seconds), ok);
    }
    mxq_json_put(jl, "seconds_of_quantize",
                 json_pack("{s:f, s:f, s:f, s:f, s:f}", "scales", rec->seconds_phase[MXQ_PHASE_SCALES], "clip",
                           rec->seconds_phase[MXQ_PHASE_CLIP], "gptq", rec->seconds_phase[MXQ_PHASE_GPTQ], "pack",
                           rec->seconds_phase[MXQ_PHASE_PACK], "report_loss", rec->seconds_phase[MXQ_PHASE_LOSS]),
                 ok);
    mxq_json_put(jl, "awq_alpha", awq, ok);
    mxq_json_put(jl, "smoothquant_alpha", sq, ok);
    mxq_json_put(jl, "linears", lins, ok);
    return jl;
}

static json_t *report_json(const mxq_quantize_report *rep, const char *model_dir, const char *calib_path,
                           const char *recipe_path, const double *seconds, int *ok)
{
    json_t *report = json_object(), *layers = json_array(), *rss = json_array();
    double tot_rtn = 0, tot_loss = 0;
    /* absolute, so that what reads the report later (export's vocabulary,
     * inspect) finds the model from any directory */
    char *absolute = realpath(model_dir, NULL);
    mxq_json_put(report, "model", json_string(absolute ? absolute : model_dir), ok);
    free(absolute);
    mxq_json_put(report, "calibration", json_string(calib_path), ok);
    mxq_json_put(report, "recipe", json_string(recipe_path), ok);
    mxq_json_put(report, "ranks", json_integer(rep->size), ok);
    /* what the bytes depend on besides the inputs: the sums' grouping, the grid */
    mxq_json_put(report, "group_size", json_integer(rep->group_size), ok);
    if (rep->inputs) /* paths, sizes and checksums of what went in */
        mxq_json_put(report, "inputs", json_incref(rep->inputs), ok);
    mxq_json_put(report, "grid_min_inputs", json_integer(rep->grid_min_inputs), ok);
    mxq_json_put(report, "loss_rows",
                 json_string("losses of a linear of 512 rows or more are estimated from every (out/256)-th row, "
                             "scaled to all rows; smaller linears exactly"),
                 ok);
    for (int l = 0; l < rep->n_records; l++)
        mxq_json_push(layers, layer_json(&rep->records[l], &tot_rtn, &tot_loss, ok), ok);
    mxq_json_put(report, "layers", layers, ok);
    for (int r = 0; r < rep->size; r++)
        mxq_json_push(rss, json_real(rep->peak_rss[r] / 1048576.0), ok);
    mxq_json_put(report, "peak_rss_mb_per_rank", rss, ok);
    if (rep->predicted_rss) {
        json_t *pred = json_array();
        for (int r = 0; r < rep->size; r++)
            mxq_json_push(pred, json_real(rep->predicted_rss[r] / 1048576.0), ok);
        mxq_json_put(report, "predicted_peak_rss_mb_per_rank", pred, ok);
    }
    mxq_json_put(report, "totals",
                        json_pack("{s:f, s:f, s:f, s:f, s:f}", "loss_rtn", tot_rtn, "loss", tot_loss, "seconds_quantize",
                                  seconds[0], "seconds_write", seconds[1], "seconds_total", seconds[2]), ok);
    return report;
}

void mxq_layer_record_losses(const mxq_layer_record *rec, double *rtn, double *loss)
{
    *rtn = *loss = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        if (rec->linear[li].quantized) {
            *rtn += rec->linear[li].loss_rtn;
            *loss += rec->linear[li].loss;
        }
}

void mxq_layer_record_alphas(const mxq_layer_record *rec, char *text, size_t size)
{
    size_t used = 0;
    text[0] = '\0';
    for (int i = 0; i < MXQ_INPUT_COUNT && used < size; i++) {
        const int awq = rec->awq_alpha[i] >= 0;
        if (awq || rec->smooth_alpha[i] >= 0)
            used += (size_t)snprintf(text + used, size - used, "%s%s[%s]=%.2f", used ? " " : "", awq ? "awq" : "sq",
                                     mxq_input_name((mxq_input_id)i), awq ? rec->awq_alpha[i] : rec->smooth_alpha[i]);
    }
}

static void print_summary(mxq_ctx *ctx, const mxq_quantize_report *rep, double quant_seconds)
{
    double tot_rtn = 0, tot_loss = 0, peak = 0;
    mxq_print(ctx, "%-6s %-5s %12s %12s %8s %8s %9s  %s\n", "layer", "rank", "loss rtn", "loss", "change", "seconds", "rss MB",
           "alpha");
    for (int l = 0; l < rep->n_records; l++) {
        const mxq_layer_record *rec = &rep->records[l];
        double rtn, loss;
        mxq_layer_record_losses(rec, &rtn, &loss);
        tot_rtn += rtn;
        tot_loss += loss;
        char alphas[160];
        mxq_layer_record_alphas(rec, alphas, sizeof(alphas));
        mxq_print(ctx, "%-6d %-5d %12.4e %12.4e %+7.1f%% %8.2f %9.0f  %s\n", rec->layer, rec->rank, rtn, loss,
                  rtn > 0 ? 100.0 * (loss - rtn) / rtn : 0.0, rec->seconds_calib + rec->seconds,
                  rec->peak_rss / 1048576.0, alphas[0] ? alphas : "-");
    }
    double predicted = 0;
    for (int r = 0; r < rep->size; r++) {
        peak = rep->peak_rss[r] > peak ? rep->peak_rss[r] : peak;
        if (rep->predicted_rss && rep->predicted_rss[r] > predicted)
            predicted = rep->predicted_rss[r];
    }
    char pred[64] = "";
    if (predicted > 0)
        snprintf(pred, sizeof(pred), " (--dry-run predicted %.0f MB, %+.0f%%)", predicted / 1048576.0,
                 100.0 * (predicted - peak) / peak);
    mxq_print(ctx, "total  %-5s %12.4e %12.4e %+7.1f%%  quantize %.2f s, peak rss %.0f MB/rank%s\n", "", tot_rtn,
              tot_loss, tot_rtn > 0 ? 100.0 * (tot_loss - tot_rtn) / tot_rtn : 0.0, quant_seconds, peak / 1048576.0,
              pred);
}

mxq_status mxq_quantize_report_build(mxq_ctx *ctx, mxq_quantize_report *rep, const mxq_recipe *recipe,
                                     const mxq_model_config *cfg, const char *model_dir, const char *calib_path,
                                     const char *recipe_path, const double *seconds)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    CALL(ctx, unpack_all(ctx, rep, cfg->n_layers));
    CHECK(ctx, rep->n_records == cfg->n_layers, MXQ_ERR_INTERNAL, "%d layer reports gathered for %d layers",
          rep->n_records, cfg->n_layers);
    mxq_path_join(path, model_dir, "config.json");
    CALL(ctx, mxq_json_read(ctx, path, "model config", &rep->config));
    int ok = 1;
    mxq_json_put(rep->config, "quantization_config", quantization_config(recipe, calib_path, &ok), &ok);
    rep->report = report_json(rep, model_dir, calib_path, recipe_path, seconds, &ok);
    CHECK(ctx, ok, MXQ_ERR_NOMEM, "out of memory building config.json and the report");
    print_summary(ctx, rep, seconds[0]);
fail:
    return status;
}

mxq_status mxq_quantize_report_stage(mxq_ctx *ctx, mxq_quantize_report *rep, const char *out_dir,
                                     const mxq_input_set *inputs)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    mxq_path_join(path, out_dir, "mxq_report.json");
    CALL(ctx, mxq_json_write_temp(ctx, rep->report, path, inputs, &rep->report_out));
    mxq_path_join(path, out_dir, "config.json");
    CALL(ctx, mxq_json_write_temp(ctx, rep->config, path, inputs, &rep->config_out));
    CALL(ctx, mxq_ckpt_index_write(ctx, out_dir, rep->weight_map, rep->total_bytes, "mxq", rep->shards, inputs,
                                   &rep->index));
fail:
    return status;
}

void mxq_quantize_report_abort(mxq_quantize_report *rep)
{
    mxq_output_abort(&rep->report_out);
    mxq_output_abort(&rep->config_out);
    mxq_output_abort(&rep->index);
}

mxq_status mxq_quantize_report_commit(mxq_ctx *ctx, mxq_quantize_report *rep)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_output_commit(ctx, &rep->report_out));
    CALL(ctx, mxq_output_commit(ctx, &rep->config_out));
fail:
    return status;
}

void mxq_quantize_report_free(mxq_quantize_report *rep)
{
    mxq_quantize_report_abort(rep);
    free(rep->gathered);
    free(rep->lens);
    free(rep->records);
    free(rep->peak_rss);
    free(rep->predicted_rss);
    json_decref(rep->weight_map);
    json_decref(rep->shards);
    json_decref(rep->config);
    json_decref(rep->report);
    memset(rep, 0, sizeof(*rep));
}

/* ---- --dry-run and the memory plan ----------------------------------------- */

/* GPTQ of an [m, n] linear on a grid of P ranks with batches of nb
 * columns, on its heaviest rank (rank 0 holds the most block rows; as root
 * it also stages what it sends): its block rows of the factor (double),
 * of W', the error feedback and the copy on its way (float32), the
 * Hessian's rows on their way, and one batch. */
static double grid_gptq_bytes(double m, double n, int nb, int P)
{
    const double rows = ceil(n / nb / P) * nb;
    return rows * n * sizeof(double) + 3.0 * rows * m * sizeof(float) + 2.0 * nb * n * sizeof(double) +
           (3.0 * m * nb + (double)nb * nb) * sizeof(float);
}

/* Whether the plan's group runs linear li's GPTQ on the grid (as
 * calibrate_group.c decides it). */
static int plan_on_grid(const mxq_plan_input *in, int n)
{
    const mxq_gptq_options *o = mxq_recipe_gptq(in->recipe);
    return in->data_parallel && in->size > 1 && o && in->grid_min_inputs > 0 && n >= in->grid_min_inputs &&
           mxq_gptq_grid_applies(&in->recipe->weights, o, (size_t)n, in->size);
}

/* Bytes the quantization of the largest linear adds: in float32, the
 * layer's reference copy and GPTQ's weights and error feedback (3 m n) and
 * Cholesky factor (n^2 doubles; on a grid, its share: grid_gptq_bytes), or
 * AWQ's float32 H and scratch (n^2 + 2 x 64 MB), or the report's loss (a
 * round-to-nearest copy m n + float32 H n^2). `owner`: whether this rank
 * quantizes layers (the others only take part in the grid's GPTQ). */
static double quantize_bytes(const mxq_plan_input *in, int owner)
{
    double quant = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in_f;
        mxq_linear_shape(in->cfg, (mxq_linear_id)li, &out, &in_f);
        const double mn = (double)out * in_f * sizeof(float), nn = (double)in_f * in_f * sizeof(float);
        /* AWQ: about 128 sampled rows per alpha, up to 8 alphas within 64 MB */
        const double rows = out < 256 ? out : 128.0, per_alpha = rows * in_f * sizeof(float);
        const double alphas = per_alpha * 8 <= 64.0 * 1048576.0 ? 8 : fmax(1.0, floor(64.0 * 1048576.0 / per_alpha));
        double gptq = plan_on_grid(in, in_f) ? mn + grid_gptq_bytes(out, in_f, mxq_gptq_batch_width(
                                                                               &in->recipe->weights,
                                                                               mxq_recipe_gptq(in->recipe)),
                                                                  in->size)
                                             : 3.0 * mn + 2.0 * nn;
        double awq = nn + (2.0 * alphas + 3.0) * per_alpha, report = mn + nn;
        double b = !owner ? (plan_on_grid(in, in_f) ? gptq - mn : 0) : fmax(gptq, fmax(awq, report));
        quant = b > quant ? b : quant;
    }
    return quant;
}

/* The packed elements and scales of one quantized layer (what the owner
 * keeps until its shard is written). */
static double packed_layer_bytes(const mxq_model_config *cfg, const mxq_recipe *recipe)
{
    double bytes = 0;
    for (int li = 0; recipe->has_weights && li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        bytes += (double)out * (double)(mxq_mx_packed_row_bytes(recipe->weights.format, (size_t)in) +
                                        mxq_mx_blocks_per_row((size_t)in, recipe->weights.block));
    }
    return bytes;
}

/* Layers rank r quantizes, hence holds results of until its shard is
 * written. */
static int owned_layers(const mxq_plan_input *in, int r)
{
    if (!in->data_parallel)
        return in->first[r + 1] - in->first[r];
    return in->cfg->n_layers / in->size + (r < in->cfg->n_layers % in->size);
}

/* A pipeline rank: its layers in float32 for the whole run, the statistics
 * of the layers a pass calibrates (fp) or of one layer and the whole
 * calibration set's activations (sequential, with its layers converted one
 * at a time, the BF16 pages of the current one mapped too, and the
 * embedding given back once the set is embedded). */
static void plan_pipeline(const mxq_plan_input *in, int r, mxq_rank_plan *plan)
{
    const mxq_model_config *cfg = in->cfg;
    const double layer = (double)mxq_config_layer_params(cfg) * sizeof(float);
    const double emb = (double)mxq_config_embedding_params(cfg) * sizeof(float), stats = (double)mxq_layer_stats_bytes(cfg);
    const double d = cfg->hidden, store = (double)in->samples * in->seq_len * d * sizeof(float);
    const int n = owned_layers(in, r), held = in->stats_layers > 0 && in->stats_layers < n ? in->stats_layers : n;
    const int fp = in->recipe->calib_mode == MXQ_CALIB_FP;
    plan->quant = n > 0 ? quantize_bytes(in, 1) : 0;
    plan->weights = (fp ? n * layer + (r == 0 ? emb : 0) : (n > 0) * 1.5 * layer) + n * packed_layer_bytes(cfg, in->recipe);
    plan->stats = fp ? held * stats : stats + store;
    plan->work += 2.0 * in->batch * in->seq_len * d * sizeof(float); /* the pipeline's buffers */
    /* while loading, the checkpoint's pages of this rank's tensors are mapped
     * too (BF16: half the float32 size) */
    plan->load = fp ? 1.5 * (n * layer + (r == 0 ? emb : 0)) : (r == 0 ? 1.5 * emb : 0) + store;
    plan->total = plan->weights + plan->stats + plan->work + plan->quant + plan->base;
}

/* The terms both group plans share: rank r's share of the activations,
 * the packed results of the layers it writes, and MPI_Reduce's staging of
 * up to two segments of at most 128 MB (src/parallel/reduce_stats.c). */
typedef struct {
    double layer, emb, stats, store, results, staging;
} group_terms;

static void group_terms_of(const mxq_plan_input *in, int r, group_terms *t)
{
    const mxq_model_config *cfg = in->cfg;
    const int share = (int)((long long)in->samples * (r + 1) / in->size - (long long)in->samples * r / in->size);
    const double down_in = (double)cfg->intermediate * cfg->intermediate * sizeof(double);
    t->layer = (double)mxq_config_layer_params(cfg) * sizeof(float);
    t->emb = (double)mxq_config_embedding_params(cfg) * sizeof(float);
    t->stats = (double)mxq_layer_stats_bytes(cfg);
    t->store = (double)share * in->seq_len * cfg->hidden * sizeof(float);
    t->results = owned_layers(in, r) * packed_layer_bytes(cfg, in->recipe);
    t->staging = 2.0 * fmin(128.0 * 1048576.0, fmax(down_in, (double)cfg->hidden * cfg->hidden * sizeof(double)));
}

/* A rank of the data-parallel group, besides its share of the activations
 * and the packed results of all its layers (at the end): while a layer
 * runs, two layers in float32 (the one it waits to quantize, the one
 * running), the checkpoint pages of one (BF16) and two layers' statistics
 * (one and one on the last rank of a round, whose layer never waits);
 * while it quantizes, one layer and its statistics and the quantization's
 * buffers. First the embedding, only while its share is embedded. */
static void plan_group(const mxq_plan_input *in, int r, mxq_rank_plan *plan)
{
    group_terms t;
    group_terms_of(in, r, &t);
    /* rank r's layer of a round waits while the next one runs, unless it is
     * the round's last: then a second set of statistics and a second layer */
    const int waits = r + 1 < in->size && r + 1 < in->cfg->n_layers;
    const double held = waits ? 2.0 : 1.0;
    plan->weights = (held + 0.5) * t.layer + t.results;
    plan->stats = held * t.stats + t.store;
    plan->quant = quantize_bytes(in, owned_layers(in, r) > 0);
    plan->work += t.staging;
    /* both sets of statistics stay allocated while the rank quantizes */
    const double running = (held + 0.5) * t.layer + held * t.stats, quantizing = t.layer + held * t.stats + plan->quant;
    plan->total = plan->base + t.results + t.store + plan->work + (running > quantizing ? running : quantizing);
    plan->load = 1.5 * t.emb + t.store;
}

/* A rank of the data-parallel group in sequential mode: its share of the
 * activations and a micro-batch copy, one layer in float32 (and the pages
 * of one while it converts), one set of statistics, the quantization of
 * the linears of the inputs it owns (ranks 0-3 may own one), and the packed
 * results of the layers it writes. */
static void plan_group_sequential(const mxq_plan_input *in, int r, mxq_rank_plan *plan)
{
    group_terms t;
    group_terms_of(in, r, &t);
    plan->weights = 1.5 * t.layer + t.results;
    plan->stats = t.stats + t.store;
    plan->quant = quantize_bytes(in, r < MXQ_INPUT_COUNT);
    plan->work += (double)in->batch * in->seq_len * in->cfg->hidden * sizeof(float) + t.staging;
    const double running = 1.5 * t.layer + t.stats, quantizing = t.layer + t.stats + plan->quant;
    plan->total = plan->base + t.results + t.store + plan->work + (running > quantizing ? running : quantizing);
    plan->load = 1.5 * t.emb + t.store;
}

/* Whether the plan's group spreads its statistics (as calibrate_group.c
 * decides it). */
static int plan_spread(const mxq_plan_input *in)
{
    return in->data_parallel && in->recipe->calib_mode == MXQ_CALIB_FP &&
           mxq_group_spread_applies(in->recipe, in->cfg, in->size, in->grid_min_inputs);
}

/* The quantization's largest buffers with spread statistics: GPTQ on the
 * grid (this rank's rows of W' and of the error feedback, on the owner the
 * block rows on their way, the Hessian's rows in transit, a batch), AWQ's
 * scratch and sampled rows, a loss request's rows (up to 8 alphas of 128
 * rows, broadcast to every rank) and its block row of H in float32. */
static double spread_quantize_bytes(const mxq_plan_input *in, int r, int owner, int nb)
{
    double most = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, n;
        mxq_linear_shape(in->cfg, (mxq_linear_id)li, &out, &n);
        const double rows = ceil((double)n / nb / in->size - (double)r / in->size) * nb, first = ceil((double)n / nb / in->size) * nb;
        const double grid = (2.0 * rows * out + (owner ? first * out : 0) + (double)nb * out + 3.0 * out * nb +
                             (double)nb * nb) * sizeof(float) + 2.0 * nb * n * sizeof(double);
        const double sampled = fmin(out, 128.0) * n * sizeof(float), alphas = fmin(8.0, fmax(1.0, floor(64.0 * 1048576.0 / sampled)));
        const double request = (2.0 * alphas * sampled) + (double)nb * n * sizeof(float);
        const double awq = owner ? request + (2.0 * alphas + 4.0) * sampled : request;
        const double b = fmax(grid, awq);
        most = b > most ? b : most;
    }
    return most;
}

/* The checkpoint pages (BF16) of the tensors rank r copies into its shard
 * while it writes: the embedding on rank 0, lm_head (untied) and the final
 * norm on the last rank. */
static double copied_pages(const mxq_plan_input *in, int r)
{
    const double emb = (double)mxq_config_embedding_params(in->cfg) * 2.0;
    return (r == 0 ? emb : 0) + (r == in->size - 1 ? (in->cfg->tie_embeddings ? 0 : emb) + in->cfg->hidden * 2.0 : 0);
}

/* A rank of the group with spread statistics: its share of every layer's
 * Hessians for the whole run, one layer in float32 (while it converts,
 * its checkpoint pages too), the forward workspace and the exchange of
 * activations while the layer runs; then the quantization's buffers. The
 * layer's owner keeps the layer to quantize it, and its buffers come on top
 * of what the forward held: the process keeps freed memory for reuse
 * (mxq_keep_freed_memory), and measured, they did not fit in what the
 * forward had freed (llama-2-70b layer, 2 ranks: 11,076 MB at the end of
 * the owner's quantization against 9.5 GB in the forward); the others give
 * the layer back first, and theirs fit in it. Last the pages of the
 * tensors copied into the shard. */
static void plan_group_spread(const mxq_plan_input *in, int r, mxq_rank_plan *plan)
{
    group_terms t;
    group_terms_of(in, r, &t);
    const mxq_model_config *cfg = in->cfg;
    const int nb = mxq_gptq_batch_width(&in->recipe->weights, mxq_recipe_gptq(in->recipe));
    const int owner = owned_layers(in, r) > 0;
    double stats = 0;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++)
        stats += mxq_hsplit_bytes(mxq_input_features(cfg, (mxq_input_id)i), nb, in->size, r);
    plan->stats = stats + t.store;
    plan->weights = t.layer + t.results;
    plan->work = mxq_workspace_bytes(cfg, in->batch, in->seq_len) +
                 mxq_hsplit_work_bytes(mxq_layer_scales_max(cfg), nb, in->size, (size_t)in->batch * (size_t)in->seq_len);
    plan->quant = spread_quantize_bytes(in, r, owner, nb);
    const double running = fmax(1.5 * t.layer, t.layer + plan->work);
    const double held = owner ? running + plan->quant : fmax(running, plan->quant);
    plan->total = plan->base + t.results + t.store + stats + held + copied_pages(in, r);
    plan->load = 1.5 * t.emb + t.store;
}

void mxq_quantize_plan_rank(const mxq_plan_input *in, int r, mxq_rank_plan *plan)
{
    /* in double: a plan must print for any model, not wrap around */
    const mxq_model_config *cfg = in->cfg;
    memset(plan, 0, sizeof(*plan));
    plan->work = mxq_workspace_bytes(cfg, in->batch, in->seq_len) + 512.0 * cfg->intermediate * sizeof(float);
    plan->base = MXQ_PLAN_BASE_BYTES;
    if (!in->data_parallel)
        plan_pipeline(in, r, plan);
    else if (in->recipe->calib_mode == MXQ_CALIB_SEQUENTIAL)
        plan_group_sequential(in, r, plan);
    else if (plan_spread(in))
        plan_group_spread(in, r, plan);
    else
        plan_group(in, r, plan);
    if (plan->load + plan->base > plan->total)
        plan->total = plan->load + plan->base;
}

static void plan_layers_text(const mxq_plan_input *in, int r, char *text, size_t size)
{
    if (!in->data_parallel)
        snprintf(text, size, "[%d, %d)", in->first[r], in->first[r + 1]);
    else if (owned_layers(in, r) == 0) /* more ranks than layers: it only calibrates (and serves the grid) */
        snprintf(text, size, "none");
    else if (in->recipe->calib_mode == MXQ_CALIB_SEQUENTIAL) /* the linears of the inputs it owns */
        snprintf(text, size, in->size == 1 ? "all" : r < MXQ_INPUT_COUNT ? "part of every" : "none");
    else
        snprintf(text, size, "%d of every %d", r, in->size);
}

json_t *mxq_quantize_plan_json(const mxq_plan_input *in, double budget)
{
    int ok = 1;
    json_t *root = json_object(), *ranks = json_array();
    ok = root && ranks;
    for (int r = 0; ok && r < in->size; r++) {
        mxq_rank_plan p;
        mxq_quantize_plan_rank(in, r, &p);
        /* a pipeline rank is a group of its own, over its range; one
         * data-parallel group spans every layer */
        const int first = in->data_parallel ? 0 : in->first[r], end = in->data_parallel ? in->cfg->n_layers : in->first[r + 1];
        json_t *one = json_pack("{s:i, s:i, s:[i, i], s:I}", "rank", r, "group", in->data_parallel ? 0 : r, "layers",
                                first, end, "peak_bytes", (json_int_t)p.total);
        ok = one && json_array_append_new(ranks, one) == 0;
    }
    if (ok)
        mxq_json_put(root, MXQ_VERSION_MARK, json_string(MXQ_VERSION), &ok);
    if (ok)
        mxq_json_put(root, "layout", json_string(in->data_parallel ? "data-parallel group" : "pipeline"), &ok);
    if (ok)
        mxq_json_put(root, "mem_per_rank_bytes", json_integer((json_int_t)budget), &ok);
    if (ok)
        ok = json_object_set_new(root, "ranks", ranks) == 0;
    else
        json_decref(ranks);
    if (!ok) {
        json_decref(root);
        return NULL;
    }
    return root;
}

void mxq_quantize_print_plan(mxq_ctx *ctx, const mxq_plan_input *in, double budget)
{
    const double MB = 1048576.0, stats = (double)mxq_layer_stats_bytes(in->cfg);
    const int fp = in->recipe->calib_mode == MXQ_CALIB_FP, spread = plan_spread(in);
    mxq_print(ctx, "plan: %d layers over %d rank%s, %s; calibration %d x %d tokens, %s mode, micro-batch %d\n",
              in->cfg->n_layers, in->size, in->size == 1 ? "" : "s",
              !in->data_parallel ? "a pipeline of layer ranges (group size 1)"
              : spread ? "one data-parallel group, its statistics spread over the ranks and GPTQ on their grid"
              : fp     ? "one data-parallel group"
                       : "one data-parallel group, each layer's inputs spread over the ranks",
              in->samples,
              in->seq_len, fp ? "fp" : "sequential", in->batch);
    mxq_print(ctx, "%-6s %-14s %12s %12s %12s %12s %14s\n", "rank", "quantizes", "weights MB", "stats MB", "work MB",
              "quantize MB", "peak RSS MB");
    for (int r = 0; r < in->size; r++) {
        mxq_rank_plan p;
        char layers[40];
        mxq_quantize_plan_rank(in, r, &p);
        plan_layers_text(in, r, layers, sizeof(layers));
        mxq_print(ctx, "%-6d %-14s %12.1f %12.1f %12.1f %12.1f %14.1f\n", r, layers, p.weights / MB, p.stats / MB,
                  p.work / MB, p.quant / MB, p.total / MB);
    }
    mxq_print(ctx, "stats: Hessians (double) of the 4 linear inputs of a layer = %.1f MB per layer%s\n", stats / MB,
              spread ? "; a rank holds its block rows of one layer's (1/ranks of each) and its share of the "
                       "activations"
              : in->data_parallel && !fp ? "; a rank holds one layer's and its share of the activations"
              : in->data_parallel ? "; a rank holds two layers' (the last rank of a round: one) and its share of the activations"
              : fp ? (in->stats_layers > 0 ? ", held for --stats-layers layers at a time (one calibration pass per group)"
                                           : ", held for every owned layer until it is quantized (bound it with "
                                             "--stats-layers, or --group-size)")
                   : "; sequential mode also holds the calibration activations");
    if (!in->data_parallel)
        mxq_print(ctx, "peak RSS: weights (float32, and the packed results) + stats + work (forward workspace, buffers, "
                       "a Gram panel) + the largest linear's quantization + %.0f MB of libraries\n",
                  MXQ_PLAN_BASE_BYTES / MB);
    else if (spread)
        mxq_print(ctx, "peak RSS: the packed results, the share of activations, the share of the stats and %.0f MB "
                       "of libraries, plus a layer running (1 layer in float32, or its checkpoint pages while it "
                       "converts, the forward workspace and the exchange of activations) and, on a layer's owner on "
                       "top of that (the process keeps freed memory for reuse), its quantization (the GPTQ grid's "
                       "and AWQ's buffers); on the others the larger of the two; and the checkpoint pages of the "
                       "tensors copied into the shard (embedding, lm_head)\n",
                  MXQ_PLAN_BASE_BYTES / MB);
    else if (!fp)
        mxq_print(ctx, "peak RSS: the packed results of the layers it writes, the share of activations, work (forward "
                       "workspace, a micro-batch, a Gram panel, MPI_Reduce's staging) and %.0f MB of libraries, plus "
                       "the larger of a layer running (1.5 layers in float32, 1 layer's stats) and being quantized "
                       "(1 layer, its stats, the quantization of its inputs' linears)\n",
                  MXQ_PLAN_BASE_BYTES / MB);
    else
        mxq_print(ctx, "peak RSS: the packed results, the share of activations, work (forward workspace, a Gram panel, "
                       "MPI_Reduce's staging) "
                       "and %.0f MB of libraries, plus the larger of a layer running (2 layers in float32, the pages "
                       "of one, 2 layers' stats; 1 and 1 on a round's last rank) and a layer being quantized (1 layer, the stats held, the quantization)\n",
                  MXQ_PLAN_BASE_BYTES / MB);
    if (budget > 0)
        mxq_print(ctx, "memory: %.1f MB per rank on this node (its memory, or cgroup limit, over the ranks on it)\n",
                  budget / MB);
}
