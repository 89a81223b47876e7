/* mxq quantize: the whole job. Load this rank's layers, calibrate and
 * quantize them (calibrate.c), write this rank's shard, and on rank 0 the
 * index, config.json (with quantization_config) and the JSON report.
 *
 * Nothing looks complete before it is: shards are written as
 * <name>.incomplete, renamed only when every rank has written its own, and
 * model.safetensors.index.json, without which the directory is no
 * checkpoint, is renamed into place last. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "mxq/dist.h"
#include "mxq/fsutil.h"
#include "mxq/quantize.h"
#include "mxq/safetensors.h"
#include "mxq/tokens.h"

#define REPORT_NAME "mxq_report.json"

/* Per layer, gathered on rank 0: layer, rank, seconds_calib, seconds,
 * peak_rss, awq alpha x4, smooth alpha x4, then per linear quantized,
 * loss_rtn, loss, dead_channels, seconds. */
enum { REC_HEAD = 13, REC_LIN = 5, REC_SIZE = REC_HEAD + REC_LIN * MXQ_LIN_COUNT };

static void pack_record(const mxq_layer_result *r, int rank, double *rec)
{
    rec[0] = r->layer;
    rec[1] = rank;
    rec[2] = r->seconds_calib;
    rec[3] = r->seconds;
    rec[4] = (double)r->peak_rss;
    for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
        rec[5 + i] = r->awq_alpha[i];
        rec[9 + i] = r->smooth_alpha[i];
    }
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        double *x = rec + REC_HEAD + REC_LIN * li;
        x[0] = r->linear[li].quantized;
        x[1] = r->linear[li].loss_rtn;
        x[2] = r->linear[li].loss;
        x[3] = r->linear[li].dead_channels;
        x[4] = r->linear[li].seconds;
    }
}

static int owner_of_tensor(const char *name, const int *first, int size)
{
    int layer;
    if (sscanf(name, "model.layers.%d.", &layer) == 1) {
        for (int r = 0; r < size; r++)
            if (layer >= first[r] && layer < first[r + 1])
                return r;
        return -1;
    }
    if (strncmp(name, "model.embed_tokens.", 19) == 0)
        return 0;
    return size - 1; /* final norm, lm_head and anything else */
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

/* The list of tensors this rank writes, pointing into the model, the
 * results and the input checkpoint. Names are owned by `names_out`. */
typedef struct {
    mxq_tensor_write *t;
    char **names;
    size_t n, cap;
    size_t bytes;
} shard_list;

static mxq_status shard_add(mxq_ctx *ctx, shard_list *s, const char *name, mxq_dtype dtype, int rank,
                            const int64_t *shape, const void *data)
{
    mxq_status status = MXQ_OK;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        mxq_tensor_write *t = realloc(s->t, cap * sizeof(*t));
        CHECK_ALLOC(ctx, t, cap * sizeof(*t), "the shard's tensor list");
        s->t = t;
        char **names = realloc(s->names, cap * sizeof(char *));
        CHECK_ALLOC(ctx, names, cap * sizeof(char *), "the shard's tensor list");
        s->names = names;
        s->cap = cap;
    }
    s->names[s->n] = strdup(name);
    CHECK_ALLOC(ctx, s->names[s->n], strlen(name) + 1, "a tensor name");
    mxq_tensor_write *t = &s->t[s->n];
    memset(t, 0, sizeof(*t));
    t->name = s->names[s->n];
    t->dtype = dtype;
    t->rank = rank;
    size_t numel = 1;
    for (int i = 0; i < rank; i++) {
        t->shape[i] = shape[i];
        numel *= (size_t)shape[i];
    }
    t->data = data;
    s->bytes += numel * mxq_dtype_size(dtype);
    s->n++;
fail:
    return status;
}

static void shard_list_free(shard_list *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->names[i]);
    free(s->names);
    free(s->t);
    memset(s, 0, sizeof(*s));
}

/* Which model tensor (as float32) replaces an input tensor that an
 * algorithm changed; NULL if it is copied unchanged. */
static const float *modified_tensor(const mxq_model *m, const mxq_layer_result *results, int layer, const char *rest)
{
    const mxq_layer *L = &m->layers[layer - m->first_layer];
    const mxq_layer_result *r = &results[layer - m->first_layer];
    if (strcmp(rest, "input_layernorm.weight") == 0)
        return r->attn_norm_modified ? L->attn_norm : NULL;
    if (strcmp(rest, "post_attention_layernorm.weight") == 0)
        return r->ffn_norm_modified ? L->ffn_norm : NULL;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        size_t len = strlen(mxq_linear_name((mxq_linear_id)li));
        if (strncmp(rest, mxq_linear_name((mxq_linear_id)li), len) != 0)
            continue;
        if (strcmp(rest + len, ".weight") == 0 && r->linear[li].weight_modified)
            return L->weight[li];
        if (strcmp(rest + len, ".bias") == 0 && r->linear[li].bias_modified)
            return L->bias[li];
    }
    return NULL;
}

static mxq_status build_shard(mxq_ctx *ctx, mxq_checkpoint *ckpt, const mxq_model *m, const mxq_layer_result *results,
                              const mxq_recipe *recipe, const int *first, int rank, int size, shard_list *s)
{
    mxq_status status = MXQ_OK;
    const char **names = NULL;
    size_t count = 0;
    char buf[300];
    CALL(ctx, mxq_checkpoint_names(ctx, ckpt, &names, &count));
    qsort(names, count, sizeof(char *), cmp_str);
    for (size_t i = 0; i < count; i++) {
        const char *name = names[i];
        if (owner_of_tensor(name, first, size) != rank)
            continue;
        const mxq_tensor_view *v;
        CALL(ctx, mxq_checkpoint_get(ctx, ckpt, name, &v));
        int layer, consumed = 0;
        if (sscanf(name, "model.layers.%d.%n", &layer, &consumed) == 1 && consumed > 0) {
            const char *rest = name + consumed;
            int handled = 0;
            for (int li = 0; li < MXQ_LIN_COUNT && !handled; li++) {
                const mxq_linear_result *lr = &results[layer - m->first_layer].linear[li];
                snprintf(buf, sizeof(buf), "%s.weight", mxq_linear_name((mxq_linear_id)li));
                if (strcmp(rest, buf) != 0 || !lr->quantized)
                    continue;
                int out, in;
                mxq_linear_shape(&m->cfg, (mxq_linear_id)li, &out, &in);
                int64_t pshape[2] = {out, (int64_t)mxq_mx_packed_row_bytes(recipe->weights.format, (size_t)in)};
                int64_t sshape[2] = {out, (int64_t)mxq_mx_blocks_per_row((size_t)in, recipe->weights.block)};
                snprintf(buf, sizeof(buf), "model.layers.%d.%s.weight_packed", layer,
                         mxq_linear_name((mxq_linear_id)li));
                CALL(ctx, shard_add(ctx, s, buf, MXQ_DT_U8, 2, pshape, lr->packed));
                snprintf(buf, sizeof(buf), "model.layers.%d.%s.weight_scale", layer,
                         mxq_linear_name((mxq_linear_id)li));
                CALL(ctx, shard_add(ctx, s, buf, MXQ_DT_U8, 2, sshape, lr->scales));
                handled = 1;
            }
            if (handled)
                continue;
            const float *changed = modified_tensor(m, results, layer, rest);
            if (changed) {
                /* Folded scales: written in F32 so that the checkpoint holds
                 * exactly the values the quantized model was evaluated with. */
                CALL(ctx, shard_add(ctx, s, name, MXQ_DT_F32, v->rank, v->shape, changed));
                continue;
            }
        }
        CALL(ctx, shard_add(ctx, s, name, v->dtype, v->rank, v->shape, v->data));
    }
fail:
    free(names);
    return status;
}

static json_t *spec_json(const mxq_mx_spec *spec)
{
    return json_pack("{s:s, s:i, s:s}", "format", spec->format->name, "block", spec->block, "rounding",
                     mxq_rounding_name(spec->rounding));
}

static json_t *quantization_config(const mxq_recipe *recipe, const char *calib_path)
{
    json_t *q = json_object();
    json_object_set_new(q, "quant_method", json_string("mxq"));
    json_object_set_new(q, "format_version", json_integer(1));
    json_object_set_new(q, "weights", recipe->has_weights ? spec_json(&recipe->weights) : json_null());
    json_object_set_new(q, "activations", recipe->has_acts ? spec_json(&recipe->acts) : json_null());
    json_t *algos = json_array();
    for (int i = 0; i < recipe->n_steps; i++) {
        const mxq_algo_step *st = &recipe->steps[i];
        json_t *params;
        if (st->kind == MXQ_ALGO_SMOOTHQUANT)
            params = json_pack("{s:f}", "alpha", st->smoothquant.alpha);
        else if (st->kind == MXQ_ALGO_AWQ)
            params = json_pack("{s:i, s:b, s:i, s:f}", "grid", st->awq.grid, "clip", st->awq.clip, "clip_grid",
                               st->awq.clip_grid, "max_shrink", st->awq.max_shrink);
        else
            params = json_pack("{s:i, s:i, s:f, s:b}", "block", st->gptq.lazy_block, "microblock", st->gptq.microblock,
                               "damp", st->gptq.damp, "act_order", st->gptq.act_order);
        json_array_append_new(algos, json_pack("{s:o}", mxq_algo_name(st->kind), params));
    }
    json_object_set_new(q, "algorithms", algos);
    json_object_set_new(q, "calibration",
                        json_pack("{s:i, s:s, s:s}", "samples", recipe->calib_samples, "mode",
                                  recipe->calib_mode == MXQ_CALIB_FP ? "fp" : "sequential", "file", calib_path));
    json_t *ex = json_array();
    for (int i = 0; i < recipe->n_exclude; i++)
        json_array_append_new(ex, json_string(recipe->exclude[i]));
    json_object_set_new(q, "exclude", ex);
    json_object_set_new(q, "storage",
                        json_string("per quantized linear: <name>.weight_packed U8 [out, packed row bytes] with the "
                                    "elements packed along the row as mxq cast packs them, and <name>.weight_scale U8 "
                                    "E8M0 [out, ceil(in/block)]; other tensors as in the input checkpoint, except "
                                    "norms and biases changed by folded scales, which are F32"));
    return q;
}

/* Output directory: must be empty unless --force; with --force, mxq's own
 * outputs from an earlier run are removed first (the index first, so that a
 * half-removed directory never looks like a checkpoint). */
static mxq_status prepare_out_dir(mxq_ctx *ctx, const char *dir, int force)
{
    mxq_status status = MXQ_OK;
    DIR *d = NULL;
    struct stat st;
    char path[4200];
    if (stat(dir, &st) != 0) {
        CHECK(ctx, errno == ENOENT, MXQ_ERR_IO, "cannot use output directory '%s': %s", dir, strerror(errno));
        CHECK(ctx, mkdir(dir, 0777) == 0, MXQ_ERR_IO, "cannot create output directory '%s': %s", dir,
              strerror(errno));
        return MXQ_OK;
    }
    CHECK(ctx, S_ISDIR(st.st_mode), MXQ_ERR_IO, "output path '%s' exists and is not a directory", dir);
    d = opendir(dir);
    CHECK(ctx, d != NULL, MXQ_ERR_IO, "cannot read output directory '%s': %s", dir, strerror(errno));
    struct dirent *e;
    int entries = 0;
    char first_entry[256] = "";
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        if (!entries++)
            snprintf(first_entry, sizeof(first_entry), "%s", e->d_name);
    }
    closedir(d);
    d = NULL;
    CHECK(ctx, entries == 0 || force, MXQ_ERR_IO,
          "output directory '%s' is not empty (it holds '%s'%s); choose another or pass --force to replace mxq's "
          "files in it",
          dir, first_entry, entries > 1 ? " and more" : "");
    if (!entries)
        return MXQ_OK;
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    CHECK(ctx, unlink(path) == 0 || errno == ENOENT, MXQ_ERR_IO, "cannot remove '%s': %s", path, strerror(errno));
    d = opendir(dir);
    CHECK(ctx, d != NULL, MXQ_ERR_IO, "cannot read output directory '%s': %s", dir, strerror(errno));
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        size_t len = strlen(n);
        int ours = (strncmp(n, "model", 5) == 0 && len > 12 &&
                    (strcmp(n + len - 12, ".safetensors") == 0 || strstr(n, ".safetensors.incomplete"))) ||
                   strcmp(n, "config.json") == 0 || strcmp(n, REPORT_NAME) == 0;
        if (!ours)
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, n);
        CHECK(ctx, unlink(path) == 0, MXQ_ERR_IO, "cannot remove '%s': %s", path, strerror(errno));
    }
fail:
    if (d)
        closedir(d);
    return status;
}

/* Gather strings (one per rank) on rank 0, concatenated in rank order. */
static mxq_status gather_text(mxq_ctx *ctx, const mxq_dist *dist, const char *text, char **out)
{
    mxq_status status = MXQ_OK;
    int len = (int)strlen(text), *lens = NULL, *displs = NULL;
    char *all = NULL;
    *out = NULL;
    if (dist->rank == 0) {
        lens = calloc((size_t)dist->size, sizeof(int));
        displs = calloc((size_t)dist->size, sizeof(int));
        CHECK_ALLOC(ctx, lens && displs, (size_t)dist->size * 2 * sizeof(int), "gather counts");
    }
    CALL_MPI(ctx, MPI_Gather(&len, 1, MPI_INT, lens, 1, MPI_INT, 0, dist->comm));
    int total = 0;
    if (dist->rank == 0) {
        for (int r = 0; r < dist->size; r++) {
            displs[r] = total;
            total += lens[r];
        }
        all = malloc((size_t)total + 1);
        CHECK_ALLOC(ctx, all, (size_t)total + 1, "gathered text");
        all[total] = '\0';
    }
    CALL_MPI(ctx, MPI_Gatherv(text, len, MPI_CHAR, all, lens, displs, MPI_CHAR, 0, dist->comm));
    *out = all;
    all = NULL;
fail:
    free(all);
    free(lens);
    free(displs);
    return status;
}

static void print_plan(mxq_ctx *ctx, const mxq_model_config *cfg, const mxq_recipe *recipe, const int *first,
                       int size, int batch, int seq_len, int samples, int stats_layers)
{
    const double MB = 1048576.0;
    size_t layer_bytes = mxq_config_layer_params(cfg) * sizeof(float);
    size_t emb_bytes = mxq_config_embedding_params(cfg) * sizeof(float);
    size_t stats_bytes = mxq_layer_stats_bytes(cfg);
    size_t T = (size_t)batch * seq_len, d = (size_t)cfg->hidden, qd = (size_t)cfg->n_heads * cfg->head_dim,
           kvd = (size_t)cfg->n_kv_heads * cfg->head_dim, ffn = (size_t)cfg->intermediate;
    size_t ws_bytes = (T * (2 * d + 2 * qd + 2 * kvd + 2 * ffn) + (size_t)seq_len * seq_len +
                       (size_t)seq_len * cfg->vocab) * sizeof(float) + 2 * T * d * sizeof(float);
    /* the largest linear during quantization: a reference copy, the loss's
     * two double matrices, GPTQ's double Hessian work arrays */
    size_t quant_bytes = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out, &in);
        size_t b = (size_t)out * in * (sizeof(float) + 2 * sizeof(double)) + 3 * (size_t)in * in * sizeof(double);
        quant_bytes = b > quant_bytes ? b : quant_bytes;
    }
    size_t store_bytes = (size_t)samples * seq_len * d * sizeof(float);
    printf("plan: %d layers over %d rank%s; calibration %d x %d tokens, %s mode, micro-batch %d\n", cfg->n_layers, size,
           size == 1 ? "" : "s", samples, seq_len, recipe->calib_mode == MXQ_CALIB_FP ? "fp" : "sequential", batch);
    printf("%-6s %-12s %-16s %12s %12s %12s %12s\n", "rank", "layers", "also", "weights MB", "stats MB", "work MB",
           "total MB");
    for (int r = 0; r < size; r++) {
        int n = first[r + 1] - first[r];
        size_t w = (size_t)n * layer_bytes + (r == 0 ? emb_bytes : 0) +
                   (r == size - 1 ? (cfg->tie_embeddings && size > 1 ? emb_bytes : 0) +
                                        (cfg->tie_embeddings ? 0 : emb_bytes) + d * sizeof(float)
                                  : 0);
        int held = stats_layers > 0 && stats_layers < n ? stats_layers : n;
        size_t s = recipe->calib_mode == MXQ_CALIB_FP ? (size_t)held * stats_bytes : stats_bytes + store_bytes;
        char layers[32], also[32] = "";
        snprintf(layers, sizeof(layers), "[%d, %d)", first[r], first[r + 1]);
        snprintf(also, sizeof(also), "%s%s", r == 0 ? "embedding " : "", r == size - 1 ? "norm+head" : "");
        printf("%-6d %-12s %-16s %12.1f %12.1f %12.1f %12.1f\n", r, layers, also, w / MB, s / MB,
               (ws_bytes + quant_bytes) / MB, (w + s + ws_bytes + quant_bytes) / MB);
    }
    printf("stats: Hessians (double) of the 4 linear inputs of a layer = %.1f MB per layer%s\n", stats_bytes / MB,
           recipe->calib_mode == MXQ_CALIB_FP
               ? (stats_layers > 0 ? ", held for --stats-layers layers at a time (one calibration pass per group)"
                                   : ", held for every owned layer until it is quantized (bound it with --stats-layers)")
               : "; sequential mode also holds the calibration activations");
    fflush(stdout);
    (void)ctx;
}

mxq_status mxq_quantize(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *calib_path,
                        const char *recipe_path, const char *out_dir, const mxq_quantize_options *options)
{
    mxq_status status = MXQ_OK, local = MXQ_OK;
    mxq_dist dist = {.comm = MPI_COMM_NULL};
    mxq_recipe recipe;
    int have_recipe = 0;
    mxq_model_config cfg;
    mxq_model *model = NULL;
    mxq_checkpoint *ckpt = NULL;
    mxq_tokens calib = {0};
    mxq_layer_result *results = NULL;
    shard_list shard = {0};
    int *first = NULL;
    double *records = NULL, *all_records = NULL;
    char *shard_path = NULL, *temp_shard = NULL, *names_text = NULL, *all_names = NULL;
    json_t *config = NULL, *index = NULL, *report = NULL;
    char path[4200];
    const int batch = options->batch > 0 ? options->batch : 8;
    double t_start = mxq_time_now();

    CALL(ctx, mxq_dist_create(ctx, comm, &dist));
    const int rank = dist.rank, size = dist.size;
    local = mxq_recipe_load(ctx, recipe_path, &recipe);
    have_recipe = local == MXQ_OK;
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_config_load(ctx, model_dir, &cfg)));
    local = MXQ_OK;
    if (cfg.mx_weights) {
        mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__, "'%s' is already an mxq quantized checkpoint", model_dir);
        local = MXQ_ERR_ARG;
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));
    first = malloc((size_t)(size + 1) * sizeof(int));
    CHECK_ALLOC(ctx, first, (size_t)(size + 1) * sizeof(int), "the layer partition");
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_partition_layers(ctx, &cfg, size, first)));

    /* Calibration data is checked before anything is written. */
    CALL(ctx, mxq_calibration_tokens(ctx, &dist, calib_path, &recipe, recipe_path, &cfg, &calib));
    if (options->dry_run) {
        if (rank == 0)
            print_plan(ctx, &cfg, &recipe, first, size, batch < calib.n_seqs ? batch : calib.n_seqs, calib.seq_len,
                       calib.n_seqs, options->stats_layers);
        goto fail; /* status OK: nothing else to do */
    }

    /* Only rank 0 touches the directory; everyone learns the outcome. */
    local = MXQ_OK;
    if (rank == 0) {
        char *in_real = realpath(model_dir, NULL), *out_real = realpath(out_dir, NULL);
        if (in_real && out_real && strcmp(in_real, out_real) == 0) {
            mxq_error_set(ctx, MXQ_ERR_ARG, __FILE__, __LINE__,
                          "--out '%s' is the input model directory; write the quantized checkpoint elsewhere",
                          out_dir);
            local = MXQ_ERR_ARG;
        }
        free(in_real);
        free(out_real);
        if (local == MXQ_OK)
            local = prepare_out_dir(ctx, out_dir, options->force);
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));

    mxq_model_part part = {first[rank], first[rank + 1], rank == 0, rank == size - 1};
    double t_load = mxq_time_now();
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_model_load(ctx, model_dir, &cfg, &part, &model)));
    if (rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "quantize: %s (%s, %d layers, d=%d) on %d rank%s with %s; loaded in %.2f s", model_dir,
                mxq_arch_name(cfg.arch), cfg.n_layers, cfg.hidden, size, size == 1 ? "" : "s", recipe_path,
                mxq_time_now() - t_load);
    const int n_local = part.last_layer - part.first_layer;
    results = calloc((size_t)n_local, sizeof(*results));
    local = MXQ_OK;
    if (!results) {
        mxq_error_set(ctx, MXQ_ERR_NOMEM, __FILE__, __LINE__, "out of memory for layer results");
        local = MXQ_ERR_NOMEM;
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));
    double t_quant = mxq_time_now();
    CALL(ctx, mxq_quantize_model_in_memory(ctx, dist.comm, model, &calib, calib_path, &recipe, batch,
                                           options->stats_layers, results));
    double quant_seconds = mxq_time_now() - t_quant;

    /* ---- this rank's shard, under a temporary name ---- */
    double t_write = mxq_time_now();
    char shard_name[64];
    snprintf(shard_name, sizeof(shard_name), "model-%05d-of-%05d.safetensors", rank + 1, size);
    snprintf(path, sizeof(path), "%s/%s", out_dir, shard_name);
    shard_path = strdup(path);
    snprintf(path, sizeof(path), "%s/%s.incomplete", out_dir, shard_name);
    temp_shard = strdup(path);
    local = shard_path && temp_shard ? MXQ_OK : MXQ_ERR_NOMEM;
    if (local == MXQ_OK)
        local = mxq_checkpoint_open(ctx, model_dir, &ckpt);
    if (local == MXQ_OK)
        local = build_shard(ctx, ckpt, model, results, &recipe, first, rank, size, &shard);
    if (local == MXQ_OK)
        local = mxq_st_write_file(ctx, temp_shard, shard.t, shard.n);
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));

    /* ---- names and per-layer figures to rank 0 ---- */
    {
        size_t len = strlen(shard_name) + 32;
        for (size_t i = 0; i < shard.n; i++)
            len += strlen(shard.names[i]) + 1;
        names_text = malloc(len);
        CHECK_ALLOC(ctx, names_text, len, "the tensor name list");
        size_t used = 0;
        used += (size_t)snprintf(names_text, len, "#%s %zu\n", shard_name, shard.bytes);
        for (size_t i = 0; i < shard.n; i++)
            used += (size_t)snprintf(names_text + used, len - used, "%s\n", shard.names[i]);
    }
    CALL(ctx, gather_text(ctx, &dist, names_text, &all_names));
    records = calloc((size_t)(n_local ? n_local : 1) * REC_SIZE, sizeof(double));
    CHECK_ALLOC(ctx, records, (size_t)n_local * REC_SIZE * sizeof(double), "layer records");
    for (int i = 0; i < n_local; i++)
        pack_record(&results[i], rank, records + (size_t)i * REC_SIZE);
    {
        int *counts = NULL, *displs = NULL;
        if (rank == 0) {
            counts = calloc((size_t)size, sizeof(int));
            displs = calloc((size_t)size, sizeof(int));
            all_records = calloc((size_t)cfg.n_layers * REC_SIZE, sizeof(double));
            if (counts && displs)
                for (int r = 0; r < size; r++) {
                    counts[r] = (first[r + 1] - first[r]) * REC_SIZE;
                    displs[r] = first[r] * REC_SIZE;
                }
        }
        int ok = rank != 0 || (counts && displs && all_records);
        int rc = ok ? MPI_Gatherv(records, n_local * REC_SIZE, MPI_DOUBLE, all_records, counts, displs, MPI_DOUBLE, 0,
                                  dist.comm)
                    : MPI_ERR_NO_MEM;
        free(counts);
        free(displs);
        CALL_MPI(ctx, rc);
    }
    double peak_rss_local = (double)mxq_peak_rss_bytes(), peak_rss_max = 0;
    double *rss_all = rank == 0 ? calloc((size_t)size, sizeof(double)) : NULL;
    CALL_MPI(ctx, MPI_Gather(&peak_rss_local, 1, MPI_DOUBLE, rss_all, 1, MPI_DOUBLE, 0, dist.comm));

    /* ---- rank 0: index, config, report (temporary names) ---- */
    local = MXQ_OK;
    if (rank == 0) {
        index = json_object();
        json_t *map = json_object();
        size_t total_bytes = 0;
        char *save = NULL, *current = NULL;
        for (char *line = strtok_r(all_names, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            if (line[0] == '#') {
                char *sp = strchr(line, ' ');
                *sp = '\0';
                current = line + 1;
                total_bytes += strtoull(sp + 1, NULL, 10);
                continue;
            }
            json_object_set_new(map, line, json_string(current));
        }
        json_object_set_new(index, "metadata", json_pack("{s:I, s:s}", "total_size", (json_int_t)total_bytes, "format",
                                                         "mxq"));
        json_object_set_new(index, "weight_map", map);

        snprintf(path, sizeof(path), "%s/config.json", model_dir);
        json_error_t jerr;
        config = json_load_file(path, 0, &jerr);
        if (!config) {
            mxq_error_set(ctx, MXQ_ERR_FORMAT, __FILE__, __LINE__, "%s: %s", path, jerr.text);
            local = MXQ_ERR_FORMAT;
        } else {
            json_object_set_new(config, "quantization_config", quantization_config(&recipe, calib_path));
        }

        report = json_object();
        json_object_set_new(report, "model", json_string(model_dir));
        json_object_set_new(report, "calibration", json_string(calib_path));
        json_object_set_new(report, "recipe", json_string(recipe_path));
        json_object_set_new(report, "ranks", json_integer(size));
        json_t *layers = json_array();
        double tot_rtn = 0, tot_loss = 0;
        for (int l = 0; l < cfg.n_layers; l++) {
            const double *rec = all_records + (size_t)l * REC_SIZE;
            json_t *jl = json_pack("{s:i, s:i, s:f, s:f, s:f}", "layer", (int)rec[0], "rank", (int)rec[1],
                                   "seconds_calib", rec[2], "seconds", rec[3], "peak_rss_mb", rec[4] / 1048576.0);
            json_t *awq = json_object(), *sq = json_object(), *lins = json_object();
            for (int i = 0; i < MXQ_INPUT_COUNT; i++) {
                if (rec[5 + i] >= 0)
                    json_object_set_new(awq, mxq_input_name((mxq_input_id)i), json_real(rec[5 + i]));
                if (rec[9 + i] >= 0)
                    json_object_set_new(sq, mxq_input_name((mxq_input_id)i), json_real(rec[9 + i]));
            }
            for (int li = 0; li < MXQ_LIN_COUNT; li++) {
                const double *x = rec + REC_HEAD + REC_LIN * li;
                if (!x[0])
                    continue;
                tot_rtn += x[1];
                tot_loss += x[2];
                json_object_set_new(lins, mxq_linear_name((mxq_linear_id)li),
                                    json_pack("{s:f, s:f, s:i, s:f}", "loss_rtn", x[1], "loss", x[2], "dead_channels",
                                              (int)x[3], "seconds", x[4]));
            }
            json_object_set_new(jl, "awq_alpha", awq);
            json_object_set_new(jl, "smoothquant_alpha", sq);
            json_object_set_new(jl, "linears", lins);
            json_array_append_new(layers, jl);
        }
        json_object_set_new(report, "layers", layers);
        json_t *rss = json_array();
        for (int r = 0; r < size; r++) {
            json_array_append_new(rss, json_real(rss_all[r] / 1048576.0));
            peak_rss_max = rss_all[r] > peak_rss_max ? rss_all[r] : peak_rss_max;
        }
        json_object_set_new(report, "peak_rss_mb_per_rank", rss);
        json_object_set_new(report, "totals", json_pack("{s:f, s:f, s:f, s:f, s:f}", "loss_rtn", tot_rtn, "loss",
                                                        tot_loss, "seconds_quantize", quant_seconds, "seconds_write",
                                                        mxq_time_now() - t_write, "seconds_total",
                                                        mxq_time_now() - t_start));

        /* summary table */
        printf("%-6s %-5s %12s %12s %8s %8s %9s  %s\n", "layer", "rank", "loss rtn", "loss", "change", "seconds",
               "rss MB", "alpha");
        for (int l = 0; l < cfg.n_layers; l++) {
            const double *rec = all_records + (size_t)l * REC_SIZE;
            double rtn = 0, loss = 0;
            for (int li = 0; li < MXQ_LIN_COUNT; li++) {
                const double *x = rec + REC_HEAD + REC_LIN * li;
                if (x[0]) {
                    rtn += x[1];
                    loss += x[2];
                }
            }
            char alpha[96] = "-";
            size_t used = 0;
            for (int i = 0; i < MXQ_INPUT_COUNT; i++)
                if (rec[5 + i] >= 0 || rec[9 + i] >= 0)
                    used += (size_t)snprintf(alpha + used, sizeof(alpha) - used, "%s%s=%.2f", used ? " " : "",
                                             mxq_input_name((mxq_input_id)i), rec[5 + i] >= 0 ? rec[5 + i] : rec[9 + i]);
            printf("%-6d %-5d %12.4e %12.4e %+7.1f%% %8.2f %9.0f  %s\n", l, (int)rec[1], rtn, loss,
                   rtn > 0 ? 100.0 * (loss - rtn) / rtn : 0.0, rec[2] + rec[3], rec[4] / 1048576.0, alpha);
        }
        printf("total  %-5s %12.4e %12.4e %+7.1f%%  quantize %.2f s, peak rss %.0f MB/rank\n", "", tot_rtn, tot_loss,
               tot_rtn > 0 ? 100.0 * (tot_loss - tot_rtn) / tot_rtn : 0.0, quant_seconds, peak_rss_max / 1048576.0);
        fflush(stdout);
    }
    free(rss_all);
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));

    /* ---- commit: shards, then report and config, the index last ---- */
    CALL(ctx, mxq_dist_agree(ctx, &dist, mxq_rename(ctx, temp_shard, shard_path)));
    local = MXQ_OK;
    if (rank == 0) {
        snprintf(path, sizeof(path), "%s/" REPORT_NAME, out_dir);
        local = mxq_json_write_atomic(ctx, report, path);
        snprintf(path, sizeof(path), "%s/config.json", out_dir);
        if (local == MXQ_OK)
            local = mxq_json_write_atomic(ctx, config, path);
        snprintf(path, sizeof(path), "%s/model.safetensors.index.json", out_dir);
        if (local == MXQ_OK)
            local = mxq_json_write_atomic(ctx, index, path);
        if (local == MXQ_OK)
            mxq_log(ctx, MXQ_LOG_INFO, "wrote %s: %d shard%s, model.safetensors.index.json, config.json, " REPORT_NAME
                    " (%.1f s total)", out_dir, size, size == 1 ? "" : "s", mxq_time_now() - t_start);
    }
    CALL(ctx, mxq_dist_agree(ctx, &dist, local));
fail:
    if (status != MXQ_OK && temp_shard)
        unlink(temp_shard);
    json_decref(config);
    json_decref(index);
    json_decref(report);
    free(records);
    free(all_records);
    free(names_text);
    free(all_names);
    free(shard_path);
    free(temp_shard);
    shard_list_free(&shard);
    mxq_checkpoint_close(ckpt);
    mxq_tokens_free(&calib);
    for (int i = 0; results && model && i < model->last_layer - model->first_layer; i++)
        mxq_layer_result_free(&results[i]);
    free(results);
    mxq_model_free(model);
    free(first);
    if (have_recipe)
        mxq_recipe_free(&recipe);
    mxq_dist_free(&dist);
    return status;
}
