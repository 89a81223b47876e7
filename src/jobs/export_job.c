/* mxq export --to gguf: a checkpoint (an mxq MX one, or a Hugging Face FP
 * one) as a GGUF file that llama.cpp runs, with no value changed: MX
 * weights become Q4_0, Q8_0 or MXFP4 blocks holding the same values, or
 * BF16 where no block type can (formats/mx_ggml.h); other tensors keep their
 * F32/F16/BF16 bytes. q_proj and k_proj rows go from the Hugging Face
 * rotate-half order to the interleaved order of llama.cpp's llama
 * architecture. One tensor at a time, from the mapped checkpoint, into a
 * temporary file renamed into place when complete. */
#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/check.h"
#include "formats/mx_ggml.h"
#include "io/fsutil.h"
#include "io/gguf.h"
#include "jobs/export_vocab.h"
#include "model/rope.h"
#include "mxq/jobs.h"
#include "mxq/safetensors.h"

/* One tensor of the GGUF and where it comes from. */
typedef struct {
    char name[64];       /* llama.cpp's: "blk.3.attn_q.weight" */
    char source[128];    /* the checkpoint's: "model.layers.3.self_attn.q_proj" (+".weight" unless mx) */
    int mx;              /* stored as <source>.weight_packed + .weight_scale */
    int heads;           /* > 0: rows permuted from rotate-half order, this many heads */
    int64_t rows, cols;  /* [rows, cols]; 1-D tensors have rows 1 */
    mxq_ggml_type type;
    const char *why_bf16; /* a fallback's reason, or NULL */
    const float *values;  /* [cols] computed here (rope_freqs), not read from the checkpoint */
} export_tensor;

static const struct {
    const char *gguf;
    mxq_linear_id id;
} linear_names[] = {
    {"attn_q", MXQ_LIN_Q},    {"attn_k", MXQ_LIN_K},  {"attn_v", MXQ_LIN_V},      {"attn_output", MXQ_LIN_O},
    {"ffn_gate", MXQ_LIN_GATE}, {"ffn_up", MXQ_LIN_UP}, {"ffn_down", MXQ_LIN_DOWN},
};

/* A float tensor keeps its type; 1-D ones (norms) become F32, as
 * llama.cpp's converter writes them: some ggml backends multiply by F32
 * only. */
static mxq_status plain_type(mxq_ctx *ctx, const mxq_tensor_view *v, int64_t rows, mxq_ggml_type *type)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, v->dtype == MXQ_DT_F32 || v->dtype == MXQ_DT_F16 || v->dtype == MXQ_DT_BF16, MXQ_ERR_FORMAT,
          "%s: tensor '%s' is %s; the GGUF export takes F32, F16 or BF16", v->file, v->name, mxq_dtype_name(v->dtype));
    *type = rows == 1 || v->dtype == MXQ_DT_F32 ? MXQ_GGML_F32 : v->dtype == MXQ_DT_F16 ? MXQ_GGML_F16 : MXQ_GGML_BF16;
fail:
    return status;
}

/* Whether every block of an MX linear can be a ggml block (no NaN scale;
 * for Q4_0/Q8_0 its d an f16, or all its codes zero): the codes are read
 * to tell. */
static mxq_status blocks_fit(mxq_ctx *ctx, const mxq_mx_spec *spec, const mxq_tensor_view *packed,
                             const mxq_tensor_view *scales, const export_tensor *t, int *fit)
{
    mxq_status status = MXQ_OK;
    const size_t cols = (size_t)t->cols, row_bytes = mxq_mx_packed_row_bytes(spec->format, cols);
    const size_t blocks = mxq_mx_blocks_per_row(cols, spec->block);
    uint8_t *codes = malloc(cols);
    CHECK_ALLOC(ctx, codes, cols, "a row of codes");
    CHECK(ctx, packed->nbytes == (size_t)t->rows * row_bytes && scales->nbytes == (size_t)t->rows * blocks,
          MXQ_ERR_FORMAT, "%s: '%s' and its scales are not those of [%lld, %lld]", packed->file, packed->name,
          (long long)t->rows, (long long)t->cols);
    *fit = 1;
    for (int64_t r = 0; r < t->rows && *fit; r++) {
        const uint8_t *s = (const uint8_t *)scales->data + (size_t)r * blocks;
        mxq_mx_unpack_row(spec->format, (const uint8_t *)packed->data + (size_t)r * row_bytes, cols, codes);
        for (size_t b = 0; b < cols / MXQ_GGML_BLOCK && *fit; b++)
            *fit = mxq_mx_ggml_block_fits(spec->format, codes + b * MXQ_GGML_BLOCK,
                                          (int)s[b * MXQ_GGML_BLOCK / (size_t)spec->block] - 127);
    }
fail:
    free(codes);
    return status;
}

/* The block type an MX linear becomes, or BF16 with the reason. */
static mxq_status choose_mx_type(mxq_ctx *ctx, const mxq_model_config *cfg, mxq_checkpoint *ckpt,
                                 const mxq_tensor_view *scales, export_tensor *t)
{
    mxq_status status = MXQ_OK;
    const mxq_mx_spec *spec = &cfg->mx_weight_spec;
    const mxq_format *f = spec->format;
    const mxq_tensor_view *packed = NULL;
    char name[160];
    int fit = 0;
    t->type = MXQ_GGML_BF16;
    if (f->id == MXQ_MXFP6_E3M2 || f->id == MXQ_MXFP6_E2M3 || f->id == MXQ_MXFP8_E4M3 || f->id == MXQ_MXFP8_E5M2)
        return MXQ_OK; /* no ggml block type holds them: BF16 by the table, not a fallback */
    if (!mxq_mx_ggml_blocks_fit((size_t)t->cols, spec->block)) {
        t->why_bf16 = "rows are not whole blocks of 32";
        return MXQ_OK;
    }
    snprintf(name, sizeof(name), "%s.weight_packed", t->source);
    CALL(ctx, mxq_checkpoint_get(ctx, ckpt, name, &packed));
    CALL(ctx, blocks_fit(ctx, spec, packed, scales, t, &fit));
    if (fit)
        t->type = f->id == MXQ_MXFP4_E2M1 ? MXQ_GGML_MXFP4 : f->id == MXQ_MXINT8 ? MXQ_GGML_Q8_0 : MXQ_GGML_Q4_0;
    else
        t->why_bf16 = f->id == MXQ_MXFP4_E2M1 ? "a block's scale is NaN" : "a block's scale is NaN or outside f16";
fail:
    return status;
}

/* A linear of layer l into t: its source, shape and type. */
static mxq_status plan_linear(mxq_ctx *ctx, const mxq_model_config *cfg, mxq_checkpoint *ckpt, int l, int which,
                              export_tensor *t)
{
    mxq_status status = MXQ_OK;
    const mxq_linear_id id = linear_names[which].id;
    int out, in;
    mxq_linear_shape(cfg, id, &out, &in);
    snprintf(t->name, sizeof(t->name), "blk.%d.%s.weight", l, linear_names[which].gguf);
    snprintf(t->source, sizeof(t->source), "model.layers.%d.%s", l, mxq_linear_name(id));
    t->rows = out, t->cols = in;
    t->heads = id == MXQ_LIN_Q ? cfg->n_heads : id == MXQ_LIN_K ? cfg->n_kv_heads : 0;
    char name[144];
    const mxq_tensor_view *v = NULL;
    snprintf(name, sizeof(name), "%s.weight_scale", t->source);
    CALL(ctx, mxq_checkpoint_lookup(ctx, ckpt, name, &v));
    t->mx = v != NULL;
    if (t->mx) {
        CALL(ctx, choose_mx_type(ctx, cfg, ckpt, v, t));
    } else {
        const size_t len = strlen(t->source);
        snprintf(t->source + len, sizeof(t->source) - len, ".weight");
        CALL(ctx, mxq_checkpoint_get(ctx, ckpt, t->source, &v));
        CALL(ctx, plain_type(ctx, v, t->rows, &t->type));
    }
fail:
    return status;
}

static mxq_status plan_plain(mxq_ctx *ctx, mxq_checkpoint *ckpt, const char *gguf, const char *source, int64_t rows,
                             int64_t cols, export_tensor *t)
{
    mxq_status status = MXQ_OK;
    const mxq_tensor_view *v = NULL;
    CALL(ctx, mxq_checkpoint_get(ctx, ckpt, source, &v));
    snprintf(t->name, sizeof(t->name), "%s", gguf);
    snprintf(t->source, sizeof(t->source), "%s", source);
    t->rows = rows, t->cols = cols;
    CALL(ctx, plain_type(ctx, v, rows, &t->type));
fail:
    return status;
}

/* Llama-3 rope scaling as llama.cpp takes it: a rope_freqs tensor of
 * divisors [head_dim / 2], one per frequency. */
static mxq_status rope_divisors(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, float **out)
{
    mxq_status status = MXQ_OK;
    const size_t half = (size_t)cfg->head_dim / 2;
    float *divisors = calloc(half, sizeof(float));
    CHECK_ALLOC(ctx, divisors, half * sizeof(float), "the rope frequency divisors");
    mxq_rope_llama3_divisors(cfg, divisors);
    for (size_t i = 0; i < half; i++)
        CHECK(ctx, isfinite(divisors[i]) && divisors[i] >= FLT_MIN, MXQ_ERR_FORMAT,
              "%s/config.json: rope_scaling factor %g gives frequency %zu a divisor of %g in float32, which "
              "llama.cpp cannot use",
              dir, cfg->rope_factor, i, (double)divisors[i]);
    *out = divisors, divisors = NULL;
fail:
    free(divisors);
    return status;
}

/* Every tensor of the GGUF in llama.cpp's order; *n gets their count.
 * `rope_freqs` (Llama-3 rope scaling's divisors, or NULL) becomes a tensor. */
static mxq_status export_plan(mxq_ctx *ctx, const mxq_model_config *cfg, mxq_checkpoint *ckpt, const float *rope_freqs,
                              export_tensor **out, size_t *n)
{
    mxq_status status = MXQ_OK;
    /* embedding, output norm, rope_freqs if any, 9 per layer, output if untied */
    const size_t count = 3 + (size_t)cfg->n_layers * 9 + (cfg->tie_embeddings ? 0 : 1);
    export_tensor *t = calloc(count, sizeof(*t));
    size_t k = 0;
    CHECK_ALLOC(ctx, t, count * sizeof(*t), "the export plan");
    if (rope_freqs) {
        snprintf(t[k].name, sizeof(t[k].name), "rope_freqs.weight");
        snprintf(t[k].source, sizeof(t[k].source), "(Llama-3 rope scaling of config.json)");
        t[k].rows = 1, t[k].cols = cfg->head_dim / 2, t[k].type = MXQ_GGML_F32, t[k].values = rope_freqs;
        k++;
    }
    CALL(ctx, plan_plain(ctx, ckpt, "token_embd.weight", "model.embed_tokens.weight", cfg->vocab, cfg->hidden, &t[k++]));
    for (int l = 0; l < cfg->n_layers; l++) {
        char gguf[64], source[128];
        snprintf(gguf, sizeof(gguf), "blk.%d.attn_norm.weight", l);
        snprintf(source, sizeof(source), "model.layers.%d.input_layernorm.weight", l);
        CALL(ctx, plan_plain(ctx, ckpt, gguf, source, 1, cfg->hidden, &t[k++]));
        for (int w = 0; w < 4; w++)
            CALL_IN(ctx, plan_linear(ctx, cfg, ckpt, l, w, &t[k++]), "layer %d", l);
        snprintf(gguf, sizeof(gguf), "blk.%d.ffn_norm.weight", l);
        snprintf(source, sizeof(source), "model.layers.%d.post_attention_layernorm.weight", l);
        CALL(ctx, plan_plain(ctx, ckpt, gguf, source, 1, cfg->hidden, &t[k++]));
        for (int w = 4; w < 7; w++)
            CALL_IN(ctx, plan_linear(ctx, cfg, ckpt, l, w, &t[k++]), "layer %d", l);
    }
    CALL(ctx, plan_plain(ctx, ckpt, "output_norm.weight", "model.norm.weight", 1, cfg->hidden, &t[k++]));
    if (!cfg->tie_embeddings)
        CALL(ctx, plan_plain(ctx, ckpt, "output.weight", "lm_head.weight", cfg->vocab, cfg->hidden, &t[k++]));
    *out = t, *n = k;
    return MXQ_OK;
fail:
    free(t);
    return status;
}

/* ---- metadata ------------------------------------------------------------ */

static mxq_status write_hyperparameters(mxq_ctx *ctx, mxq_gguf *g, const mxq_model_config *cfg, const char *name)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_gguf_kv_string(ctx, g, "general.architecture", "llama"));
    char base[MXQ_PATH_BUF];
    snprintf(base, sizeof(base), "%s", name);
    for (size_t len = strlen(base); len > 1 && base[len - 1] == '/'; len--)
        base[len - 1] = '\0'; /* "ckpt/" is "ckpt" */
    const char *slash = strrchr(base, '/');
    CALL(ctx, mxq_gguf_kv_string(ctx, g, "general.name", slash && slash[1] ? slash + 1 : base));
    CALL(ctx, mxq_gguf_kv_string(ctx, g, MXQ_GGUF_VERSION_KEY, MXQ_VERSION)); /* marks the file as mxq's to replace */
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "general.alignment", MXQ_GGUF_ALIGNMENT));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.context_length", (uint32_t)cfg->max_positions));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.embedding_length", (uint32_t)cfg->hidden));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.block_count", (uint32_t)cfg->n_layers));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.feed_forward_length", (uint32_t)cfg->intermediate));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.attention.head_count", (uint32_t)cfg->n_heads));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.attention.head_count_kv", (uint32_t)cfg->n_kv_heads));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.attention.key_length", (uint32_t)cfg->head_dim));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.attention.value_length", (uint32_t)cfg->head_dim));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.rope.dimension_count", (uint32_t)cfg->head_dim));
    CALL(ctx, mxq_gguf_kv_f32(ctx, g, "llama.rope.freq_base", (float)cfg->rope_theta));
    CALL(ctx, mxq_gguf_kv_f32(ctx, g, "llama.attention.layer_norm_rms_epsilon", (float)cfg->rms_eps));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "llama.vocab_size", (uint32_t)cfg->vocab));
fail:
    return status;
}

/* ---- tensor data --------------------------------------------------------- */

/* Row r of the GGUF tensor comes from this row of the source: q_proj and
 * k_proj rows go from rotate-half order (within a head: the first halves
 * of the pairs, then the second halves) to interleaved pairs. */
static int64_t source_row(const export_tensor *t, int64_t r)
{
    if (t->heads <= 0)
        return r;
    const int64_t head_dim = t->rows / t->heads, h = r / head_dim, within = r % head_dim;
    return h * head_dim + (within % 2) * (head_dim / 2) + within / 2;
}

/* One MX row converted into `out` (the GGUF row's bytes); 0 if a value
 * could not be kept exactly (the plan said it could: a bug). */
static int convert_mx_row(const mxq_model_config *cfg, const export_tensor *t, const uint8_t *packed,
                           const uint8_t *scales, uint8_t *codes, uint8_t *out)
{
    const mxq_mx_spec *spec = &cfg->mx_weight_spec;
    const size_t cols = (size_t)t->cols;
    mxq_mx_unpack_row(spec->format, packed, cols, codes);
    switch (t->type) {
    case MXQ_GGML_Q4_0: return mxq_mx_row_to_q4_0(spec->format, codes, scales, cols, spec->block, out);
    case MXQ_GGML_Q8_0: return mxq_mx_row_to_q8_0(spec->format, codes, scales, cols, spec->block, out);
    case MXQ_GGML_MXFP4: return mxq_mx_row_to_mxfp4(codes, scales, cols, spec->block, out);
    default: return mxq_mx_row_to_bf16(spec->format, codes, scales, cols, spec->block, (uint16_t *)out);
    }
}

static mxq_status write_tensor(mxq_ctx *ctx, const mxq_model_config *cfg, mxq_checkpoint *ckpt, mxq_gguf *g,
                               mxq_output *out, const export_tensor *t)
{
    mxq_status status = MXQ_OK;
    const size_t row_bytes = mxq_ggml_row_bytes(t->type, t->cols);
    uint8_t *row = malloc(row_bytes), *codes = malloc((size_t)t->cols);
    const mxq_tensor_view *data = NULL, *scales = NULL;
    char name[256];
    CHECK_ALLOC(ctx, row && codes, row_bytes + (size_t)t->cols, "a row of the export");
    if (t->mx)
        snprintf(name, sizeof(name), "%s.weight_packed", t->source);
    else
        snprintf(name, sizeof(name), "%s", t->source);
    CALL(ctx, mxq_checkpoint_get(ctx, ckpt, name, &data));
    if (t->mx) {
        snprintf(name, sizeof(name), "%s.weight_scale", t->source);
        CALL(ctx, mxq_checkpoint_get(ctx, ckpt, name, &scales));
    }
    const size_t src_row = t->mx ? mxq_mx_packed_row_bytes(cfg->mx_weight_spec.format, (size_t)t->cols)
                                 : (size_t)t->cols * mxq_dtype_size(data->dtype);
    const size_t scale_row = t->mx ? mxq_mx_blocks_per_row((size_t)t->cols, cfg->mx_weight_spec.block) : 0;
    CHECK(ctx, data->nbytes == (size_t)t->rows * src_row && (!scales || scales->nbytes == (size_t)t->rows * scale_row),
          MXQ_ERR_FORMAT, "%s: tensor '%s' has %zu bytes, not those of [%lld, %lld]", data->file, data->name,
          data->nbytes, (long long)t->rows, (long long)t->cols);
    for (int64_t r = 0; r < t->rows; r++) {
        const int64_t s = source_row(t, r);
        const uint8_t *src = (const uint8_t *)data->data + (size_t)s * src_row;
        if (t->mx)
            CHECK(ctx, convert_mx_row(cfg, t, src, (const uint8_t *)scales->data + (size_t)s * scale_row, codes, row),
                  MXQ_ERR_FORMAT, "row %lld of '%s' cannot be written exactly as %s", (long long)s, t->source,
                  mxq_ggml_type_name(t->type));
        else if (t->rows == 1 && data->dtype != MXQ_DT_F32)
            CALL(ctx, mxq_tensor_to_f32(ctx, data, data->rank, data->shape, (float *)row));
        else
            memcpy(row, src, row_bytes);
        CALL(ctx, mxq_gguf_write_data(ctx, g, out, row, row_bytes));
    }
fail:
    free(row);
    free(codes);
    return status;
}

/* ---- the job ------------------------------------------------------------- */

/* Every file of the checkpoint directory is an input: the export may not
 * replace its report, records or anything else beside the weights. */
static mxq_status add_dir_files(mxq_ctx *ctx, mxq_input_set *inputs, const char *dir)
{
    mxq_status status = MXQ_OK;
    DIR *d = opendir(dir);
    CHECK(ctx, d != NULL, MXQ_ERR_IO, "cannot list '%s': %s", dir, strerror(errno));
    for (struct dirent *e; (e = readdir(d));) {
        char path[MXQ_PATH_BUF];
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        mxq_path_join(path, dir, e->d_name);
        CALL(ctx, mxq_input_set_add(ctx, inputs, path, "a file of the checkpoint"));
    }
fail:
    if (d)
        closedir(d);
    return status;
}

/* The model a checkpoint was quantized from, as its mxq_report.json names
 * it; "" when there is none, or when the path is relative (mxq before 0.6
 * wrote the path as given, relative to a directory it did not record: from
 * here it could name another model). */
static mxq_status source_model(mxq_ctx *ctx, const char *dir, char *model)
{
    mxq_status status = MXQ_OK;
    json_t *report = NULL;
    char report_path[MXQ_PATH_BUF];
    model[0] = '\0';
    mxq_path_join(report_path, dir, "mxq_report.json");
    if (access(report_path, F_OK) != 0)
        return MXQ_OK;
    CALL(ctx, mxq_json_read(ctx, report_path, "run report", &report));
    const char *named = json_string_value(json_object_get(report, "model"));
    if (named && named[0] != '/')
        mxq_log(ctx, MXQ_LOG_WARN,
                "export: %s names its source model by a relative path, '%s' (mxq before 0.6), relative to where "
                "quantize ran: it is not used; give the vocabulary with --tokenizer or --vocab-from",
                report_path, named);
    else if (named)
        snprintf(model, MXQ_PATH_BUF, "%s", named);
fail:
    json_decref(report);
    return status;
}

/* The vocabulary file: the one given, or a tokenizer.bin (llama2.c) or
 * tokenizer.json (Hugging Face) beside the checkpoint, or beside the model
 * the checkpoint was quantized from. */
static mxq_status find_tokenizer(mxq_ctx *ctx, const char *dir, const char *model, const char *given, char *path)
{
    mxq_status status = MXQ_OK;
    static const char *const names[] = {"tokenizer.bin", "tokenizer.json"};
    if (given) {
        snprintf(path, MXQ_PATH_BUF, "%s", given);
        return MXQ_OK;
    }
    for (int where = 0; where < 2; where++)
        for (int i = 0; i < 2; i++) {
            if (where == 1 && !model[0])
                break;
            mxq_path_join(path, where == 0 ? dir : model, names[i]);
            if (access(path, F_OK) == 0)
                return MXQ_OK;
        }
    CHECK(ctx, 0, MXQ_ERR_ARG,
          "no vocabulary for %s: it has no tokenizer.bin (llama2.c) or tokenizer.json%s%s%s; give one with --tokenizer "
          "or --vocab-from (a GGUF needs a vocabulary: llama.cpp aborts on one without)",
          dir, model[0] ? ", nor has '" : "", model,
          model[0] ? "' (the model its report names)" : "");
fail:
    return status;
}

/* What the export may not replace: the checkpoint (every file of its
 * directory), the vocabulary, and the model it was quantized from. */
static mxq_status protect_inputs(mxq_ctx *ctx, mxq_input_set *inputs, const char *dir, const char *model,
                                 const char *vocabulary)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_input_set_add_model(ctx, inputs, dir));
    CALL(ctx, add_dir_files(ctx, inputs, dir));
    CALL(ctx, mxq_input_set_add(ctx, inputs, vocabulary, "vocabulary"));
    if (model[0] && access(model, F_OK) != 0)
        mxq_log(ctx, MXQ_LOG_WARN,
                "export: the model %s was quantized from, '%s', is not found: its files are not protected as inputs",
                dir, model);
    if (model[0] && access(model, F_OK) == 0) {
        CALL(ctx, mxq_input_set_add_model(ctx, inputs, model));
        CALL(ctx, add_dir_files(ctx, inputs, model)); /* its tokenizer files, licence, ... */
    }
fail:
    return status;
}

/* A killed export leaves its temporary (.NAME.tmp-PID-N) beside the
 * output. Another export may still be writing it, perhaps from another
 * node, so it is named, not removed. */
static void warn_stale_temporaries(mxq_ctx *ctx, const char *path)
{
    char dir[MXQ_PATH_BUF];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    const char *name = slash ? slash + 1 : path;
    if (slash)
        *slash = '\0';
    DIR *d = opendir(slash ? (dir[0] ? dir : "/") : ".");
    for (struct dirent *e; d && (e = readdir(d));)
        if (mxq_is_temp_name_of(e->d_name, name))
            mxq_log(ctx, MXQ_LOG_WARN,
                    "export: '%s' beside the output is the temporary of an export that was killed or is still "
                    "running; remove it if none is",
                    e->d_name);
    if (d)
        closedir(d);
}

static mxq_status write_file(mxq_ctx *ctx, const mxq_model_config *cfg, mxq_checkpoint *ckpt, mxq_gguf *g,
                             const export_tensor *t, size_t n, mxq_output *out)
{
    mxq_status status = MXQ_OK;
    for (size_t i = 0; i < n; i++) {
        const int64_t ne[2] = {t[i].cols, t[i].rows};
        CALL(ctx, mxq_gguf_add_tensor(ctx, g, t[i].name, t[i].type, t[i].rows == 1 ? 1 : 2, ne));
    }
    CALL(ctx, mxq_gguf_write_header(ctx, g, out));
    for (size_t i = 0; i < n; i++) {
        CALL(ctx, mxq_fault_point(ctx, "export.tensor")); /* a stop signal: the temporary file goes */
        if (t[i].values)
            CALL_IN(ctx, mxq_gguf_write_data(ctx, g, out, t[i].values, (size_t)t[i].cols * sizeof(float)), "tensor %s",
                    t[i].name);
        else
            CALL_IN(ctx, write_tensor(ctx, cfg, ckpt, g, out, &t[i]), "tensor %s", t[i].name);
        if ((i + 1) % 64 == 0 || i + 1 == n)
            mxq_log(ctx, MXQ_LOG_INFO, "export: %zu/%zu tensors", i + 1, n);
    }
    CALL(ctx, mxq_gguf_finish(ctx, g));
fail:
    return status;
}

static void summarize(mxq_ctx *ctx, const mxq_model_config *cfg, const export_tensor *t, size_t n,
                      mxq_export_result *res)
{
    memset(res, 0, sizeof(*res));
    res->tensors = (int)n;
    for (size_t i = 0; i < n; i++) {
        if (t[i].why_bf16) {
            if (res->bf16_fallbacks++ < 8)
                mxq_log(ctx, MXQ_LOG_WARN, "export: %s as BF16 (lossless): %s", t[i].name, t[i].why_bf16);
        }
        res->quantized += t[i].mx && t[i].type != MXQ_GGML_BF16;
        res->mx_bf16 += t[i].mx && t[i].type == MXQ_GGML_BF16;
    }
    if (res->bf16_fallbacks > 8)
        mxq_log(ctx, MXQ_LOG_WARN, "export: %d tensors in all as BF16 instead of a block type", res->bf16_fallbacks);
    res->activations_dropped = cfg->mx_acts;
    if (cfg->mx_acts)
        mxq_log(ctx, MXQ_LOG_WARN,
                "export: the checkpoint quantizes activations (%s, block %d); GGUF carries the weights only: llama.cpp "
                "quantizes activations its own way",
                cfg->mx_act_spec.format->name, cfg->mx_act_spec.block);
}

mxq_status mxq_export_gguf(mxq_ctx *ctx, const char *dir, const char *out_path, const mxq_export_options *opt,
                           mxq_export_result *res)
{
    mxq_status status = MXQ_OK;
    mxq_model_config cfg;
    mxq_checkpoint *ckpt = NULL;
    mxq_gguf *g = NULL;
    export_tensor *plan = NULL;
    float *rope_freqs = NULL;
    size_t n = 0;
    mxq_export_vocab v = {0};
    mxq_input_set inputs = {0};
    mxq_output out = {.fd = -1};
    char tokenizer[MXQ_PATH_BUF], model[MXQ_PATH_BUF];
    CALL(ctx, mxq_config_load(ctx, dir, &cfg));
    CHECK(ctx, cfg.arch == MXQ_ARCH_LLAMA && !cfg.qkv_bias && !cfg.o_bias, MXQ_ERR_FORMAT,
          "%s: the GGUF export writes llama.cpp's 'llama' architecture; this model is %s%s", dir,
          mxq_arch_name(cfg.arch), cfg.qkv_bias || cfg.o_bias ? " with attention biases" : "");
    CALL(ctx, mxq_model_check_checkpoint(ctx, dir, &cfg));
    CALL(ctx, source_model(ctx, dir, model));
    if (opt->vocab_from)
        snprintf(tokenizer, sizeof(tokenizer), "%s", opt->vocab_from);
    else
        CALL(ctx, find_tokenizer(ctx, dir, model, opt->tokenizer, tokenizer));
    CALL(ctx, protect_inputs(ctx, &inputs, dir, model, tokenizer));
    mxq_log(ctx, MXQ_LOG_INFO, "export: vocabulary from %s%s", opt->vocab_from ? "--vocab-from " : "", tokenizer);
    warn_stale_temporaries(ctx, out_path); /* before this export makes its own */
    CALL(ctx, mxq_output_begin_ours(ctx, out_path, &inputs, mxq_gguf_file_is_ours, MXQ_GGUF_VERSION_KEY " key-value",
                                    &out));
    if (!opt->vocab_from)
        CALL(ctx, mxq_export_vocab_read(ctx, tokenizer, &cfg, &v));
    CALL(ctx, mxq_checkpoint_open(ctx, dir, &ckpt));
    if (cfg.rope_factor > 0)
        CALL(ctx, rope_divisors(ctx, dir, &cfg, &rope_freqs));
    CALL(ctx, export_plan(ctx, &cfg, ckpt, rope_freqs, &plan, &n));
    CALL(ctx, mxq_gguf_create(ctx, &g));
    CALL(ctx, write_hyperparameters(ctx, g, &cfg, dir));
    if (opt->vocab_from)
        CALL(ctx, mxq_export_vocab_copy(ctx, g, opt->vocab_from, cfg.vocab));
    else
        CALL(ctx, mxq_export_vocab_write(ctx, g, &v, &cfg));
    summarize(ctx, &cfg, plan, n, res);
    CALL(ctx, write_file(ctx, &cfg, ckpt, g, plan, n, &out));
    const off_t end = lseek(out.fd, 0, SEEK_CUR);
    CHECK(ctx, end >= 0, MXQ_ERR_IO, "%s: cannot tell its size", out_path);
    res->bytes = (uint64_t)end;
    CALL(ctx, mxq_output_commit(ctx, &out));
fail:
    mxq_output_abort(&out);
    mxq_gguf_free(g);
    free(plan);
    free(rope_freqs);
    mxq_export_vocab_free(&v);
    mxq_checkpoint_close(ckpt);
    mxq_input_set_free(&inputs);
    return status;
}
