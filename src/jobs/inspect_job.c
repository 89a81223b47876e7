/* mxq inspect: a checkpoint described for a person, from its config.json,
 * its tensors' headers, its index and the mxq_report.json of the run that
 * wrote it. Reads headers only, never the tensors' data. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "io/fsutil.h"
#include "mxq/jobs.h"
#include "mxq/model.h"
#include "mxq/safetensors.h"

typedef struct {
    uint64_t packed_bytes, scale_bytes; /* quantized linears: elements, E8M0 scales */
    uint64_t dtype_bytes[MXQ_DT_COUNT]; /* every other tensor, by dtype */
    size_t dtype_count[MXQ_DT_COUNT];
    size_t quantized;                   /* linears stored as weight_packed */
    double quantized_weights;           /* their elements (out x in each) */
    uint64_t shard_bytes;               /* the shard files on disk */
    int shards;
} tensor_tally;

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* out x in of the linear a "<...>.<linear>.weight_packed" tensor holds, or
 * 0 if the name is no linear the config knows. */
static double packed_weights(const mxq_model_config *cfg, const char *name)
{
    for (int l = 0; l < MXQ_LIN_COUNT; l++) {
        char suffix[64];
        snprintf(suffix, sizeof(suffix), ".%s.weight_packed", mxq_linear_name((mxq_linear_id)l));
        if (ends_with(name, suffix)) {
            int out, in;
            mxq_linear_shape(cfg, (mxq_linear_id)l, &out, &in);
            return (double)out * in;
        }
    }
    return 0;
}

static mxq_status tally_tensors(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, tensor_tally *t)
{
    mxq_status status = MXQ_OK;
    mxq_checkpoint *ckpt = NULL;
    const char **names = NULL;
    size_t count = 0;
    memset(t, 0, sizeof(*t));
    CALL(ctx, mxq_checkpoint_open(ctx, dir, &ckpt));
    CALL(ctx, mxq_checkpoint_names(ctx, ckpt, &names, &count));
    for (size_t i = 0; i < count; i++) {
        const mxq_tensor_view *v = NULL;
        CALL(ctx, mxq_checkpoint_get(ctx, ckpt, names[i], &v));
        if (ends_with(names[i], ".weight_packed")) {
            t->packed_bytes += v->nbytes;
            t->quantized++;
            t->quantized_weights += packed_weights(cfg, names[i]);
        } else if (ends_with(names[i], ".weight_scale")) {
            t->scale_bytes += v->nbytes;
        } else {
            t->dtype_bytes[v->dtype] += v->nbytes;
            t->dtype_count[v->dtype]++;
        }
    }
fail:
    free(names);
    mxq_checkpoint_close(ckpt);
    return status;
}

/* The shard files' sizes: those the index names, or model.safetensors. */
static void tally_files(const char *dir, json_t *index, tensor_tally *t)
{
    char path[MXQ_PATH_BUF];
    struct stat st;
    json_t *map = json_object_get(index, "weight_map"), *seen = json_object();
    const char *key;
    json_t *value;
    json_object_foreach(map, key, value)
    {
        const char *file = json_string_value(value);
        if (!file || json_object_get(seen, file))
            continue;
        json_object_set_new(seen, file, json_true());
        mxq_path_join(path, dir, file);
        if (stat(path, &st) == 0)
            t->shard_bytes += (uint64_t)st.st_size, t->shards++;
    }
    json_decref(seen);
    mxq_path_join(path, dir, "model.safetensors");
    if (!map && stat(path, &st) == 0)
        t->shard_bytes = (uint64_t)st.st_size, t->shards = 1;
}

/* Parameters of the model as the config gives them (linear biases aside). */
static double model_params(const mxq_model_config *cfg)
{
    double embed = (double)mxq_config_embedding_params(cfg);
    return embed * (cfg->tie_embeddings ? 1 : 2) + (double)cfg->n_layers * (double)mxq_config_layer_params(cfg) +
           cfg->hidden;
}

/* 6.74B, 260K, ... into buf */
static const char *human_count(double n, char *buf, size_t size)
{
    if (n >= 1e9)
        snprintf(buf, size, "%.2fB", n / 1e9);
    else if (n >= 1e6)
        snprintf(buf, size, "%.2fM", n / 1e6);
    else if (n >= 1e3)
        snprintf(buf, size, "%.0fK", n / 1e3);
    else
        snprintf(buf, size, "%.0f", n);
    return buf;
}

static void print_model(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, json_t *report)
{
    const char *source = json_string_value(json_object_get(report, "model"));
    char params[32];
    mxq_print(ctx, "checkpoint   %s\n", dir);
    mxq_print(ctx, "model        %s, %d layers, hidden %d, FFN %d, %d heads (%d KV), vocab %d, %s parameters%s%s\n",
              cfg->model_type[0] ? cfg->model_type : mxq_arch_name(cfg->arch), cfg->n_layers, cfg->hidden,
              cfg->intermediate, cfg->n_heads, cfg->n_kv_heads, cfg->vocab,
              human_count(model_params(cfg), params, sizeof(params)),
              source ? ", quantized from " : "", source ? source : "");
}

/* "key value, key value" of a JSON object of scalars, into buf. */
static void params_text(json_t *obj, char *buf, size_t size)
{
    const char *key;
    json_t *value;
    size_t used = 0;
    buf[0] = '\0';
    json_object_foreach(obj, key, value)
    {
        char v[64];
        if (json_is_string(value))
            snprintf(v, sizeof(v), "%s", json_string_value(value));
        else if (json_is_integer(value))
            snprintf(v, sizeof(v), "%lld", (long long)json_integer_value(value));
        else if (json_is_real(value))
            snprintf(v, sizeof(v), "%g", json_real_value(value));
        else
            snprintf(v, sizeof(v), "%s", json_is_true(value) ? "true" : json_is_false(value) ? "false" : "null");
        if (used < size)
            used += (size_t)snprintf(buf + used, size - used, "%s%s %s", used ? ", " : "", key, v);
    }
}

static void print_spec(mxq_ctx *ctx, const char *label, int present, const mxq_mx_spec *spec, const char *note)
{
    if (!present)
        mxq_print(ctx, "  %-12s none\n", label);
    else
        mxq_print(ctx, "  %-12s %s, MX block %d, rounding %s%s\n", label, spec->format->name, spec->block,
                  mxq_rounding_name(spec->rounding), note);
}

/* The parts of quantization_config the config reader leaves alone, checked
 * here before they are printed. */
static mxq_status check_recipe_record(mxq_ctx *ctx, const char *path, json_t *quant)
{
    mxq_status status = MXQ_OK;
    json_t *algos = json_object_get(quant, "algorithms"), *calib = json_object_get(quant, "calibration"), *step;
    size_t i;
    CHECK(ctx, !algos || json_is_array(algos), MXQ_ERR_FORMAT, "%s: quantization_config.algorithms must be a list", path);
    json_array_foreach(algos, i, step)
    {
        const char *name;
        json_t *params;
        CHECK(ctx, json_is_object(step), MXQ_ERR_FORMAT, "%s: quantization_config.algorithms[%zu] must be an object",
              path, i);
        json_object_foreach(step, name, params)
            CHECK(ctx, json_is_object(params), MXQ_ERR_FORMAT,
                  "%s: quantization_config.algorithms[%zu].%s must be an object", path, i, name);
    }
    CHECK(ctx,
          !calib || (json_is_object(calib) && json_is_integer(json_object_get(calib, "samples")) &&
                     json_is_string(json_object_get(calib, "mode")) && json_is_string(json_object_get(calib, "file"))),
          MXQ_ERR_FORMAT, "%s: quantization_config.calibration must be {samples: integer, mode: string, file: string}",
          path);
    CHECK(ctx, !json_object_get(quant, "exclude") || json_is_array(json_object_get(quant, "exclude")), MXQ_ERR_FORMAT,
          "%s: quantization_config.exclude must be a list", path);
fail:
    return status;
}

static void print_recipe(mxq_ctx *ctx, const mxq_model_config *cfg, json_t *quant, json_t *report)
{
    const char *recipe = json_string_value(json_object_get(report, "recipe"));
    mxq_print(ctx, "recipe       %s\n", recipe ? recipe : "(its file is not recorded: no mxq_report.json, or no 'recipe' in it)");
    print_spec(ctx, "weights", cfg->mx_weights, &cfg->mx_weight_spec, "");
    print_spec(ctx, "activations", cfg->mx_acts, &cfg->mx_act_spec, " (applied to every linear's input at run time)");
    size_t i;
    json_t *step;
    json_array_foreach(json_object_get(quant, "algorithms"), i, step)
    {
        const char *name;
        json_t *params;
        json_object_foreach(step, name, params)
        {
            char text[512];
            params_text(params, text, sizeof(text));
            mxq_print(ctx, "  %-12s %s (%s)\n", i == 0 ? "algorithms" : "", name, text);
        }
    }
    if (json_array_size(json_object_get(quant, "algorithms")) == 0)
        mxq_print(ctx, "  %-12s none (round to nearest)\n", "algorithms");
    json_t *calib = json_object_get(quant, "calibration");
    if (calib)
        mxq_print(ctx, "  %-12s %lld sequences, %s mode, %s\n", "calibration",
                  (long long)json_integer_value(json_object_get(calib, "samples")),
                  json_string_value(json_object_get(calib, "mode")), json_string_value(json_object_get(calib, "file")));
    json_t *exclude = json_object_get(quant, "exclude"), *pattern;
    mxq_print(ctx, "  %-12s", "exclude");
    json_array_foreach(exclude, i, pattern)
        mxq_print(ctx, " %s", json_is_string(pattern) ? json_string_value(pattern) : "?");
    mxq_print(ctx, "%s\n", json_array_size(exclude) ? "" : " nothing");
}

/* Bytes of the FP weights the run read (report.inputs.input_bytes). */
static double source_weight_bytes(json_t *report)
{
    json_t *files = json_object_get(json_object_get(report, "inputs"), "input_bytes");
    const char *path;
    json_t *entry;
    double bytes = 0;
    json_object_foreach(files, path, entry)
    {
        /* the weights a model loads: model.safetensors or its shards
         * model-0000k-of-0000N.safetensors, not other files beside them
         * (Mistral repositories carry a consolidated.safetensors too) */
        const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
        if (strcmp(base, "model.safetensors") != 0 &&
            !(strncmp(base, "model-", 6) == 0 && strstr(base, "-of-") && ends_with(base, ".safetensors")))
            continue;
        json_t *b = json_is_object(entry) ? json_object_get(entry, "bytes") : entry;
        bytes += json_number_value(b);
    }
    return bytes;
}

static void print_storage(mxq_ctx *ctx, const mxq_model_config *cfg, const tensor_tally *t, json_t *report)
{
    const double mb = 1e6, fp_bytes = source_weight_bytes(report), fp16 = 2 * model_params(cfg);
    const double disk = (double)t->shard_bytes;
    mxq_print(ctx, "storage      %d shard%s, %.2f MB on disk", t->shards, t->shards == 1 ? "" : "s", disk / mb);
    if (fp_bytes > 0)
        mxq_print(ctx, ": %.3fx the FP model it came from (%.2f MB)", disk / fp_bytes, fp_bytes / mb);
    mxq_print(ctx, "%s %.3fx FP16 (%.2f MB)\n", fp_bytes > 0 ? " and" : ":", disk / fp16, fp16 / mb);
    if (t->quantized && t->quantized_weights > 0) {
        const double weights = t->quantized_weights, bits = 8.0 * (double)(t->packed_bytes + t->scale_bytes) / weights;
        const mxq_mx_spec *w = &cfg->mx_weight_spec;
        char count[32];
        mxq_print(ctx, "  %-12s %zu quantized, %.2f MB for %s weights: %.3f bits per weight", "linears",
                  t->quantized, (double)(t->packed_bytes + t->scale_bytes) / mb,
                  human_count(weights, count, sizeof(count)), bits);
        if (w->format)
            mxq_print(ctx, " (%s: %d-bit elements + an 8-bit scale per %d = %.3f; rows are padded to whole blocks)",
                      w->format->name, w->format->storage_bits, w->block,
                      w->format->storage_bits + 8.0 / w->block);
        mxq_print(ctx, "\n");
    }
    for (int d = 0; d < MXQ_DT_COUNT; d++)
        if (t->dtype_count[d])
            mxq_print(ctx, "  %-12s %zu %s tensor%s, %.2f MB\n", d == 0 ? "other" : "", t->dtype_count[d],
                      mxq_dtype_name((mxq_dtype)d), t->dtype_count[d] == 1 ? "" : "s", (double)t->dtype_bytes[d] / mb);
}

static double max_of(json_t *array)
{
    size_t i;
    json_t *v;
    double m = 0;
    json_array_foreach(array, i, v) m = fmax(m, json_number_value(v));
    return m;
}

static int numbers_only(json_t *array)
{
    size_t i;
    json_t *v;
    json_array_foreach(array, i, v) if (!json_is_number(v)) return 0;
    return json_is_array(array);
}

/* One layer of the report: what print_layers reads. */
static mxq_status check_report_layer(mxq_ctx *ctx, const char *path, size_t i, json_t *layer, int n_layers,
                                     json_int_t ranks)
{
    mxq_status status = MXQ_OK;
    const char *name;
    json_t *lin;
    CHECK(ctx,
          json_is_object(layer) && json_is_integer(json_object_get(layer, "layer")) &&
              json_is_integer(json_object_get(layer, "rank")) && json_is_number(json_object_get(layer, "seconds")) &&
              json_is_number(json_object_get(layer, "seconds_calib")) &&
              json_is_number(json_object_get(layer, "peak_rss_mb")) && json_is_object(json_object_get(layer, "linears")),
          MXQ_ERR_FORMAT,
          "%s: layers[%zu] must hold layer, rank (integers), seconds, seconds_calib, peak_rss_mb (numbers) and linears",
          path, i);
    const json_int_t l = json_integer_value(json_object_get(layer, "layer")),
                     rank = json_integer_value(json_object_get(layer, "rank"));
    CHECK(ctx, l >= 0 && l < n_layers && rank >= 0 && rank < ranks, MXQ_ERR_FORMAT,
          "%s: layers[%zu] is layer %lld on rank %lld; the model has %d layers and the run %lld ranks", path, i,
          (long long)l, (long long)rank, n_layers, (long long)ranks);
    json_object_foreach(json_object_get(layer, "linears"), name, lin)
        CHECK(ctx, json_number_value(json_object_get(lin, "loss_rtn")) >= 0 && json_number_value(json_object_get(lin, "loss")) >= 0,
              MXQ_ERR_FORMAT, "%s: layers[%zu].linears.%s must hold loss_rtn and loss (numbers, not negative)", path, i,
              name);
fail:
    return status;
}

/* Every field of mxq_report.json that inspect prints, checked first: a
 * damaged report is named, never printed as zeros. */
static mxq_status check_report(mxq_ctx *ctx, const char *path, json_t *report, int n_layers)
{
    mxq_status status = MXQ_OK;
    json_t *totals = json_object_get(report, "totals"), *layers = json_object_get(report, "layers"), *layer;
    const char *keys[] = {"seconds_total", "seconds_quantize", "seconds_write", "loss_rtn", "loss"};
    size_t i;
    CHECK(ctx, json_is_object(report), MXQ_ERR_FORMAT, "%s: not a JSON object", path);
    const json_int_t ranks = json_integer_value(json_object_get(report, "ranks"));
    CHECK(ctx, json_is_integer(json_object_get(report, "ranks")) && json_is_integer(json_object_get(report, "group_size")) &&
                   ranks >= 1,
          MXQ_ERR_FORMAT, "%s: 'ranks' (1 or more) and 'group_size' must be integers", path);
    CHECK(ctx, json_is_object(totals), MXQ_ERR_FORMAT, "%s: 'totals' must be an object", path);
    for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        CHECK(ctx, json_is_number(json_object_get(totals, keys[i])), MXQ_ERR_FORMAT, "%s: totals.%s must be a number",
              path, keys[i]);
    CHECK(ctx, numbers_only(json_object_get(report, "peak_rss_mb_per_rank")), MXQ_ERR_FORMAT,
          "%s: 'peak_rss_mb_per_rank' must be a list of numbers", path);
    json_t *predicted = json_object_get(report, "predicted_peak_rss_mb_per_rank");
    CHECK(ctx, !predicted || numbers_only(predicted), MXQ_ERR_FORMAT,
          "%s: 'predicted_peak_rss_mb_per_rank' must be a list of numbers", path);
    CHECK(ctx, json_is_array(layers) && json_array_size(layers) <= (size_t)n_layers, MXQ_ERR_FORMAT,
          "%s: 'layers' must be a list of at most the model's %d layers", path, n_layers);
    json_array_foreach(layers, i, layer) CALL(ctx, check_report_layer(ctx, path, i, layer, n_layers, ranks));
fail:
    return status;
}

static void print_run(mxq_ctx *ctx, json_t *report)
{
    json_t *totals = json_object_get(report, "totals"), *inputs = json_object_get(report, "inputs");
    const char *version = json_string_value(json_object_get(inputs, "mxq"));
    const long long ranks = json_integer_value(json_object_get(report, "ranks"));
    mxq_print(ctx, "run          mxq %s, %lld rank%s, group size %lld; %.1f s in all (quantize %.1f s, write %.1f s)\n",
              version ? version : "(version not recorded)", ranks, ranks == 1 ? "" : "s",
              (long long)json_integer_value(json_object_get(report, "group_size")),
              json_number_value(json_object_get(totals, "seconds_total")),
              json_number_value(json_object_get(totals, "seconds_quantize")),
              json_number_value(json_object_get(totals, "seconds_write")));
    mxq_print(ctx, "  %-12s peak RSS %.0f MB on the busiest rank", "memory",
              max_of(json_object_get(report, "peak_rss_mb_per_rank")));
    json_t *predicted = json_object_get(report, "predicted_peak_rss_mb_per_rank");
    if (json_array_size(predicted))
        mxq_print(ctx, " (--dry-run predicted %.0f MB)", max_of(predicted));
    mxq_print(ctx, "\n");
}

/* One line per layer: the losses summed over its linears (GPTQ's objective,
 * ||W X - Q X||^2 on the calibration inputs) before and after the
 * algorithms, and where and how long it ran. */
static void print_layers(mxq_ctx *ctx, json_t *report)
{
    json_t *layers = json_object_get(report, "layers"), *layer, *totals = json_object_get(report, "totals");
    size_t i;
    mxq_print(ctx, "\nlayer  rank      loss rtn         loss   change  seconds   rss MB  worst linear (loss / rtn)\n");
    json_array_foreach(layers, i, layer)
    {
        const char *name, *worst = NULL;
        json_t *lin;
        double worst_ratio = 0, rtn = 0, loss = 0;
        json_object_foreach(json_object_get(layer, "linears"), name, lin)
        {
            double r = json_number_value(json_object_get(lin, "loss_rtn")), q = json_number_value(json_object_get(lin, "loss"));
            rtn += r, loss += q;
            if (r > 0 && (!worst || q / r > worst_ratio))
                worst_ratio = q / r, worst = name;
        }
        char worst_text[96] = "-";
        if (worst)
            snprintf(worst_text, sizeof(worst_text), "%s (%.2f)", worst, worst_ratio);
        mxq_print(ctx, "%-6lld %-5lld %12.4e %12.4e %+7.1f%% %8.2f %8.0f  %s\n",
                  (long long)json_integer_value(json_object_get(layer, "layer")),
                  (long long)json_integer_value(json_object_get(layer, "rank")), rtn, loss,
                  rtn > 0 ? 100.0 * (loss - rtn) / rtn : 0.0,
                  json_number_value(json_object_get(layer, "seconds_calib")) +
                      json_number_value(json_object_get(layer, "seconds")),
                  json_number_value(json_object_get(layer, "peak_rss_mb")), worst_text);
    }
    const double rtn = json_number_value(json_object_get(totals, "loss_rtn")),
                 loss = json_number_value(json_object_get(totals, "loss"));
    mxq_print(ctx, "total        %12.4e %12.4e %+7.1f%%\n", rtn, loss, rtn > 0 ? 100.0 * (loss - rtn) / rtn : 0.0);
    const char *rows = json_string_value(json_object_get(report, "loss_rows"));
    if (rows)
        mxq_print(ctx, "(%s)\n", rows);
}

/* json at dir/name, or NULL if the file does not exist; other failures
 * (unreadable, not JSON) are errors. */
static mxq_status read_optional_json(mxq_ctx *ctx, const char *dir, const char *name, const char *what, json_t **out)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    mxq_path_join(path, dir, name);
    struct stat st;
    *out = NULL;
    if (lstat(path, &st) != 0 && errno == ENOENT)
        return MXQ_OK; /* absent; a dangling link is read, and its error named */
    CALL(ctx, mxq_json_read(ctx, path, what, out));
fail:
    return status;
}

mxq_status mxq_inspect(mxq_ctx *ctx, const char *dir)
{
    mxq_status status = MXQ_OK;
    json_t *config = NULL, *report = NULL, *index = NULL;
    mxq_model_config cfg;
    tensor_tally tally;
    char path[MXQ_PATH_BUF];
    CHECK(ctx, dir[0] != '\0', MXQ_ERR_ARG, "the checkpoint directory is an empty string");
    CALL(ctx, mxq_config_load(ctx, dir, &cfg));
    mxq_path_join(path, dir, "config.json");
    CALL(ctx, mxq_json_read(ctx, path, "model config", &config));
    CALL(ctx, read_optional_json(ctx, dir, "mxq_report.json", "run report", &report));
    mxq_path_join(path, dir, "mxq_report.json");
    if (report)
        CALL(ctx, check_report(ctx, path, report, cfg.n_layers));
    json_t *quant = json_object_get(config, "quantization_config");
    mxq_path_join(path, dir, "config.json");
    if (json_is_object(quant))
        CALL(ctx, check_recipe_record(ctx, path, quant));
    CALL(ctx, read_optional_json(ctx, dir, "model.safetensors.index.json", "checkpoint index", &index));
    CALL(ctx, tally_tensors(ctx, dir, &cfg, &tally));
    tally_files(dir, index, &tally);
    print_model(ctx, dir, &cfg, report);
    if (json_is_object(quant))
        print_recipe(ctx, &cfg, quant, report);
    else
        mxq_print(ctx, "recipe       none: not a checkpoint mxq wrote (no quantization_config in config.json)\n");
    print_storage(ctx, &cfg, &tally, report);
    if (report) {
        print_run(ctx, report);
        print_layers(ctx, report);
    } else if (json_is_object(quant)) {
        mxq_print(ctx, "run          no mxq_report.json: the run's ranks, times and losses are unknown\n");
    }
fail:
    json_decref(config);
    json_decref(report);
    json_decref(index);
    return status;
}
