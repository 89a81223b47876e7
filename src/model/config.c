/* Hugging Face config.json for llama, mistral and qwen2. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/check.h"
#include "formats/mx_spec.h"
#include "io/fsutil.h"
#include "mxq/model.h"

const char *mxq_arch_name(mxq_arch arch)
{
    switch (arch) {
    case MXQ_ARCH_LLAMA: return "llama";
    case MXQ_ARCH_MISTRAL: return "mistral";
    case MXQ_ARCH_QWEN2: return "qwen2";
    }
    return "?";
}

typedef struct {
    mxq_ctx *ctx;
    const char *path;
    json_t *root;
} config_reader;

/* Integer in [min, max] at `key`; required unless `fallback` >= 0. JSON null
 * counts as absent (transformers writes "head_dim": null). The bounds keep
 * every size the job derives from the config far from overflow, and stop a
 * corrupt value before anything is allocated for it. */
static mxq_status get_int(config_reader *r, json_t *obj, const char *key, long fallback, long min, long max, int *out)
{
    mxq_status status = MXQ_OK;
    mxq_ctx *ctx = r->ctx;
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        CHECK(ctx, fallback >= 0, MXQ_ERR_FORMAT, "%s: missing required key '%s'", r->path, key);
        *out = (int)fallback;
        return MXQ_OK;
    }
    CHECK(ctx, json_is_integer(v), MXQ_ERR_FORMAT, "%s: key '%s' must be an integer", r->path, key);
    json_int_t value = json_integer_value(v);
    CHECK(ctx, value >= min && value <= max, MXQ_ERR_FORMAT, "%s: key '%s' = %lld is out of range (expected %ld..%ld)",
          r->path, key, (long long)value, min, max);
    *out = (int)value;
fail:
    return status;
}

static mxq_status get_number(config_reader *r, json_t *obj, const char *key, double fallback, int required,
                             double *out)
{
    mxq_status status = MXQ_OK;
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        CHECK(r->ctx, !required, MXQ_ERR_FORMAT, "%s: missing required key '%s'", r->path, key);
        *out = fallback;
        return MXQ_OK;
    }
    CHECK(r->ctx, json_is_number(v), MXQ_ERR_FORMAT, "%s: key '%s' must be a number", r->path, key);
    *out = json_number_value(v);
    CHECK(r->ctx, *out > 0, MXQ_ERR_FORMAT, "%s: key '%s' must be positive, got %g", r->path, key, *out);
fail:
    return status;
}

static mxq_status get_bool(config_reader *r, const char *key, int fallback, int *out)
{
    mxq_status status = MXQ_OK;
    json_t *v = json_object_get(r->root, key);
    if (!v || json_is_null(v)) {
        *out = fallback;
        return MXQ_OK;
    }
    CHECK(r->ctx, json_is_boolean(v), MXQ_ERR_FORMAT, "%s: key '%s' must be true or false", r->path, key);
    *out = json_is_true(v);
fail:
    return status;
}

/* rope_scaling (classic) or rope_parameters (transformers >= 4.5x): the
 * llama3 fields live in the same object either way. */
static mxq_status parse_rope_object(config_reader *r, json_t *obj, const char *what, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    mxq_ctx *ctx = r->ctx;
    CHECK(ctx, json_is_object(obj), MXQ_ERR_FORMAT, "%s: '%s' must be an object or null", r->path, what);
    json_t *type = json_object_get(obj, "rope_type");
    if (!type)
        type = json_object_get(obj, "type");
    CHECK(ctx, !type || json_is_null(type) || json_is_string(type), MXQ_ERR_FORMAT,
          "%s: %s.rope_type must be a string (default, llama3)", r->path, what);
    const char *type_name = json_is_string(type) ? json_string_value(type) : "default";
    if (json_object_get(obj, "rope_theta"))
        CALL(ctx, get_number(r, obj, "rope_theta", 0, 1, &cfg->rope_theta));
    double partial = 1; /* transformers >= 5 keeps it here */
    CALL(ctx, get_number(r, obj, "partial_rotary_factor", 1, 0, &partial));
    CHECK(ctx, partial == 1, MXQ_ERR_FORMAT,
          "%s: %s.partial_rotary_factor %.17g: mxq's LLaMA rotates every dimension of a head (1.0)", r->path, what,
          partial);
    if (strcmp(type_name, "default") == 0)
        return MXQ_OK;
    CHECK(ctx, strcmp(type_name, "llama3") == 0, MXQ_ERR_FORMAT,
          "%s: %s.rope_type '%s' is not supported (supported: default, llama3)", r->path, what, type_name);
    CALL(ctx, get_number(r, obj, "factor", 0, 1, &cfg->rope_factor));
    CALL(ctx, get_number(r, obj, "low_freq_factor", 0, 1, &cfg->rope_low_freq_factor));
    CALL(ctx, get_number(r, obj, "high_freq_factor", 0, 1, &cfg->rope_high_freq_factor));
    CALL(ctx, get_int(r, obj, "original_max_position_embeddings", -1, 1, MXQ_MAX_POSITIONS,
                      &cfg->rope_original_max_positions));
    CHECK(ctx, cfg->rope_high_freq_factor > cfg->rope_low_freq_factor, MXQ_ERR_FORMAT,
          "%s: %s.high_freq_factor must exceed low_freq_factor", r->path, what);
fail:
    return status;
}

/* {format, block, rounding} of a quantization_config entry, through the one
 * MX spec serializer (mxq_mx_spec_set_field). */
static mxq_status parse_mx_spec(config_reader *r, json_t *obj, const char *what, mxq_mx_spec *spec)
{
    mxq_status status = MXQ_OK;
    mxq_ctx *ctx = r->ctx;
    char where[128], text[64];
    snprintf(where, sizeof(where), "quantization_config.%s", what);
    CHECK(ctx, json_is_object(obj), MXQ_ERR_FORMAT, "%s: %s must be an object", r->path, where);
    mxq_mx_spec_default(spec);
    const char *key;
    json_t *value;
    json_object_foreach(obj, key, value)
    {
        if (json_is_integer(value))
            snprintf(text, sizeof(text), "%lld", (long long)json_integer_value(value));
        CHECK(ctx, json_is_string(value) || json_is_integer(value), MXQ_ERR_FORMAT,
              "%s: %s.%s must be a string or an integer", r->path, where, key);
        CALL(ctx, mxq_mx_spec_set_field(ctx, spec, key, json_is_string(value) ? json_string_value(value) : text,
                                        r->path, where));
    }
    CHECK(ctx, spec->format != NULL, MXQ_ERR_FORMAT, "%s: %s.format is missing", r->path, where);
    CALL(ctx, mxq_mx_spec_check(ctx, spec));
fail:
    return status;
}

static mxq_status parse_quantization_config(config_reader *r, json_t *q, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    mxq_ctx *ctx = r->ctx;
    CHECK(ctx, json_is_object(q), MXQ_ERR_FORMAT, "%s: quantization_config must be an object", r->path);
    const char *method = json_string_value(json_object_get(q, "quant_method"));
    CHECK(ctx, method && strcmp(method, "mxq") == 0, MXQ_ERR_FORMAT,
          "%s: quantization_config.quant_method '%s' is not supported (mxq reads its own checkpoints, quant_method "
          "\"mxq\", and unquantized ones)",
          r->path, method ? method : "(missing)");
    json_t *version = json_object_get(q, "format_version");
    CHECK(ctx, !version || (json_is_integer(version) && json_integer_value(version) == 1), MXQ_ERR_FORMAT,
          "%s: quantization_config.format_version must be 1 (this mxq reads format 1; the checkpoint is from a newer "
          "mxq?)",
          r->path);
    json_t *w = json_object_get(q, "weights"), *a = json_object_get(q, "activations");
    if (w && !json_is_null(w)) {
        CALL(ctx, parse_mx_spec(r, w, "weights", &cfg->mx_weight_spec));
        cfg->mx_weights = 1;
    }
    if (a && !json_is_null(a)) {
        CALL(ctx, parse_mx_spec(r, a, "activations", &cfg->mx_act_spec));
        cfg->mx_acts = 1;
    }
fail:
    return status;
}

/* Architecture: model_type, else the architectures list. */
static mxq_status parse_arch(config_reader *r, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    mxq_ctx *ctx = r->ctx;
    json_t *model_type = json_object_get(r->root, "model_type");
    const char *type = json_is_string(model_type) ? json_string_value(model_type) : NULL;
    if (!type) {
        json_t *archs = json_object_get(r->root, "architectures");
        const char *a = json_is_array(archs) ? json_string_value(json_array_get(archs, 0)) : NULL;
        CHECK(ctx, a != NULL, MXQ_ERR_FORMAT, "%s: missing required key 'model_type'", r->path);
        type = strcmp(a, "LlamaForCausalLM") == 0     ? "llama"
               : strcmp(a, "MistralForCausalLM") == 0 ? "mistral"
               : strcmp(a, "Qwen2ForCausalLM") == 0   ? "qwen2"
                                                      : a;
    }
    snprintf(cfg->model_type, sizeof(cfg->model_type), "%s", type);
    if (strcmp(type, "llama") == 0)
        cfg->arch = MXQ_ARCH_LLAMA;
    else if (strcmp(type, "mistral") == 0)
        cfg->arch = MXQ_ARCH_MISTRAL;
    else if (strcmp(type, "qwen2") == 0)
        cfg->arch = MXQ_ARCH_QWEN2;
    else
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: unsupported architecture '%s' (supported: llama, mistral, qwen2)", r->path, type);
fail:
    return status;
}

/* The sizes, each within its bound, and how they must relate. */
static mxq_status parse_sizes(config_reader *r, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    mxq_ctx *ctx = r->ctx;
    CALL(ctx, get_int(r, r->root, "hidden_size", -1, 1, MXQ_MAX_WIDTH, &cfg->hidden));
    CALL(ctx, get_int(r, r->root, "intermediate_size", -1, 1, MXQ_MAX_WIDTH, &cfg->intermediate));
    CALL(ctx, get_int(r, r->root, "num_hidden_layers", -1, 1, MXQ_MAX_LAYERS, &cfg->n_layers));
    CALL(ctx, get_int(r, r->root, "num_attention_heads", -1, 1, MXQ_MAX_HEADS, &cfg->n_heads));
    CALL(ctx, get_int(r, r->root, "vocab_size", -1, 1, MXQ_MAX_VOCAB, &cfg->vocab));
    CALL(ctx, get_int(r, r->root, "num_key_value_heads", cfg->n_heads, 1, MXQ_MAX_HEADS, &cfg->n_kv_heads));
    /* Without head_dim, the heads split hidden_size evenly (a fallback that
     * get_int does not range-check: 64 / 98 heads gave head_dim 0 and
     * empty q_proj rows; found by tests/fuzz/fuzz_config). */
    json_t *head_dim = json_object_get(r->root, "head_dim");
    CHECK(ctx, (head_dim && !json_is_null(head_dim)) || (cfg->hidden % cfg->n_heads == 0 && cfg->hidden / cfg->n_heads >= 2),
          MXQ_ERR_FORMAT, "%s: hidden_size (%d) is not num_attention_heads (%d) heads of 2 or more, and there is no head_dim",
          r->path, cfg->hidden, cfg->n_heads);
    CALL(ctx, get_int(r, r->root, "head_dim", cfg->hidden / cfg->n_heads, 2, MXQ_MAX_HEAD_DIM, &cfg->head_dim));
    long default_positions = cfg->arch == MXQ_ARCH_LLAMA ? 2048 : 32768;
    CALL(ctx, get_int(r, r->root, "max_position_embeddings", default_positions, 1, MXQ_MAX_POSITIONS,
                      &cfg->max_positions));
    CALL(ctx, get_number(r, r->root, "rms_norm_eps", 1e-6, 0, &cfg->rms_eps));
    CALL(ctx, get_number(r, r->root, "rope_theta", 10000.0, 0, &cfg->rope_theta));
    CALL(ctx, get_bool(r, "tie_word_embeddings", 0, &cfg->tie_embeddings));
    CHECK(ctx, cfg->n_heads % cfg->n_kv_heads == 0, MXQ_ERR_FORMAT,
          "%s: num_attention_heads (%d) must be a multiple of num_key_value_heads (%d)", r->path, cfg->n_heads,
          cfg->n_kv_heads);
    CHECK(ctx, cfg->head_dim % 2 == 0, MXQ_ERR_FORMAT, "%s: head_dim (%d) must be even for rotary embeddings", r->path,
          cfg->head_dim);
fail:
    return status;
}

/* Activation, biases, sliding window: what differs between the families. */
static mxq_status parse_variants(config_reader *r, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    mxq_ctx *ctx = r->ctx;
    json_t *act = json_object_get(r->root, "hidden_act");
    if (act && !json_is_null(act))
        CHECK(ctx, json_is_string(act) && strcmp(json_string_value(act), "silu") == 0, MXQ_ERR_FORMAT,
              "%s: hidden_act '%s' is not supported (supported: silu)", r->path,
              json_is_string(act) ? json_string_value(act) : "(not a string)");
    int mlp_bias = 0;
    CALL(ctx, get_bool(r, "mlp_bias", 0, &mlp_bias));
    CHECK(ctx, !mlp_bias, MXQ_ERR_FORMAT, "%s: mlp_bias = true is not supported", r->path);
    if (cfg->arch == MXQ_ARCH_QWEN2) {
        cfg->qkv_bias = 1;
    } else if (cfg->arch == MXQ_ARCH_LLAMA) {
        int attention_bias = 0;
        CALL(ctx, get_bool(r, "attention_bias", 0, &attention_bias));
        cfg->qkv_bias = cfg->o_bias = attention_bias;
    }
    /* Sliding-window attention: mistral always when set, qwen2 only when
     * use_sliding_window is true. */
    json_t *window = json_object_get(r->root, "sliding_window");
    int use_window = cfg->arch == MXQ_ARCH_MISTRAL;
    if (cfg->arch == MXQ_ARCH_QWEN2)
        CALL(ctx, get_bool(r, "use_sliding_window", 0, &use_window));
    if (use_window && window && !json_is_null(window))
        CALL(ctx, get_int(r, r->root, "sliding_window", -1, 1, MXQ_MAX_POSITIONS, &cfg->sliding_window));
fail:
    return status;
}

/* bos_token_id, and eos_token_id: an id or a list of them (Llama-3 lists
 * its end-of-turn ids too), of which the first is the end of text. */
static mxq_status parse_special_tokens(config_reader *r, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    CALL(r->ctx, get_int(r, r->root, "bos_token_id", 1, 0, MXQ_MAX_VOCAB, &cfg->bos_token));
    json_t *eos = json_object_get(r->root, "eos_token_id");
    if (json_is_array(eos))
        eos = json_array_get(eos, 0);
    cfg->eos_token = 2;
    if (eos && !json_is_null(eos)) {
        CHECK(r->ctx, json_is_integer(eos), MXQ_ERR_FORMAT,
              "%s: eos_token_id must be a token id (an integer) or a list of them", r->path);
        CHECK(r->ctx, json_integer_value(eos) >= 0 && json_integer_value(eos) < cfg->vocab, MXQ_ERR_FORMAT,
              "%s: eos_token_id %lld is not a token id below vocab_size (%d)", r->path,
              (long long)json_integer_value(eos), cfg->vocab);
        cfg->eos_token = (int)json_integer_value(eos);
    }
fail:
    return status;
}

static int same_rope(const mxq_model_config *a, const mxq_model_config *b)
{
    return a->rope_theta == b->rope_theta && a->rope_factor == b->rope_factor &&
           a->rope_low_freq_factor == b->rope_low_freq_factor && a->rope_high_freq_factor == b->rope_high_freq_factor &&
           a->rope_original_max_positions == b->rope_original_max_positions;
}

/* The rotary embedding: rope_theta, then rope_scaling (classic) or
 * rope_parameters (transformers >= 4.5x). Where a config has both, or a
 * theta in both places, they must agree: which one a runtime reads is not
 * something to guess. Only full rotation (partial_rotary_factor 1). */
static mxq_status parse_rope(config_reader *r, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    double partial = 1;
    CALL(r->ctx, get_number(r, r->root, "partial_rotary_factor", 1, 0, &partial));
    CHECK(r->ctx, partial == 1, MXQ_ERR_FORMAT,
          "%s: partial_rotary_factor %.17g: mxq's LLaMA rotates every dimension of a head (1.0)", r->path, partial);
    json_t *scaling = json_object_get(r->root, "rope_scaling"), *params = json_object_get(r->root, "rope_parameters");
    const int has_scaling = scaling && !json_is_null(scaling), has_params = params && !json_is_null(params);
    const mxq_model_config base = *cfg;
    if (has_scaling)
        CALL(r->ctx, parse_rope_object(r, scaling, "rope_scaling", cfg));
    if (has_params) {
        mxq_model_config from_params = base;
        CALL(r->ctx, parse_rope_object(r, params, "rope_parameters", &from_params));
        const int theta_twice = json_object_get(r->root, "rope_theta") && json_object_get(params, "rope_theta");
        /* with rope_scaling too, every setting must agree; else the theta */
        const int agree = has_scaling ? same_rope(cfg, &from_params)
                                      : !theta_twice || cfg->rope_theta == from_params.rope_theta;
        CHECK(r->ctx, agree, MXQ_ERR_FORMAT, "%s: rope_parameters disagrees with %s; give the rotary settings once",
              r->path, has_scaling ? "rope_scaling (or rope_theta)" : "rope_theta");
        *cfg = from_params;
    }
fail:
    return status;
}

mxq_status mxq_config_load(mxq_ctx *ctx, const char *dir, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    mxq_path_join(path, dir, "config.json");
    config_reader r = {ctx, path, NULL};
    memset(cfg, 0, sizeof(*cfg));
    CALL(ctx, mxq_json_read(ctx, path, "model config", &r.root));
    CHECK(ctx, json_is_object(r.root), MXQ_ERR_FORMAT, "%s: not a JSON object", path);
    CALL(ctx, parse_arch(&r, cfg));
    CALL(ctx, parse_sizes(&r, cfg));
    CALL(ctx, parse_variants(&r, cfg));
    CALL(ctx, parse_special_tokens(&r, cfg));
    CALL(ctx, parse_rope(&r, cfg));
    json_t *quant = json_object_get(r.root, "quantization_config");
    if (quant && !json_is_null(quant))
        CALL(ctx, parse_quantization_config(&r, quant, cfg));
fail:
    json_decref(r.root);
    return status;
}

size_t mxq_config_layer_params(const mxq_model_config *cfg)
{
    size_t n = 2 * (size_t)cfg->hidden; /* two norms */
    for (int l = 0; l < MXQ_LIN_COUNT; l++) {
        int out, in;
        mxq_linear_shape(cfg, (mxq_linear_id)l, &out, &in);
        n += (size_t)out * (size_t)in;
    }
    return n;
}

size_t mxq_config_embedding_params(const mxq_model_config *cfg)
{
    return (size_t)cfg->vocab * (size_t)cfg->hidden;
}

const char *mxq_linear_name(mxq_linear_id id)
{
    static const char *const names[MXQ_LIN_COUNT] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                                     "mlp.down_proj"};
    return (unsigned)id < MXQ_LIN_COUNT ? names[id] : "?";
}

void mxq_linear_shape(const mxq_model_config *cfg, mxq_linear_id id, int *out_features, int *in_features)
{
    int d = cfg->hidden, q = cfg->n_heads * cfg->head_dim, kv = cfg->n_kv_heads * cfg->head_dim;
    switch (id) {
    case MXQ_LIN_Q: *out_features = q; *in_features = d; break;
    case MXQ_LIN_K: *out_features = kv; *in_features = d; break;
    case MXQ_LIN_V: *out_features = kv; *in_features = d; break;
    case MXQ_LIN_O: *out_features = d; *in_features = q; break;
    case MXQ_LIN_GATE: *out_features = cfg->intermediate; *in_features = d; break;
    case MXQ_LIN_UP: *out_features = cfg->intermediate; *in_features = d; break;
    case MXQ_LIN_DOWN: *out_features = d; *in_features = cfg->intermediate; break;
    default: *out_features = *in_features = 0; break;
    }
}

mxq_input_id mxq_linear_input(mxq_linear_id id)
{
    switch (id) {
    case MXQ_LIN_O: return MXQ_INPUT_O;
    case MXQ_LIN_GATE:
    case MXQ_LIN_UP: return MXQ_INPUT_MLP;
    case MXQ_LIN_DOWN: return MXQ_INPUT_DOWN;
    default: return MXQ_INPUT_ATTN;
    }
}

const char *mxq_input_name(mxq_input_id id)
{
    static const char *const names[MXQ_INPUT_COUNT] = {"attn_in", "o_in", "mlp_in", "down_in"};
    return (unsigned)id < MXQ_INPUT_COUNT ? names[id] : "?";
}

int mxq_input_features(const mxq_model_config *cfg, mxq_input_id id)
{
    switch (id) {
    case MXQ_INPUT_O: return cfg->n_heads * cfg->head_dim;
    case MXQ_INPUT_DOWN: return cfg->intermediate;
    default: return cfg->hidden;
    }
}
