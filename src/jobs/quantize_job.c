/* mxq quantize: the whole job. Check everything, choose how the ranks
 * share the work (a pipeline of layer ranges, or one data-parallel group:
 * choose_group), load this rank's part, calibrate and quantize
 * (calibrate.c, calibrate_group.c), write this rank's shard, and on rank 0
 * the index, config.json (with quantization_config) and the JSON report.
 *
 * Nothing looks complete before it is: the output directory's record of
 * mxq's files is written first; shards are written under temporary names,
 * renamed only when every rank has written its own, and
 * model.safetensors.index.json, without which the directory is no
 * checkpoint, is renamed into place last. */
#include <cblas.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/ckpt_writer.h"
#include "jobs/jobs_internal.h"
#include "io/tensor_views.h"
#include "model/lazy.h"
#include "jobs/quantize_report.h"
#include "io/sha256.h"
#include "jobs/resume.h"
#include "parallel/act_store.h"

#define REPORT_NAME "mxq_report.json"

/* The list of tensors this rank writes, pointing into the model, the
 * results and the input checkpoint. */
typedef struct {
    mxq_tensor_write *t;
    char **names;
    size_t n, cap;
    size_t bytes;
} shard_list;

/* Everything one quantize job holds. */
typedef struct {
    mxq_dist dist;
    const char *model_dir, *calib_path, *recipe_path, *out_dir;
    const mxq_quantize_options *opt;
    int batch;
    mxq_input_set inputs;
    mxq_recipe recipe;
    int have_recipe;
    mxq_model_config cfg;
    int *first;        /* the pipeline's layer ranges */
    int data_parallel; /* 0: a pipeline of layer ranges; 1: one data-parallel group of all ranks */
    double mem_per_rank;
    int grid_min_inputs; /* GPTQ of linears with this many inputs or more on the group's grid; 0: never */
    mxq_tokens calib;
    mxq_model *model;
    mxq_layer_result *results;
    int n_local;
    mxq_checkpoint *ckpt;
    char shard_name[64];
    mxq_ckpt_dir out; /* rank 0: the output directory and its record */
    mxq_output shard_out;
    shard_list shard;
    double t_start, quant_seconds;
    char *packed_report; /* this rank's figures and tensor names, for rank 0 */
    size_t packed_len;
    mxq_quantize_report report; /* rank 0 */
    mxq_act_store store;        /* --store-activations */
    int have_store;
    mxq_resume resume;     /* the layer records (every run in fp mode), and with --resume the earlier run's */
    json_t *fingerprint;   /* rank 0: what the bytes depend on, as job.json records it */
    mxq_layer_hooks hooks; /* for calibration: the layers done before, and their record */
} quantize_job;

/* The rank that writes a tensor (layer indices were checked against the
 * config when the job started): a layer's owner. */
static int owner_of_tensor(const char *name, const int *first, int size, int data_parallel)
{
    int layer;
    if (sscanf(name, "model.layers.%d.", &layer) == 1) {
        if (data_parallel)
            return layer % size;
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
static const float *modified_tensor(const mxq_layer *L, const mxq_layer_result *r, const char *rest)
{
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

/* A quantized linear's weight goes out as weight_packed + weight_scale.
 * Returns 1 in *handled if `rest` ("self_attn.q_proj.weight") is one. */
static mxq_status add_quantized_linear(mxq_ctx *ctx, const quantize_job *job, int layer, const char *rest,
                                       const mxq_layer_result *res, shard_list *s, int *handled)
{
    mxq_status status = MXQ_OK;
    char buf[300];
    *handled = 0;
    for (int li = 0; li < MXQ_LIN_COUNT && !*handled; li++) {
        const mxq_linear_result *lr = &res->linear[li];
        snprintf(buf, sizeof(buf), "%s.weight", mxq_linear_name((mxq_linear_id)li));
        if (strcmp(rest, buf) != 0 || !lr->quantized)
            continue;
        int out, in;
        mxq_linear_shape(&job->cfg, (mxq_linear_id)li, &out, &in);
        const mxq_mx_spec *spec = &job->recipe.weights;
        int64_t pshape[2] = {out, (int64_t)mxq_mx_packed_row_bytes(spec->format, (size_t)in)};
        int64_t sshape[2] = {out, (int64_t)mxq_mx_blocks_per_row((size_t)in, spec->block)};
        snprintf(buf, sizeof(buf), "model.layers.%d.%s.weight_packed", layer, mxq_linear_name((mxq_linear_id)li));
        CALL(ctx, shard_add(ctx, s, buf, MXQ_DT_U8, 2, pshape, lr->packed));
        snprintf(buf, sizeof(buf), "model.layers.%d.%s.weight_scale", layer, mxq_linear_name((mxq_linear_id)li));
        CALL(ctx, shard_add(ctx, s, buf, MXQ_DT_U8, 2, sshape, lr->scales));
        *handled = 1;
    }
fail:
    return status;
}

/* A tensor of layer `layer` (v; `rest` its name after "model.layers.N.")
 * that the algorithms changed, from the quantized layer L and its result:
 * a quantized linear's packed weight and scales, or a tensor a folded
 * scale changed. *handled = 0 if it is copied as it is. */
static mxq_status add_changed_tensor(mxq_ctx *ctx, const quantize_job *job, int layer, const char *rest,
                                     const mxq_tensor_view *v, const mxq_layer *L, const mxq_layer_result *res,
                                     shard_list *s, int *handled)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, add_quantized_linear(ctx, job, layer, rest, res, s, handled));
    if (*handled)
        return MXQ_OK;
    const float *changed = modified_tensor(L, res, rest);
    /* Folded scales: written in F32 so that the checkpoint holds exactly
     * the values the quantized model was evaluated with. */
    if (changed)
        CALL(ctx, shard_add(ctx, s, v->name, MXQ_DT_F32, v->rank, v->shape, changed));
    *handled = changed != NULL;
fail:
    return status;
}

/* A record's tensor `name`, which must have the shape the shard expects. */
static mxq_status add_recorded(mxq_ctx *ctx, const quantize_job *job, int layer, const char *name, mxq_dtype dtype,
                               int rank, const int64_t *shape, shard_list *s)
{
    mxq_status status = MXQ_OK;
    const mxq_tensor_view *r = mxq_resume_tensor(&job->resume, layer, name);
    int same = r && r->dtype == dtype && r->rank == rank;
    for (int d = 0; same && d < rank; d++)
        same = r->shape[d] == shape[d];
    CHECK(ctx, same, MXQ_ERR_FORMAT, "%s: tensor '%s' is missing or not %s of the layer's shape; start over with --force",
          r ? r->file : job->resume.dir, name, mxq_dtype_name(dtype));
    CALL(ctx, shard_add(ctx, s, name, dtype, rank, shape, r->data));
fail:
    return status;
}

/* A tensor of a layer the earlier run quantized (--resume): from its
 * record if the algorithms changed it, else copied from the input. */
static mxq_status add_resumed_tensor(mxq_ctx *ctx, const quantize_job *job, int layer, const mxq_tensor_view *v,
                                     shard_list *s)
{
    mxq_status status = MXQ_OK;
    char packed[300], scale[300];
    const size_t len = strlen(v->name);
    snprintf(packed, sizeof(packed), "%s_packed", v->name);
    snprintf(scale, sizeof(scale), "%s_scale", v->name);
    if (mxq_resume_tensor(&job->resume, layer, v->name)) {
        CALL(ctx, add_recorded(ctx, job, layer, v->name, MXQ_DT_F32, v->rank, v->shape, s));
    } else if (len > 7 && strcmp(v->name + len - 7, ".weight") == 0 && mxq_resume_tensor(&job->resume, layer, packed)) {
        const mxq_mx_spec *spec = &job->recipe.weights;
        const int64_t out = v->shape[0], in = v->shape[1];
        const int64_t pshape[2] = {out, (int64_t)mxq_mx_packed_row_bytes(spec->format, (size_t)in)};
        const int64_t sshape[2] = {out, (int64_t)mxq_mx_blocks_per_row((size_t)in, spec->block)};
        CALL(ctx, add_recorded(ctx, job, layer, packed, MXQ_DT_U8, 2, pshape, s));
        CALL(ctx, add_recorded(ctx, job, layer, scale, MXQ_DT_U8, 2, sshape, s));
    } else {
        CALL(ctx, shard_add(ctx, s, v->name, v->dtype, v->rank, v->shape, v->data));
    }
fail:
    return status;
}

/* One input tensor of this rank's part, as it goes into the shard. */
static mxq_status add_tensor(mxq_ctx *ctx, const quantize_job *job, const mxq_tensor_view *v, shard_list *s)
{
    mxq_status status = MXQ_OK;
    int layer, consumed = 0, handled = 0;
    if (sscanf(v->name, "model.layers.%d.%n", &layer, &consumed) == 1 && consumed > 0) {
        if (job->resume.done && job->resume.done[layer])
            return add_resumed_tensor(ctx, job, layer, v, s);
        const int i = layer - job->model->first_layer;
        CALL(ctx, add_changed_tensor(ctx, job, layer, v->name + consumed, v, &job->model->layers[i],
                                     &job->results[i], s, &handled));
        if (handled)
            return MXQ_OK;
    }
    CALL(ctx, shard_add(ctx, s, v->name, v->dtype, v->rank, v->shape, v->data));
fail:
    return status;
}

/* The record of layer `layer`, just quantized on this rank (calibration's
 * hook): the tensors the algorithms changed, and the figures. */
static mxq_status record_layer(mxq_ctx *ctx, void *user, int layer, const mxq_layer *L, const mxq_layer_result *res)
{
    mxq_status status = MXQ_OK;
    quantize_job *job = user;
    shard_list s = {0};
    const char **names = NULL;
    size_t count = 0;
    char prefix[64];
    const int plen = snprintf(prefix, sizeof(prefix), "model.layers.%d.", layer);
    CALL(ctx, mxq_checkpoint_names(ctx, job->ckpt, &names, &count));
    qsort(names, count, sizeof(char *), cmp_str);
    for (size_t i = 0; i < count; i++) {
        int handled;
        const mxq_tensor_view *v;
        if (strncmp(names[i], prefix, (size_t)plen) != 0)
            continue;
        CALL(ctx, mxq_checkpoint_get(ctx, job->ckpt, names[i], &v));
        CALL(ctx, add_changed_tensor(ctx, job, layer, names[i] + plen, v, L, res, &s, &handled));
    }
    mxq_layer_record figures;
    mxq_layer_record_of(res, job->dist.rank, &figures);
    CALL_IN(ctx, mxq_resume_write_layer(ctx, &job->resume, layer, s.t, s.n, &figures, &job->inputs),
            "layer %d: its record for --resume", layer);
fail:
    free(names);
    shard_list_free(&s);
    return status;
}

/* The layers the earlier run quantized that this rank writes: their
 * records opened, their figures into the results (for the report). */
static mxq_status restore_done_layers(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    char name[64];
    for (int l = 0; job->resume.done && l < job->cfg.n_layers; l++) {
        snprintf(name, sizeof(name), "model.layers.%d.", l);
        if (!job->resume.done[l] || owner_of_tensor(name, job->first, job->dist.size, job->data_parallel) != job->dist.rank)
            continue;
        mxq_layer_record figures;
        CALL(ctx, mxq_resume_open_layer(ctx, &job->resume, l, &figures));
        mxq_layer_result_of_record(&figures, &job->results[l - job->model->first_layer]);
    }
fail:
    return status;
}

/* This rank's shard, written under its temporary name. */
static mxq_status write_shard(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    const char **names = NULL;
    size_t count = 0;
    CALL(ctx, restore_done_layers(ctx, job));
    CALL(ctx, mxq_checkpoint_names(ctx, job->ckpt, &names, &count));
    qsort(names, count, sizeof(char *), cmp_str);
    for (size_t i = 0; i < count; i++) {
        if (owner_of_tensor(names[i], job->first, job->dist.size, job->data_parallel) != job->dist.rank)
            continue;
        const mxq_tensor_view *v;
        CALL(ctx, mxq_checkpoint_get(ctx, job->ckpt, names[i], &v));
        CALL(ctx, add_tensor(ctx, job, v, &job->shard));
    }
    mxq_sha256 hash;
    mxq_shard_digest digest = {.data_bytes = job->shard.bytes};
    mxq_sha256_init(&hash);
    job->shard_out.hash = &hash;
    CALL(ctx, mxq_st_write(ctx, &job->shard_out, job->shard.t, job->shard.n));
    job->shard_out.hash = NULL;
    digest.file_bytes = hash.length;
    mxq_sha256_hex(&hash, digest.sha256);
    CALL(ctx, mxq_quantize_report_pack(ctx, job->dist.rank, job->results, job->n_local, job->shard.names, job->shard.n,
                                       &digest, &job->packed_report, &job->packed_len));
fail:
    free(names);
    return status;
}

/* ---- the job's phases ------------------------------------------------------- */

static int same_directory(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* The files the job writes: recorded in the output directory first, or
 * (check_only, --dry-run) checked against what the directory holds. */
static mxq_status out_dir_files(mxq_ctx *ctx, quantize_job *job, int check_only)
{
    mxq_status status = MXQ_OK;
    const int size = job->dist.size;
    const size_t n = (size_t)size + 3;
    char(*files)[64] = calloc(n, sizeof(*files));
    const char **names = calloc(n, sizeof(char *));
    CHECK_ALLOC(ctx, files && names, n * 64, "the list of output files");
    for (int r = 0; r < size; r++)
        mxq_shard_name(files[r], sizeof(files[0]), r, size);
    snprintf(files[size], sizeof(files[0]), "%s", REPORT_NAME);
    snprintf(files[size + 1], sizeof(files[0]), "config.json");
    snprintf(files[size + 2], sizeof(files[0]), "model.safetensors.index.json");
    for (size_t i = 0; i < n; i++)
        names[i] = files[i];
    /* a resumed run replaces what the run it continues wrote */
    const int force = job->opt->force || job->opt->resume;
    if (check_only)
        CALL(ctx, mxq_ckpt_dir_check(ctx, job->out_dir, force, names, n, &job->inputs));
    else
        CALL(ctx, mxq_ckpt_dir_prepare(ctx, &job->out, job->out_dir, force, names, n, &job->inputs));
fail:
    free(files);
    free(names);
    return status;
}

static double store_bytes(const quantize_job *job)
{
    return (double)job->cfg.n_layers * job->calib.n_seqs * job->calib.seq_len * job->cfg.hidden * sizeof(float);
}

/* --store-activations: not a name the checkpoint uses (it could land in
 * --out, and replace a shard at the commit), and free to take the store. */
static mxq_status check_store_path(mxq_ctx *ctx, const quantize_job *job)
{
    mxq_status status = MXQ_OK;
    const char *path = job->opt->store_activations, *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
    int a, b;
    const int shard = sscanf(base, "model-%d-of-%d.safetensors", &a, &b) == 2;
    CHECK(ctx,
          !shard && strcmp(base, REPORT_NAME) != 0 && strcmp(base, "config.json") != 0 &&
              strcmp(base, "model.safetensors") != 0 &&
              strcmp(base, "model.safetensors.index.json") != 0 && strcmp(base, ".mxq-output.json") != 0,
          MXQ_ERR_ARG, "--store-activations '%s' has the name of a checkpoint file; give the store another name", path);
    CALL(ctx, mxq_act_store_check(ctx, path, &job->inputs, job->opt->force || job->opt->resume));
    CALL(ctx, mxq_act_store_check_space(ctx, path, store_bytes(job)));
fail:
    return status;
}

/* Everything that can be checked before anything is written, local to this
 * rank: recipe, config against checkpoint, partition, calibration tokens,
 * the job's inputs, the output directory not being the input. */
static mxq_status setup(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_recipe_load(ctx, job->recipe_path, &job->recipe));
    job->have_recipe = 1;
    CALL(ctx, mxq_job_config(ctx, job->model_dir, job->opt->dry_run, &job->cfg));
    CHECK(ctx, !job->cfg.mx_weights, MXQ_ERR_ARG, "'%s' is already an mxq quantized checkpoint", job->model_dir);
    const int group = job->opt->group_size;
    /* More ranks than layers leave no pipeline of layer ranges (first stays
     * NULL), but a data-parallel group needs none: its ranks share tokens. */
    const int can_group = job->opt->stats_layers == 0 && group != 1;
    if (job->dist.size <= job->cfg.n_layers || !can_group)
        CALL(ctx, mxq_job_partition(ctx, job->dist.size, &job->cfg, &job->first));
    CHECK(ctx, group == 0 || group == 1 || group == job->dist.size, MXQ_ERR_ARG,
          "--group-size %d: a group is one rank (a pipeline of layer ranges) or all %d ranks", group, job->dist.size);
    CHECK(ctx, !job->opt->store_activations || (group != 1 && job->opt->stats_layers == 0), MXQ_ERR_ARG,
          "--store-activations is written by a data-parallel group; %s runs a pipeline",
          group == 1 ? "--group-size 1" : "--stats-layers");
    CHECK(ctx, group <= 1 || job->opt->stats_layers == 0, MXQ_ERR_ARG,
          "--stats-layers bounds a pipeline's statistics; a data-parallel group (--group-size %d) holds one or two "
          "layers' already",
          group);
    CHECK(ctx, job->opt->stats_layers == 0 || job->recipe.calib_mode == MXQ_CALIB_FP, MXQ_ERR_ARG,
          "--stats-layers bounds fp calibration; the recipe '%s' calibrates sequentially (one layer at a time already)",
          job->recipe_path);
    if (job->opt->resume && job->recipe.calib_mode == MXQ_CALIB_SEQUENTIAL && !job->opt->store_activations &&
        job->dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_WARN,
                "--resume: sequential calibration records its layers only with --store-activations (a resumed run "
                "reads the quantized layers' outputs back from it); this run records none");
    CALL(ctx, mxq_calibration_tokens(ctx, job->calib_path, &job->recipe, job->recipe_path, &job->cfg, &job->calib));
    CHECK(ctx, !same_directory(job->model_dir, job->out_dir), MXQ_ERR_ARG,
          "--out '%s' is the input model directory; write the quantized checkpoint elsewhere", job->out_dir);
    CALL(ctx, mxq_input_set_add_model(ctx, &job->inputs, job->model_dir));
    CALL(ctx, mxq_input_set_add(ctx, &job->inputs, job->calib_path, "the calibration file"));
    CALL(ctx, mxq_input_set_add(ctx, &job->inputs, job->recipe_path, "the recipe"));
    if (job->opt->store_activations)
        CALL(ctx, check_store_path(ctx, job));
    /* a dry run says now what the real run would refuse about --out */
    if (job->opt->dry_run && job->out_dir && job->dist.rank == 0)
        CALL(ctx, out_dir_files(ctx, job, 1));
fail:
    return status;
}


/* The final norm and an untied lm_head are copied into the last shard
 * without being run: their NaN/Inf are refused here, before the work, as
 * every converted weight's are. */
static mxq_status check_copied_tensors(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    const char *names[2] = {"model.norm.weight", job->cfg.tie_embeddings ? NULL : "lm_head.weight"};
    for (int i = 0; i < 2 && names[i]; i++) {
        const mxq_tensor_view *t;
        CALL(ctx, mxq_checkpoint_get(ctx, job->ckpt, names[i], &t));
        CALL(ctx, mxq_tensor_check_float(ctx, t));
        mxq_tensor_view_release(t);
    }
fail:
    return status;
}

/* This rank's shard file (proving the directory writable on every rank
 * before the work), its layers, and room for their results. */
static mxq_status open_and_load(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    const int rank = job->dist.rank, size = job->dist.size;
    char path[MXQ_PATH_BUF];
    /* Quantization never runs the head. A group runs every layer, one at a
     * time, and each rank scans the layers it owns for NaN/Inf; sequential
     * mode runs its range one layer at a time. */
    mxq_model_part part = {0, job->cfg.n_layers, 1, 0};
    const int lazy = job->data_parallel || job->recipe.calib_mode == MXQ_CALIB_SEQUENTIAL;
    if (!job->data_parallel)
        part = (mxq_model_part){job->first[rank], job->first[rank + 1], rank == 0, 0};
    mxq_shard_name(job->shard_name, sizeof(job->shard_name), rank, size);
    mxq_path_join(path, job->out_dir, job->shard_name);
    CALL(ctx, mxq_output_begin(ctx, path, &job->inputs, &job->shard_out));
    double t_load = mxq_time_now();
    if (lazy)
        CALL(ctx, mxq_model_load_lazy(ctx, job->model_dir, &job->cfg, &part, job->data_parallel ? size : 1,
                                      job->data_parallel ? rank : 0, &job->model));
    else
        CALL(ctx, mxq_model_load(ctx, job->model_dir, &job->cfg, &part, &job->model));
    CALL(ctx, mxq_checkpoint_open(ctx, job->model_dir, &job->ckpt));
    if (rank == size - 1)
        CALL(ctx, check_copied_tensors(ctx, job));
    if (rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "quantize: %s (%s, %d layers, d=%d) on %d rank%s with %s; loaded in %.2f s",
                job->model_dir, mxq_arch_name(job->cfg.arch), job->cfg.n_layers, job->cfg.hidden, size,
                size == 1 ? "" : "s", job->recipe_path, mxq_time_now() - t_load);
    job->n_local = part.last_layer - part.first_layer;
    job->results = calloc((size_t)job->n_local + 1, sizeof(*job->results));
    CHECK_ALLOC(ctx, job->results, sizeof(*job->results), "the layer results");
fail:
    return status;
}

/* The output directory by its parent's real path and its name (it may not
 * exist yet: a fresh run makes it after this is recorded). */
static void real_out_path(const char *out, char *buf, size_t size)
{
    char parent[PATH_MAX], real[PATH_MAX];
    const char *slash = strrchr(out, '/'), *name = slash ? slash + 1 : out;
    snprintf(parent, sizeof(parent), "%.*s", slash ? (int)(slash - out) : 1, slash ? out : ".");
    if (!parent[0])
        snprintf(parent, sizeof(parent), "/");
    snprintf(buf, size, "%s/%s", realpath(parent, real) ? real : parent, name);
}

/* A file's SHA-256 and size under `key` ("recipe": {"sha256", "bytes"}). */
static mxq_status put_checksum(mxq_ctx *ctx, json_t *fp, const char *key, const char *path, const char *what)
{
    mxq_status status = MXQ_OK;
    char hex[65];
    uint64_t bytes = 0;
    CALL(ctx, mxq_sha256_file(ctx, path, what, hex, &bytes));
    CHECK(ctx, json_object_set_new(fp, key, json_pack("{s:s, s:I}", "sha256", hex, "bytes", (json_int_t)bytes)) == 0,
          MXQ_ERR_NOMEM, "out of memory recording the job's inputs");
fail:
    return status;
}

/* Rank 0: what the checkpoint's bytes depend on besides mxq's code (the
 * inputs, how the ranks share the work, OpenBLAS's threads and kernels),
 * as job.json records it for --resume. The weights by path and size
 * (hashing 140 GB would take longer than some layers); config, recipe and
 * calibration by checksum. */
static mxq_status build_fingerprint(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    char config[MXQ_PATH_BUF];
    int ok = 1;
    json_t *fp = job->fingerprint = json_object(), *files = json_object(), *ranges = json_array();
    CHECK_ALLOC(ctx, fp && files && ranges, 1, "the job's record");
    mxq_path_join(config, job->model_dir, "config.json");
    CALL(ctx, put_checksum(ctx, fp, "config", config, "config.json"));
    CALL(ctx, put_checksum(ctx, fp, "recipe", job->recipe_path, "recipe"));
    CALL(ctx, put_checksum(ctx, fp, "calibration", job->calib_path, "calibration file"));
    for (size_t i = 0; i < job->inputs.n; i++) { /* by real path: ./m and m are one model */
        struct stat st;
        char real[PATH_MAX];
        const char *path = job->inputs.ids[i].path, *key = realpath(path, real) ? real : path;
        const size_t len = strlen(path);
        const int exists = stat(path, &st) == 0, weights = len > 12 && strcmp(path + len - 12, ".safetensors") == 0;
        /* weights are not hashed: their modification time tells a same-size rewrite */
        mxq_json_put(files, key,
                     weights && exists ? json_pack("{s:I, s:I}", "bytes", (json_int_t)st.st_size, "mtime_ns",
                                                   (json_int_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec)
                                       : json_integer(exists ? (json_int_t)st.st_size : -1),
                     &ok);
    }
    for (int r = 0; job->first && !job->data_parallel && r <= job->dist.size; r++)
        mxq_json_push(ranges, json_integer(job->first[r]), &ok);
    mxq_json_put(fp, "mxq", json_string(MXQ_VERSION), &ok);
    char out_real[PATH_MAX + 256];
    real_out_path(job->out_dir, out_real, sizeof(out_real));
    mxq_json_put(fp, "out", json_string(out_real), &ok);
    mxq_json_put(fp, "input_bytes", json_incref(files), &ok);
    mxq_json_put(fp, "ranks", json_integer(job->dist.size), &ok);
    mxq_json_put(fp, "group_size", json_integer(job->data_parallel ? job->dist.size : 1), &ok);
    mxq_json_put(fp, "layer_ranges", json_incref(ranges), &ok);
    mxq_json_put(fp, "batch", json_integer(job->batch), &ok);
    mxq_json_put(fp, "grid_min_inputs", json_integer(job->data_parallel ? job->grid_min_inputs : 0), &ok);
    mxq_json_put(fp, "layer_record_bytes", json_integer((json_int_t)sizeof(mxq_layer_record)), &ok);
    /* OpenBLAS's threads and kernels change the last bits (README, mxq quantize) */
    mxq_json_put(fp, "openblas", json_pack("{s:i, s:s}", "threads", openblas_get_num_threads(), "core",
                                           openblas_get_corename()), &ok);
    CHECK(ctx, ok, MXQ_ERR_NOMEM, "out of memory building the job's record");
fail:
    json_decref(files);
    json_decref(ranges);
    return status;
}

/* The SHA-256 of job.json's text: records and the store carry it, so that
 * a resumed run takes only its own job's. */
static void fingerprint_digest(const json_t *fingerprint, char hex[65])
{
    char *text = json_dumps(fingerprint, JSON_COMPACT | JSON_SORT_KEYS);
    mxq_sha256 s;
    mxq_sha256_init(&s);
    mxq_sha256_update(&s, text ? text : "", text ? strlen(text) : 0);
    mxq_sha256_hex(&s, hex);
    free(text);
}

/* Whether this run records its layers for --resume: fp calibration, and
 * sequential calibration by a group with an activation store (a resumed
 * run reads the quantized layers' outputs back from it). */
static int records_layers(const quantize_job *job)
{
    return job->recipe.calib_mode == MXQ_CALIB_FP || (job->data_parallel && job->opt->store_activations);
}

/* Rank 0: the earlier run's records checked (--resume) or cleared
 * (--force), the output directory prepared, a fresh run's records begun. */
static mxq_status prepare_output(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    char records[MXQ_PATH_BUF];
    mxq_path_join(records, job->out_dir, MXQ_RESUME_DIR);
    CHECK(ctx, records_layers(job) || !job->opt->resume || access(records, F_OK) != 0, MXQ_ERR_ARG,
          "--resume of sequential calibration needs the activation store the run wrote (--store-activations): "
          "without it the records in %s cannot be used; start over with --force",
          records);
    CALL(ctx, build_fingerprint(ctx, job));
    fingerprint_digest(job->fingerprint, job->resume.job);
    CALL(ctx, mxq_resume_check(ctx, &job->resume, job->out_dir, job->cfg.n_layers, job->fingerprint,
                               job->opt->resume, job->opt->force));
    CALL(ctx, out_dir_files(ctx, job, 0));
    if (records_layers(job))
        CALL(ctx, mxq_resume_begin(ctx, &job->resume, job->fingerprint, &job->inputs));
fail:
    return status;
}

/* Rank 0 says which layers a resumed run takes from the records. */
static void log_resume(mxq_ctx *ctx, const quantize_job *job)
{
    char text[256] = "";
    const int L = job->cfg.n_layers;
    if (job->dist.rank != 0 || !job->opt->resume)
        return;
    if (job->resume.n_done == 0) {
        mxq_log(ctx, MXQ_LOG_INFO, "--resume: no layer of a run in %s is recorded yet; the run starts from the first",
                job->out_dir);
        return;
    }
    for (int l = 0; l < L; l++) {
        if (!job->resume.done[l] || (l > 0 && job->resume.done[l - 1]))
            continue;
        int end = l;
        while (end + 1 < L && job->resume.done[end + 1])
            end++;
        const size_t used = strlen(text);
        if (used + 24 < sizeof(text))
            snprintf(text + used, sizeof(text) - used, used ? ", %d" : "%d", l);
        if (end > l && strlen(text) + 12 < sizeof(text))
            snprintf(text + strlen(text), sizeof(text) - strlen(text), "-%d", end);
    }
    mxq_log(ctx, MXQ_LOG_INFO, "resuming the run in %s: %d of %d layers from its records (%s), %d to quantize",
            job->out_dir, job->resume.n_done, L, text[0] ? text : "none", L - job->resume.n_done);
}

/* The first layer a resumed run quantizes (n_layers: none). */
static int first_undone(const quantize_job *job)
{
    int l = 0;
    while (job->resume.done && l < job->cfg.n_layers && job->resume.done[l])
        l++;
    return l;
}

/* --resume with a store: the killed run's, if it holds the first undone
 * layer's inputs whole; the group then starts there (hooks.start). A
 * sequential run cannot go on without it. Collective. */
static mxq_status reopen_store(mxq_ctx *ctx, quantize_job *job, const mxq_act_store_info *info, int *found)
{
    mxq_status status = MXQ_OK;
    const int L = job->cfg.n_layers, from = first_undone(job), want = from < L ? from : L - 1;
    const int seq = job->recipe.calib_mode == MXQ_CALIB_SEQUENTIAL;
    *found = 0;
    if (from == 0)
        return MXQ_OK;
    int start = -1;
    CALL(ctx, mxq_act_store_reopen(ctx, &job->dist, job->opt->store_activations, &job->inputs, &job->cfg,
                                   job->calib.n_seqs, job->calib.seq_len, info, want, &job->store, &start));
    *found = start >= 0;
    if (!*found)
        mxq_act_store_release(&job->store);
    CHECK_AGREED(ctx, &job->dist, "store.resume", start == want || !seq, MXQ_ERR_ARG,
                 "--resume: no activation store of the run is left next to '%s' with layer %d's inputs whole; a "
                 "sequential run needs it to go on: start over with --force",
                 job->opt->store_activations, want);
    /* fp: the layers from there to `from` are run through, not quantized;
     * every layer recorded and the store whole: nothing is left to run */
    job->hooks.start = !*found ? 0 : from == L && start == L - 1 ? L : start;
    if (job->dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "%s", *found ? "activation store: the one the run to resume left, taken over"
                                                : "activation store: none usable left by the run to resume; a new one");
fail:
    return status;
}

/* --store-activations: the file, created by all ranks (collective), or
 * the one of the run a resumed run continues. */
static mxq_status open_store(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    int found = 0;
    const mxq_act_store_info info = {job->model_dir, job->calib_path,
                                     job->recipe.calib_mode == MXQ_CALIB_FP ? "fp" : "sequential", job->resume.job};
    if (job->dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "activation store: %s (%d layers x %d x %d x %d float32, %.2f GB)",
                job->opt->store_activations, job->cfg.n_layers, job->calib.n_seqs, job->calib.seq_len, job->cfg.hidden,
                store_bytes(job) / 1e9);
    job->have_store = 1; /* create and reopen leave the store safe to abort whatever happens */
    if (job->opt->resume)
        CALL(ctx, reopen_store(ctx, job, &info, &found));
    /* a resumed run may replace the store the run it continues could; only
     * --force clears temporaries (another job's may be among them) */
    if (!found)
        CALL(ctx, mxq_act_store_create(ctx, &job->dist, job->opt->store_activations, &job->inputs,
                                       job->opt->force || job->opt->resume, job->opt->force, &job->cfg,
                                       job->calib.n_seqs,
                                       job->calib.seq_len, &info, &job->store));
    if (job->opt->resume && job->dist.rank == 0) /* this job's, left by the run it continues and not taken */
        mxq_act_store_remove_temporaries(job->opt->store_activations, &info, job->store.out.temp_path);
fail:
    return status;
}

static mxq_status load_and_quantize(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    AGREE(ctx, &job->dist, "quantize.outdir", job->dist.rank == 0 ? prepare_output(ctx, job) : MXQ_OK);
    CALL(ctx, mxq_resume_share(ctx, &job->dist, job->out_dir, job->cfg.n_layers, &job->resume));
    /* sequential: a layer's inputs come from the ones before it, so only the
     * recorded layers before the first that is not count (a damaged record
     * set aside leaves later ones behind it) */
    for (int l = first_undone(job); job->recipe.calib_mode == MXQ_CALIB_SEQUENTIAL && l < job->cfg.n_layers; l++)
        if (job->resume.done[l]) {
            job->resume.done[l] = 0;
            job->resume.n_done--;
        }
    log_resume(ctx, job);
    AGREE(ctx, &job->dist, "quantize.load", open_and_load(ctx, job));
    job->hooks = (mxq_layer_hooks){.done = job->resume.done, .record = records_layers(job) ? record_layer : NULL,
                                   .user = job};
    if (job->opt->store_activations)
        CALL(ctx, open_store(ctx, job));
    double t_quant = mxq_time_now();
    CALL(ctx, mxq_quantize_model_in_memory(ctx, &job->dist, job->model, &job->calib, job->calib_path, &job->recipe,
                                           job->batch, job->data_parallel, job->opt->stats_layers,
                                           job->grid_min_inputs, job->have_store ? &job->store : NULL, &job->hooks,
                                           job->results));
    job->quant_seconds = mxq_time_now() - t_quant;
fail:
    return status;
}

/* Only renames (everything is written): shards first (every rank), then
 * the report and config.json, the index last (rank 0). */
static mxq_status commit(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    const int rank0 = job->dist.rank == 0;
    AGREE(ctx, &job->dist, "quantize.commit.begin", rank0 ? mxq_ckpt_dir_begin_commit(ctx, &job->out) : MXQ_OK);
    AGREE(ctx, &job->dist, "quantize.commit.shards", mxq_output_commit(ctx, &job->shard_out));
    AGREE(ctx, &job->dist, "quantize.commit.report", rank0 ? mxq_quantize_report_commit(ctx, &job->report) : MXQ_OK);
    /* the store last before the index: a run that fails leaves neither */
    if (job->have_store)
        CALL(ctx, mxq_act_store_commit(ctx, &job->dist, &job->store));
    /* The commit point: once the index is in place nothing is left to fail,
     * so the last agreement is on its rename alone (no fault injection). */
    AGREE(ctx, &job->dist, NULL, rank0 ? mxq_output_commit(ctx, &job->report.index) : MXQ_OK);
    /* the checkpoint is complete: what is left of an earlier run goes */
    if (rank0 && mxq_ckpt_dir_finish(ctx, &job->out, &job->inputs) != MXQ_OK) {
        mxq_log(ctx, MXQ_LOG_WARN, "the checkpoint is complete, but: %s", mxq_error_message(ctx));
        mxq_error_clear(ctx);
    }
    if (rank0)
        mxq_resume_remove(ctx, &job->resume);
    if (rank0)
        mxq_log(ctx, MXQ_LOG_INFO,
                "wrote %s: %d shard%s, model.safetensors.index.json, config.json, " REPORT_NAME " (%.1f s total)",
                job->out_dir, job->dist.size, job->dist.size == 1 ? "" : "s", mxq_time_now() - job->t_start);
fail:
    return status;
}

static mxq_plan_input plan_input(const quantize_job *job)
{
    const int batch = job->batch < job->calib.n_seqs ? job->batch : job->calib.n_seqs;
    return (mxq_plan_input){.cfg = &job->cfg,
                            .recipe = &job->recipe,
                            .first = job->first,
                            .size = job->dist.size,
                            .data_parallel = job->data_parallel,
                            .batch = batch,
                            .seq_len = job->calib.seq_len,
                            .samples = job->calib.n_seqs,
                            .stats_layers = job->opt->stats_layers,
                            .grid_min_inputs = job->grid_min_inputs};
}

/* --group-size, or when not given: a pipeline (exact for any rank count)
 * if its plan fits the memory a rank has, else one data-parallel group of
 * all ranks (of one, too: layer by layer). Sequential calibration and
 * --stats-layers are pipelines. Collective. */
/* The largest planned peak over the ranks, and the rank with it. */
static double plan_peak(const quantize_job *job, int *rank)
{
    const mxq_plan_input in = plan_input(job);
    double peak = 0;
    for (int r = 0; r < job->dist.size; r++) {
        mxq_rank_plan plan;
        mxq_quantize_plan_rank(&in, r, &plan);
        if (plan.total > peak) {
            peak = plan.total;
            *rank = r;
        }
    }
    return peak;
}

/* A plan beyond the memory a rank has is said before the work, not found
 * by the kernel's OOM killer hours into it. */
static void warn_if_too_big(mxq_ctx *ctx, const quantize_job *job)
{
    int rank = 0;
    const double peak = plan_peak(job, &rank);
    if (job->dist.rank == 0 && job->mem_per_rank > 0 && peak > job->mem_per_rank)
        mxq_log(ctx, MXQ_LOG_WARN,
                "the plan needs %.0f MB on rank %d, more than the %.0f MB a rank has here: the run would likely be "
                "killed; spread the ranks over more nodes%s",
                peak / 1048576.0, rank, job->mem_per_rank / 1048576.0,
                job->data_parallel ? "" : ", or let mxq pick a data-parallel group (no --group-size 1 or --stats-layers)");
}

/* --grid-min-inputs, or by default the smallest input count among the
 * linears whose GPTQ on one rank (float32 weights, error feedback and
 * reference copy, the factor in double) would take more than a quarter of
 * a rank's memory: llama-2-70b's down_proj with 12 GB a rank, not 7b's. */
static int grid_threshold(const quantize_job *job)
{
    if (job->recipe.calib_mode == MXQ_CALIB_SEQUENTIAL) /* its group spreads a layer's inputs instead */
        return 0;
    if (job->opt->grid_min_inputs != 0)
        return job->opt->grid_min_inputs > 0 ? job->opt->grid_min_inputs : 0;
    int threshold = 0;
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out, in;
        mxq_linear_shape(&job->cfg, (mxq_linear_id)li, &out, &in);
        const double bytes = 3.0 * out * in * sizeof(float) + (double)in * in * sizeof(double);
        if (job->mem_per_rank > 0 && bytes > 0.25 * job->mem_per_rank && (threshold == 0 || in < threshold))
            threshold = in;
    }
    return threshold;
}

/* An explicit --grid-min-inputs outside a group of several ranks says so. */
static void warn_grid_unused(mxq_ctx *ctx, const quantize_job *job)
{
    if (job->opt->grid_min_inputs > 0 &&
        !(job->data_parallel && job->dist.size > 1 && job->recipe.calib_mode == MXQ_CALIB_FP) && job->dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_WARN,
                "--grid-min-inputs applies to a data-parallel group of 2 or more ranks (--group-size, fp mode); "
                "GPTQ runs on each layer's owner here");
}

/* Sequential mode as a pipeline of several ranks runs them one after the
 * other: a user who wants speed should hear of the group. */
static void hint_sequential_group(mxq_ctx *ctx, const quantize_job *job)
{
    if (job->recipe.calib_mode == MXQ_CALIB_SEQUENTIAL && !job->data_parallel && job->dist.size > 1 &&
        job->dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO,
                "sequential calibration as a pipeline: the %d ranks take turns; --group-size %d spreads every layer "
                "over them instead (faster, and the last bits then depend on the rank count)",
                job->dist.size, job->dist.size);
}

static mxq_status choose_group(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    int rank = 0;
    if (job->opt->mem_per_rank > 0)
        job->mem_per_rank = job->opt->mem_per_rank; /* the same on every rank: the same choice */
    else
        CALL(ctx, mxq_memory_per_rank(ctx, &job->dist, &job->mem_per_rank));
    job->grid_min_inputs = grid_threshold(job);
    job->data_parallel = job->opt->group_size > 1 || !job->first || job->opt->store_activations;
    if (!job->first && job->dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO, "%d ranks for %d layers: no pipeline of layer ranges, one data-parallel group",
                job->dist.size, job->cfg.n_layers);
    if (job->opt->group_size > 0 || job->opt->stats_layers > 0 || !job->first || job->opt->store_activations) {
        warn_if_too_big(ctx, job);
        warn_grid_unused(ctx, job);
        hint_sequential_group(ctx, job);
        return MXQ_OK;
    }
    const double peak = plan_peak(job, &rank);
    job->data_parallel = job->mem_per_rank > 0 && peak > 0.9 * job->mem_per_rank;
    warn_if_too_big(ctx, job);
    warn_grid_unused(ctx, job);
    hint_sequential_group(ctx, job);
    if (job->data_parallel && job->dist.rank == 0)
        mxq_log(ctx, MXQ_LOG_INFO,
                "a pipeline of layer ranges would need %.0f MB on a rank, which has %.0f MB: the %d rank%s work%s as one "
                "data-parallel group, layer by layer",
                peak / 1048576.0, job->mem_per_rank / 1048576.0, job->dist.size, job->dist.size == 1 ? "" : "s",
                job->dist.size == 1 ? "s" : "");
fail:
    return status;
}

/* Rank 0: the report, config.json and the index, written but not in place. */
static mxq_status build_report(mxq_ctx *ctx, quantize_job *job, const double *seconds)
{
    mxq_status status = MXQ_OK;
    const int size = job->dist.size;
    job->report.predicted_rss = calloc((size_t)size, sizeof(double));
    CHECK_ALLOC(ctx, job->report.predicted_rss, (size_t)size * sizeof(double), "the memory plan");
    const mxq_plan_input in = plan_input(job);
    job->report.group_size = job->data_parallel ? size : 1;
    job->report.inputs = job->fingerprint;
    job->report.grid_min_inputs = job->data_parallel && size > 1 ? job->grid_min_inputs : 0;
    for (int r = 0; r < size; r++) {
        mxq_rank_plan plan;
        mxq_quantize_plan_rank(&in, r, &plan);
        job->report.predicted_rss[r] = plan.total;
    }
    CALL(ctx, mxq_quantize_report_build(ctx, &job->report, &job->recipe, &job->cfg, job->model_dir, job->calib_path,
                                        job->recipe_path, seconds));
    CALL(ctx, mxq_quantize_report_stage(ctx, &job->report, job->out_dir, &job->inputs));
fail:
    return status;
}

/* Everything after the checks: calibrate, quantize, write, commit. */
static mxq_status write_checkpoint(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, load_and_quantize(ctx, job));
    double t_write = mxq_time_now();
    AGREE(ctx, &job->dist, "quantize.shard.write", write_shard(ctx, job));
    CALL(ctx, mxq_quantize_report_gather(ctx, &job->dist, &job->report, job->packed_report, job->packed_len));
    const double seconds[3] = {job->quant_seconds, mxq_time_now() - t_write, mxq_time_now() - job->t_start};
    AGREE(ctx, &job->dist, "quantize.report", job->dist.rank == 0 ? build_report(ctx, job, seconds) : MXQ_OK);
    CALL(ctx, commit(ctx, job));
fail:
    return status;
}

/* Rank 0, --dry-run: the plan printed, and with --json written for scripts
 * (under a temporary name, renamed when whole). */
static mxq_status dry_run_output(mxq_ctx *ctx, quantize_job *job)
{
    mxq_status status = MXQ_OK;
    mxq_output out = {.fd = -1};
    const mxq_plan_input in = plan_input(job);
    json_t *plan = NULL;
    mxq_quantize_print_plan(ctx, &in, job->mem_per_rank);
    if (job->opt->store_activations)
        mxq_print(ctx, "activation store: %s, %d layers x %d x %d x %d float32 = %.2f GB, written by the group\n",
                  job->opt->store_activations, job->cfg.n_layers, job->calib.n_seqs, job->calib.seq_len,
                  job->cfg.hidden, store_bytes(job) / 1e9);
    if (!job->opt->plan_json)
        return MXQ_OK;
    plan = mxq_quantize_plan_json(&in, job->mem_per_rank);
    CHECK_ALLOC(ctx, plan, 1, "the plan's JSON");
    out.is_ours = mxq_json_file_is_ours, out.ours_mark = MXQ_VERSION_MARK " key"; /* at begin and at the commit */
    CALL_IN(ctx, mxq_json_write_temp(ctx, plan, job->opt->plan_json, &job->inputs, &out), "--json");
    CALL_IN(ctx, mxq_output_commit(ctx, &out), "--json");
fail:
    mxq_output_abort(&out);
    json_decref(plan);
    return status;
}

/* After a failure, on every rank: each removes its own temporary, the
 * store's temporary stays for --resume (every run with a store records its
 * layers), then rank 0 tidies the directory: records of no layer go, and
 * with them this run's store temporary (never another run's), then what
 * mxq_ckpt_dir_abandon says. */
static void abandon(mxq_ctx *ctx, quantize_job *job)
{
    char *store_temp = NULL;
    mxq_output_abort(&job->shard_out);
    if (job->have_store && job->store.out.temp_path)
        store_temp = strdup(job->store.out.temp_path); /* rank 0's: the file this run wrote */
    if (job->have_store) /* collective: every rank is here */
        mxq_act_store_keep(&job->store);
    mxq_quantize_report_abort(&job->report);
    /* not CALL_MPI: already past the fail label; it aborts the job too */
    const int mpi_rc = MPI_Barrier(job->dist.comm);
    if (mpi_rc != MPI_SUCCESS)
        mxq_mpi_fatal(ctx, job->dist.comm, mpi_rc, __FILE__, __LINE__, "MPI_Barrier before tidying the output");
    if (job->dist.rank == 0 && !mxq_resume_abandon(ctx, &job->resume) && store_temp)
        unlink(store_temp); /* nothing to resume from it */
    mxq_ckpt_dir_abandon(&job->out);
    free(store_temp);
}

static void quantize_job_free(quantize_job *job)
{
    mxq_resume_free(&job->resume);
    json_decref(job->fingerprint);
    if (job->have_store)
        mxq_act_store_release(&job->store);
    mxq_quantize_report_free(&job->report);
    free(job->packed_report);
    mxq_output_abort(&job->shard_out);
    mxq_ckpt_dir_free(&job->out);
    shard_list_free(&job->shard);
    mxq_checkpoint_close(job->ckpt);
    mxq_tokens_free(&job->calib);
    mxq_layer_results_free(job->results, job->n_local);
    mxq_model_free(job->model);
    free(job->first);
    if (job->have_recipe)
        mxq_recipe_free(&job->recipe);
    mxq_input_set_free(&job->inputs);
    mxq_dist_free(&job->dist);
}

mxq_status mxq_quantize(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *calib_path,
                        const char *recipe_path, const char *out_dir, const mxq_quantize_options *options)
{
    mxq_status status = MXQ_OK;
    quantize_job job = {.dist = {.comm = MPI_COMM_NULL},
                        .shard_out = {.fd = -1},
                        .store = {.file = -1, .out = {.fd = -1}}};
    job.report.index.fd = -1;
    job.model_dir = model_dir;
    job.calib_path = calib_path;
    job.recipe_path = recipe_path;
    job.out_dir = out_dir;
    job.opt = options;
    job.batch = options->batch > 0 ? options->batch : 8;
    job.t_start = mxq_time_now();
    CALL(ctx, mxq_dist_create(ctx, comm, &job.dist));
    AGREE(ctx, &job.dist, "quantize.setup", setup(ctx, &job));
    CALL(ctx, choose_group(ctx, &job));
    if (options->dry_run)
        AGREE(ctx, &job.dist, "quantize.plan", job.dist.rank == 0 ? dry_run_output(ctx, &job) : MXQ_OK);
    if (!options->dry_run)
        CALL(ctx, write_checkpoint(ctx, &job));
fail:
    /* Every failure after mxq_dist_create is agreed (or aborts the job), so
     * every rank is here: once each has removed its own temporary, rank 0
     * tidies the directory (mxq_ckpt_dir_abandon says how). */
    if (status != MXQ_OK && job.dist.comm != MPI_COMM_NULL)
        abandon(ctx, &job);
    quantize_job_free(&job);
    return status;
}
