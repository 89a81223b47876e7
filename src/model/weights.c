/* Loading one rank's part of a model from a safetensors checkpoint. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "io/shape_text.h"
#include "io/tensor_views.h"
#include "model/lazy.h"
#include "model/model_internal.h"
#include "model/rope.h"
#include "mxq/model.h"


/* Read tensor `name` of the given shape as float32 into a new buffer. */
static mxq_status load_tensor(mxq_ctx *ctx, mxq_checkpoint *ckpt, const char *name, int rank, int64_t d0, int64_t d1,
                              float **out)
{
    mxq_status status = MXQ_OK;
    const mxq_tensor_view *t;
    float *buf = NULL;
    CALL(ctx, mxq_checkpoint_get(ctx, ckpt, name, &t));
    int64_t shape[2] = {d0, d1};
    size_t n = (size_t)d0 * (size_t)(rank == 2 ? d1 : 1);
    buf = mxq_alloc_floats(n);
    CHECK_ALLOC(ctx, buf, n * sizeof(float), name);
    CALL(ctx, mxq_tensor_to_f32(ctx, t, rank, shape, buf));
    *out = buf;
    return MXQ_OK;
fail:
    free(buf);
    return status;
}

/* A scale byte 0xFF (NaN) or one too large for its elements decodes to
 * NaN or Inf: a corrupt checkpoint, named here rather than as a NaN
 * perplexity later. */
static mxq_status check_decoded(mxq_ctx *ctx, const mxq_tensor_view *packed, const mxq_tensor_view *scales,
                                const mxq_mx_spec *spec, const float *w, size_t out_f, size_t in_f)
{
    mxq_status status = MXQ_OK;
    const size_t blocks = mxq_mx_blocks_per_row(in_f, spec->block);
    for (size_t i = 0; i < out_f * in_f; i++) {
        const size_t row = i / in_f, col = i % in_f;
        CHECK(ctx, isfinite(w[i]), MXQ_ERR_FORMAT,
              "%s: '%s' decodes to %g at [%zu, %zu] (scale byte %u at [%zu, %zu] of '%s'); the checkpoint is corrupt",
              packed->file, packed->name, (double)w[i], row, col,
              ((const uint8_t *)scales->data)[row * blocks + col / (size_t)spec->block], row, col / (size_t)spec->block,
              scales->name);
    }
fail:
    return status;
}

/* Every element code valid for the format, unused bits zero, and no scale
 * byte mxq never writes: 255 (a NaN block: non-finite weights are refused
 * before quantizing) or 0 (2^-127: below the -126 of an all-zero block).
 * A flipped bit is named here, not found as a wrong perplexity. */
static mxq_status check_codes(mxq_ctx *ctx, const mxq_tensor_view *packed, const mxq_tensor_view *scales,
                              const mxq_mx_spec *spec, size_t out_f, size_t in_f)
{
    mxq_status status = MXQ_OK;
    const size_t row_bytes = mxq_mx_packed_row_bytes(spec->format, in_f), blocks = mxq_mx_blocks_per_row(in_f, spec->block);
    uint8_t *codes = malloc(in_f + row_bytes);
    CHECK_ALLOC(ctx, codes, in_f + row_bytes, packed->name);
    for (size_t r = 0; r < out_f; r++) {
        const uint8_t *row = (const uint8_t *)packed->data + r * row_bytes, *scale = (const uint8_t *)scales->data + r * blocks;
        const size_t bad = mxq_mx_check_row(spec->format, row, in_f, codes, codes + in_f);
        CHECK(ctx, bad == (size_t)-1, MXQ_ERR_FORMAT,
              bad < in_f ? "%s: '%s' [%zu, %zu] holds code 0x%x, which is no %s element; the checkpoint is corrupt"
                         : "%s: '%s' row %zu has bits set that no element uses (after column %zu, code 0x%x, %s); the "
                           "checkpoint is corrupt",
              packed->file, packed->name, r, bad < in_f ? bad : in_f - 1, bad < in_f ? codes[bad] : codes[in_f - 1],
              spec->format->name);
        for (size_t b = 0; b < blocks; b++)
            CHECK(ctx, scale[b] != 0 && scale[b] != 255, MXQ_ERR_FORMAT,
                  "%s: '%s' [%zu, %zu] is scale byte %u, which mxq never writes (%s); the checkpoint is corrupt",
                  scales->file, scales->name, r, b, scale[b], scale[b] ? "a NaN block" : "2^-127");
    }
fail:
    free(codes);
    return status;
}

/* An MX linear of an mxq checkpoint: <base>.weight_packed U8 [out, packed
 * row bytes] and <base>.weight_scale U8 [out, blocks], dequantized to float. */
static mxq_status load_mx_linear(mxq_ctx *ctx, mxq_checkpoint *ckpt, const mxq_tensor_view *packed, const char *base,
                                 const mxq_mx_spec *spec, int out_f, int in_f, float **out)
{
    mxq_status status = MXQ_OK;
    const mxq_tensor_view *scales;
    char name[300];
    float *buf = NULL;
    snprintf(name, sizeof(name), "%s.weight_scale", base);
    CALL(ctx, mxq_checkpoint_get(ctx, ckpt, name, &scales));
    int64_t row_bytes = (int64_t)mxq_mx_packed_row_bytes(spec->format, (size_t)in_f);
    int64_t blocks = (int64_t)mxq_mx_blocks_per_row((size_t)in_f, spec->block);
    CHECK(ctx, packed->dtype == MXQ_DT_U8 && packed->rank == 2 && packed->shape[0] == out_f &&
                   packed->shape[1] == row_bytes,
          MXQ_ERR_FORMAT, "%s: tensor '%s' must be U8 [%d, %lld] (%s elements of %d inputs)", packed->file,
          packed->name, out_f, (long long)row_bytes, spec->format->name, in_f);
    CHECK(ctx, scales->dtype == MXQ_DT_U8 && scales->rank == 2 && scales->shape[0] == out_f && scales->shape[1] == blocks,
          MXQ_ERR_FORMAT, "%s: tensor '%s' must be U8 [%d, %lld] (E8M0 scales of blocks of %d)", scales->file,
          scales->name, out_f, (long long)blocks, spec->block);
    buf = mxq_alloc_floats((size_t)out_f * in_f);
    CHECK_ALLOC(ctx, buf, (size_t)out_f * in_f * sizeof(float), base);
    CALL(ctx, check_codes(ctx, packed, scales, spec, (size_t)out_f, (size_t)in_f));
    CALL(ctx, mxq_mx_dequantize_rows(ctx, spec, packed->data, scales->data, (size_t)out_f, (size_t)in_f, buf));
    CALL(ctx, check_decoded(ctx, packed, scales, spec, buf, (size_t)out_f, (size_t)in_f));
    *out = buf;
    return MXQ_OK;
fail:
    free(buf);
    return status;
}

/* ---- the checkpoint against the config ------------------------------------ */

/* Tensor `name` exists with shape [d0] or [d0, d1] (d1 = 0 for 1-D). */
static mxq_status expect_shape(mxq_ctx *ctx, mxq_checkpoint *ckpt, const char *name, int64_t d0, int64_t d1)
{
    mxq_status status = MXQ_OK;
    const mxq_tensor_view *t;
    const int rank = d1 > 0 ? 2 : 1;
    const int64_t want[2] = {d0, d1};
    CALL(ctx, mxq_checkpoint_get(ctx, ckpt, name, &t));
    if (t->rank != rank || t->shape[0] != d0 || (rank == 2 && t->shape[1] != d1)) {
        char have[128], expected[128];
        mxq_shape_text(have, sizeof(have), t->rank, t->shape);
        mxq_shape_text(expected, sizeof(expected), rank, want);
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected %s from config.json", t->file, name, have,
             expected);
    }
fail:
    return status;
}

/* A linear's weight, or in an mxq checkpoint its packed elements + scales. */
static mxq_status expect_linear(mxq_ctx *ctx, mxq_checkpoint *ckpt, const mxq_model_config *cfg, int layer,
                                mxq_linear_id li)
{
    mxq_status status = MXQ_OK;
    char name[256];
    int out_f, in_f;
    const mxq_tensor_view *packed = NULL;
    mxq_linear_shape(cfg, li, &out_f, &in_f);
    snprintf(name, sizeof(name), "model.layers.%d.%s.weight_packed", layer, mxq_linear_name(li));
    if (cfg->mx_weights)
        CALL(ctx, mxq_checkpoint_lookup(ctx, ckpt, name, &packed));
    if (packed) {
        const mxq_mx_spec *spec = &cfg->mx_weight_spec;
        CALL(ctx, expect_shape(ctx, ckpt, name, out_f, (int64_t)mxq_mx_packed_row_bytes(spec->format, (size_t)in_f)));
        snprintf(name, sizeof(name), "model.layers.%d.%s.weight_scale", layer, mxq_linear_name(li));
        CALL(ctx, expect_shape(ctx, ckpt, name, out_f, (int64_t)mxq_mx_blocks_per_row((size_t)in_f, spec->block)));
    } else {
        snprintf(name, sizeof(name), "model.layers.%d.%s.weight", layer, mxq_linear_name(li));
        CALL(ctx, expect_shape(ctx, ckpt, name, out_f, in_f));
    }
    if ((li <= MXQ_LIN_V && cfg->qkv_bias) || (li == MXQ_LIN_O && cfg->o_bias)) {
        snprintf(name, sizeof(name), "model.layers.%d.%s.bias", layer, mxq_linear_name(li));
        CALL(ctx, expect_shape(ctx, ckpt, name, out_f, 0));
    }
fail:
    return status;
}

/* No tensor of a decoder layer beyond the config's last one. */
static mxq_status expect_no_extra_layers(mxq_ctx *ctx, mxq_checkpoint *ckpt, const mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    const char **names = NULL;
    size_t count = 0;
    CALL(ctx, mxq_checkpoint_names(ctx, ckpt, &names, &count));
    for (size_t i = 0; i < count; i++) {
        int layer;
        CHECK(ctx, sscanf(names[i], "model.layers.%d.", &layer) != 1 || (layer >= 0 && layer < cfg->n_layers),
              MXQ_ERR_FORMAT, "the checkpoint in '%s' holds tensor '%s', but config.json says num_hidden_layers = %d",
              mxq_checkpoint_dir(ckpt), names[i], cfg->n_layers);
    }
fail:
    free(names);
    return status;
}

mxq_status mxq_model_check_checkpoint(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    mxq_checkpoint *ckpt = NULL;
    char name[256];
    const int d = cfg->hidden;
    CALL(ctx, mxq_checkpoint_open(ctx, dir, &ckpt));
    CALL(ctx, expect_no_extra_layers(ctx, ckpt, cfg));
    CALL(ctx, expect_shape(ctx, ckpt, "model.embed_tokens.weight", cfg->vocab, d));
    for (int l = 0; l < cfg->n_layers; l++) {
        snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", l);
        CALL(ctx, expect_shape(ctx, ckpt, name, d, 0));
        snprintf(name, sizeof(name), "model.layers.%d.post_attention_layernorm.weight", l);
        CALL(ctx, expect_shape(ctx, ckpt, name, d, 0));
        for (int li = 0; li < MXQ_LIN_COUNT; li++)
            CALL(ctx, expect_linear(ctx, ckpt, cfg, l, (mxq_linear_id)li));
    }
    CALL(ctx, expect_shape(ctx, ckpt, "model.norm.weight", d, 0));
    if (!cfg->tie_embeddings)
        CALL(ctx, expect_shape(ctx, ckpt, "lm_head.weight", cfg->vocab, d));
fail:
    mxq_checkpoint_close(ckpt);
    return status;
}

/* The float32 tensors of layer l that `layer` does not hold yet. */
static mxq_status load_layer(mxq_ctx *ctx, mxq_checkpoint *ckpt, const mxq_model_config *cfg, int l, mxq_layer *layer)
{
    mxq_status status = MXQ_OK;
    char name[256];
    const int d = cfg->hidden;
    snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", l);
    if (!layer->attn_norm)
        CALL(ctx, load_tensor(ctx, ckpt, name, 1, d, 0, &layer->attn_norm));
    snprintf(name, sizeof(name), "model.layers.%d.post_attention_layernorm.weight", l);
    if (!layer->ffn_norm)
        CALL(ctx, load_tensor(ctx, ckpt, name, 1, d, 0, &layer->ffn_norm));
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        int out_f, in_f;
        mxq_linear_shape(cfg, (mxq_linear_id)li, &out_f, &in_f);
        const mxq_tensor_view *packed = NULL;
        if (cfg->mx_weights) {
            snprintf(name, sizeof(name), "model.layers.%d.%s.weight_packed", l, mxq_linear_name((mxq_linear_id)li));
            CALL(ctx, mxq_checkpoint_lookup(ctx, ckpt, name, &packed));
        }
        snprintf(name, sizeof(name), "model.layers.%d.%s", l, mxq_linear_name((mxq_linear_id)li));
        if (packed && !layer->weight[li])
            CALL(ctx, load_mx_linear(ctx, ckpt, packed, name, &cfg->mx_weight_spec, out_f, in_f, &layer->weight[li]));
        /* not quantized (excluded by the recipe) or an ordinary checkpoint */
        strncat(name, ".weight", sizeof(name) - strlen(name) - 1);
        if (!packed && !layer->weight[li])
            CALL(ctx, load_tensor(ctx, ckpt, name, 2, out_f, in_f, &layer->weight[li]));
        int has_bias = (li <= MXQ_LIN_V && cfg->qkv_bias) || (li == MXQ_LIN_O && cfg->o_bias);
        if (has_bias && !layer->bias[li]) {
            snprintf(name, sizeof(name), "model.layers.%d.%s.bias", l, mxq_linear_name((mxq_linear_id)li));
            CALL(ctx, load_tensor(ctx, ckpt, name, 1, out_f, 0, &layer->bias[li]));
        }
    }
fail:
    return status;
}

/* Lazy layers' float tensors are refused at load, not when their turn
 * comes hours into a job, if they hold a NaN or Inf; their pages go back.
 * Only the layers this process scans (see mxq_model_load_lazy). Packed MX
 * weights are checked as they are decoded. */
static mxq_status scan_layers(mxq_ctx *ctx, mxq_checkpoint *ckpt, const mxq_model_config *cfg,
                              const mxq_model_part *part, int every, int offset)
{
    mxq_status status = MXQ_OK;
    const char **names = NULL;
    size_t count = 0;
    CALL(ctx, mxq_checkpoint_names(ctx, ckpt, &names, &count));
    for (size_t i = 0; i < count; i++) {
        const mxq_tensor_view *t;
        int l;
        if (sscanf(names[i], "model.layers.%d.", &l) != 1 || l < part->first_layer || l >= part->last_layer ||
            (l - offset) % every != 0)
            continue;
        CALL(ctx, mxq_checkpoint_get(ctx, ckpt, names[i], &t));
        if (!cfg->mx_weights || t->dtype != MXQ_DT_U8) /* U8: packed MX elements and scales */
            CALL(ctx, mxq_tensor_check_float(ctx, t));
        mxq_tensor_view_release(t);
    }
fail:
    free(names);
    return status;
}

/* The tensors outside the decoder layers: embedding (rank 0 embeds the
 * tokens), final norm and head (the last rank scores them). */
static mxq_status load_ends(mxq_ctx *ctx, mxq_checkpoint *ckpt, const mxq_model_part *part, mxq_model *m)
{
    mxq_status status = MXQ_OK;
    const mxq_model_config *cfg = &m->cfg;
    if (part->embedding || (part->head && cfg->tie_embeddings))
        CALL(ctx, load_tensor(ctx, ckpt, "model.embed_tokens.weight", 2, cfg->vocab, cfg->hidden, &m->embedding));
    if (part->head) {
        CALL(ctx, load_tensor(ctx, ckpt, "model.norm.weight", 1, cfg->hidden, 0, &m->final_norm));
        if (cfg->tie_embeddings)
            m->lm_head = m->embedding;
        else
            CALL(ctx, load_tensor(ctx, ckpt, "lm_head.weight", 2, cfg->vocab, cfg->hidden, &m->lm_head));
    }
fail:
    return status;
}

static mxq_status release_named(mxq_ctx *ctx, mxq_checkpoint *ckpt, const char *name)
{
    mxq_status status = MXQ_OK;
    const mxq_tensor_view *t = NULL;
    CALL(ctx, mxq_checkpoint_lookup(ctx, ckpt, name, &t));
    mxq_tensor_view_release(t);
fail:
    return status;
}

/* Eager (every = 0) or lazy (every >= 1, see mxq_model_load_lazy). */
static mxq_status load_model(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, const mxq_model_part *part,
                             int every, int offset, mxq_model **out)
{
    mxq_status status = MXQ_OK;
    mxq_checkpoint *ckpt = NULL;
    mxq_model *m = NULL;
    *out = NULL;

    CHECK(ctx, part->first_layer >= 0 && part->first_layer <= part->last_layer && part->last_layer <= cfg->n_layers,
          MXQ_ERR_ARG, "layer range [%d, %d) is outside the model's %d layers", part->first_layer, part->last_layer,
          cfg->n_layers);
    CALL(ctx, mxq_checkpoint_open(ctx, dir, &ckpt));
    m = calloc(1, sizeof(*m));
    CHECK_ALLOC(ctx, m, sizeof(*m), "the model");
    m->cfg = *cfg;
    m->first_layer = part->first_layer;
    m->last_layer = part->last_layer;
    m->has_embedding = part->embedding;
    m->has_head = part->head;
    int n_local = part->last_layer - part->first_layer;
    m->layers = calloc(n_local ? (size_t)n_local : 1, sizeof(mxq_layer));
    m->rope_inv_freq = calloc((size_t)cfg->head_dim / 2, sizeof(double));
    CHECK_ALLOC(ctx, m->layers && m->rope_inv_freq, (size_t)n_local * sizeof(mxq_layer), "the layer table");
    mxq_rope_frequencies(cfg, m->rope_inv_freq);
    for (int l = part->first_layer; l < part->last_layer && !every; l++)
        CALL(ctx, load_layer(ctx, ckpt, cfg, l, &m->layers[l - part->first_layer]));
    if (every)
        CALL(ctx, scan_layers(ctx, ckpt, cfg, part, every, offset));
    CALL(ctx, load_ends(ctx, ckpt, part, m));
    if (every) {
        m->ckpt = ckpt;
        /* what was converted no longer needs its pages */
        static const char *const ends[3] = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
        for (int i = 0; i < 3; i++)
            CALL(ctx, release_named(ctx, ckpt, ends[i]));
    } else {
        mxq_checkpoint_close(ckpt);
    }
    *out = m;
    return MXQ_OK;
fail:
    if (!m || m->ckpt != ckpt)
        mxq_checkpoint_close(ckpt);
    mxq_model_free(m);
    return status;
}

mxq_status mxq_model_load(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, const mxq_model_part *part,
                          mxq_model **out)
{
    return load_model(ctx, dir, cfg, part, 0, 0, out);
}

mxq_status mxq_model_load_lazy(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, const mxq_model_part *part,
                               int scan_every, int scan_offset, mxq_model **out)
{
    return load_model(ctx, dir, cfg, part, scan_every > 0 ? scan_every : 1, scan_offset, out);
}

void mxq_layer_free_tensors(mxq_layer *layer)
{
    free(layer->attn_norm);
    free(layer->ffn_norm);
    for (int li = 0; li < MXQ_LIN_COUNT; li++) {
        free(layer->weight[li]);
        free(layer->bias[li]);
    }
    memset(layer, 0, sizeof(*layer));
}

void mxq_model_free(mxq_model *m)
{
    if (!m)
        return;
    int n_local = m->last_layer - m->first_layer;
    for (int i = 0; m->layers && i < n_local; i++)
        mxq_layer_free_tensors(&m->layers[i]);
    free(m->layers);
    if (m->lm_head != m->embedding)
        free(m->lm_head);
    free(m->embedding);
    free(m->final_norm);
    free(m->rope_inv_freq);
    mxq_checkpoint_close(m->ckpt);
    free(m);
}

/* ---- lazy layers -------------------------------------------------------------- */

static mxq_status check_lazy_layer(mxq_ctx *ctx, const mxq_model *m, int layer)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, m->ckpt, MXQ_ERR_INTERNAL, "layer %d: the model was not loaded lazily", layer);
    CHECK(ctx, layer >= m->first_layer && layer < m->last_layer, MXQ_ERR_INTERNAL,
          "layer %d is outside this model part [%d, %d)", layer, m->first_layer, m->last_layer);
fail:
    return status;
}

mxq_status mxq_model_layer_load(mxq_ctx *ctx, mxq_model *m, int layer)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, check_lazy_layer(ctx, m, layer));
    CALL(ctx, load_layer(ctx, m->ckpt, &m->cfg, layer, &m->layers[layer - m->first_layer]));
fail:
    return status;
}

mxq_status mxq_model_layer_release_pages(mxq_ctx *ctx, mxq_model *m, int layer)
{
    static const char *const norms[2] = {"input_layernorm.weight", "post_attention_layernorm.weight"};
    static const char *const parts[4] = {"weight", "weight_packed", "weight_scale", "bias"};
    mxq_status status = MXQ_OK;
    char name[256];
    CALL(ctx, check_lazy_layer(ctx, m, layer));
    for (int i = 0; i < 2; i++) {
        snprintf(name, sizeof(name), "model.layers.%d.%s", layer, norms[i]);
        CALL(ctx, release_named(ctx, m->ckpt, name));
    }
    for (int li = 0; li < MXQ_LIN_COUNT; li++)
        for (int i = 0; i < 4; i++) {
            snprintf(name, sizeof(name), "model.layers.%d.%s.%s", layer, mxq_linear_name((mxq_linear_id)li), parts[i]);
            CALL(ctx, release_named(ctx, m->ckpt, name));
        }
fail:
    return status;
}

mxq_status mxq_model_layer_unload(mxq_ctx *ctx, mxq_model *m, int layer)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_model_layer_release_pages(ctx, m, layer));
    mxq_layer_free_tensors(&m->layers[layer - m->first_layer]);
fail:
    return status;
}

mxq_status mxq_model_unload_embedding(mxq_ctx *ctx, mxq_model *m)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, m->ckpt, MXQ_ERR_INTERNAL, "the embedding: the model was not loaded lazily");
    if (m->embedding != m->lm_head)
        free(m->embedding);
    m->embedding = NULL;
    m->has_embedding = 0;
    CALL(ctx, release_named(ctx, m->ckpt, "model.embed_tokens.weight"));
fail:
    return status;
}

mxq_status mxq_model_fake_quantize_weights(mxq_ctx *ctx, mxq_model *m, const mxq_mx_spec *spec)
{
    mxq_status status = MXQ_OK;
    for (int l = 0; l < m->last_layer - m->first_layer; l++)
        for (int li = 0; li < MXQ_LIN_COUNT; li++) {
            int out_f, in_f;
            mxq_linear_shape(&m->cfg, (mxq_linear_id)li, &out_f, &in_f);
            float *w = m->layers[l].weight[li];
            CALL(ctx, mxq_mx_quantize_rows(ctx, spec, w, (size_t)out_f, (size_t)in_f, NULL, NULL, w));
        }
fail:
    return status;
}
