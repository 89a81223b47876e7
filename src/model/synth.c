/* Synthetic models: random weights with the exact shapes of real ones, in
 * Hugging Face layout, for benchmarks and big-shape tests. Each tensor's
 * values depend only on the seed and the tensor's name, so the same model
 * comes out however it is sharded. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "io/ckpt_writer.h"
#include "mxq/model.h"
#include "mxq/synth.h"

static const mxq_synth_preset presets[] = {
    /* name           arch             d     ffn    L   heads kv  vocab   ctx     eps   theta     tie */
    {"llama-2-7b",   MXQ_ARCH_LLAMA,   4096, 11008, 32, 32, 32, 32000,  4096,   1e-5, 10000.0,   0, 0},
    {"llama-2-70b",  MXQ_ARCH_LLAMA,   8192, 28672, 80, 64, 8,  32000,  4096,   1e-5, 10000.0,   0, 0},
    {"llama-3.1-8b", MXQ_ARCH_LLAMA,   4096, 14336, 32, 32, 8,  128256, 131072, 1e-5, 500000.0,  0, 1},
    {"qwen2-7b",     MXQ_ARCH_QWEN2,   3584, 18944, 28, 28, 4,  152064, 131072, 1e-6, 1000000.0, 0, 0},
    {"mistral-7b",   MXQ_ARCH_MISTRAL, 4096, 14336, 32, 32, 8,  32000,  32768,  1e-5, 10000.0,   0, 0},
    /* for tests: llama's layout, every linear input whole blocks of 128, the bundled tokenizer's vocabulary */
    {"tiny-llama",   MXQ_ARCH_LLAMA,   256,  512,   2,  4,  2,  512,    512,    1e-5, 10000.0,   0, 0},
};

const mxq_synth_preset *mxq_synth_preset_by_name(const char *name)
{
    for (size_t i = 0; i < sizeof(presets) / sizeof(presets[0]); i++)
        if (strcmp(presets[i].name, name) == 0)
            return &presets[i];
    return NULL;
}

const char *mxq_synth_preset_names(void)
{
    return "llama-2-7b llama-2-70b llama-3.1-8b qwen2-7b mistral-7b tiny-llama";
}

typedef struct {
    char name[128];
    int rank;
    int64_t shape[2];
    enum { FILL_NORMAL, FILL_ONES } fill;
    float scale;
} planned_tensor;

static uint64_t hash_name(const char *s, uint64_t seed)
{
    uint64_t h = 1469598103934665603ull ^ seed;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h ? h : 1;
}

/* Approximately normal values: Irwin-Hall sum of four uniforms, rescaled to
 * unit variance; cheap enough for tens of billions of values. */
static void fill_tensor(const planned_tensor *t, uint64_t seed, float *out, size_t n)
{
    if (t->fill == FILL_ONES) {
        for (size_t i = 0; i < n; i++)
            out[i] = 1.0f;
        return;
    }
    uint64_t s = hash_name(t->name, seed);
    const float k = t->scale * 1.7320508f * 0x1.0p-31f; /* sqrt(3) * 2 / 2^32 */
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        uint32_t a = (uint32_t)s, b = (uint32_t)(s >> 32);
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        uint32_t c = (uint32_t)s, d = (uint32_t)(s >> 32);
        double sum = (double)a + b + c + d - 2.0 * 4294967296.0;
        out[i] = (float)(sum * k * 0.5);
    }
}

static size_t plan_tensors(const mxq_model_config *cfg, planned_tensor *plan)
{
    size_t n = 0;
    const float std = 0.02f;
#define ADD(nm_fmt, l, r, d0, d1, fl)                                                  \
    do {                                                                               \
        snprintf(plan[n].name, sizeof(plan[n].name), nm_fmt, l);                       \
        plan[n].rank = r;                                                              \
        plan[n].shape[0] = d0;                                                         \
        plan[n].shape[1] = d1;                                                         \
        plan[n].fill = fl;                                                             \
        plan[n].scale = std;                                                           \
        n++;                                                                           \
    } while (0)
    ADD("model.embed_tokens.weight%.0d", 0, 2, cfg->vocab, cfg->hidden, FILL_NORMAL);
    for (int l = 0; l < cfg->n_layers; l++) {
        ADD("model.layers.%d.input_layernorm.weight", l, 1, cfg->hidden, 0, FILL_ONES);
        for (int li = 0; li < MXQ_LIN_COUNT; li++) {
            int out_f, in_f;
            mxq_linear_shape(cfg, (mxq_linear_id)li, &out_f, &in_f);
            char fmt[96];
            snprintf(fmt, sizeof(fmt), "model.layers.%%d.%s.weight", mxq_linear_name((mxq_linear_id)li));
            ADD(fmt, l, 2, out_f, in_f, FILL_NORMAL);
            if ((li <= MXQ_LIN_V && cfg->qkv_bias) || (li == MXQ_LIN_O && cfg->o_bias)) {
                snprintf(fmt, sizeof(fmt), "model.layers.%%d.%s.bias", mxq_linear_name((mxq_linear_id)li));
                ADD(fmt, l, 1, out_f, 0, FILL_NORMAL);
            }
        }
        ADD("model.layers.%d.post_attention_layernorm.weight", l, 1, cfg->hidden, 0, FILL_ONES);
    }
    ADD("model.norm.weight%.0d", 0, 1, cfg->hidden, 0, FILL_ONES);
    if (!cfg->tie_embeddings)
        ADD("lm_head.weight%.0d", 0, 2, cfg->vocab, cfg->hidden, FILL_NORMAL);
#undef ADD
    return n;
}

static size_t tensor_numel(const planned_tensor *t)
{
    return (size_t)t->shape[0] * (size_t)(t->rank == 2 ? t->shape[1] : 1);
}

static json_t *config_json(const mxq_synth_preset *p, const mxq_model_config *cfg, mxq_dtype dtype)
{
    const char *arch_class = cfg->arch == MXQ_ARCH_LLAMA     ? "LlamaForCausalLM"
                             : cfg->arch == MXQ_ARCH_MISTRAL ? "MistralForCausalLM"
                                                             : "Qwen2ForCausalLM";
    json_t *c = json_pack("{s:[s], s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:s, s:b, s:s, s:i, s:i}",
                          "architectures", arch_class, "model_type", mxq_arch_name(cfg->arch), "hidden_size",
                          cfg->hidden, "intermediate_size", cfg->intermediate, "num_hidden_layers", cfg->n_layers,
                          "num_attention_heads", cfg->n_heads, "num_key_value_heads", cfg->n_kv_heads, "head_dim",
                          cfg->head_dim, "vocab_size", cfg->vocab, "max_position_embeddings", cfg->max_positions,
                          "rms_norm_eps", cfg->rms_eps, "rope_theta", cfg->rope_theta, "hidden_act", "silu",
                          "tie_word_embeddings", cfg->tie_embeddings, "torch_dtype",
                          dtype == MXQ_DT_BF16 ? "bfloat16" : "float32", "bos_token_id", 1, "eos_token_id", 2);
    if (p->llama3_rope)
        json_object_set_new(c, "rope_scaling",
                            json_pack("{s:s, s:f, s:f, s:f, s:i}", "rope_type", "llama3", "factor", 8.0,
                                      "low_freq_factor", 1.0, "high_freq_factor", 4.0,
                                      "original_max_position_embeddings", 8192));
    if (cfg->arch == MXQ_ARCH_MISTRAL)
        json_object_set_new(c, "sliding_window", json_integer(4096));
    json_object_set_new(c, "mxq_synthetic", json_string(p->name));
    return c;
}

static void config_from_preset(const mxq_synth_options *opt, mxq_model_config *cfg)
{
    const mxq_synth_preset *p = opt->preset;
    memset(cfg, 0, sizeof(*cfg));
    cfg->arch = p->arch;
    cfg->hidden = p->hidden;
    cfg->intermediate = p->intermediate;
    cfg->n_layers = opt->layers > 0 ? opt->layers : p->layers;
    cfg->n_heads = p->heads;
    cfg->n_kv_heads = p->kv_heads;
    cfg->head_dim = p->hidden / p->heads;
    cfg->vocab = p->vocab;
    cfg->max_positions = p->max_positions;
    cfg->rms_eps = p->rms_eps;
    cfg->rope_theta = p->rope_theta;
    cfg->tie_embeddings = p->tie;
    cfg->qkv_bias = p->arch == MXQ_ARCH_QWEN2;
}

/* What synth will write: the tensors, which shard each goes to, and the
 * files (shards, index when sharded, config.json last). */
typedef struct {
    planned_tensor *tensors;
    int *shard_of;
    size_t n;
    int n_shards;
    size_t total_bytes;
    char (*files)[64]; /* n_shards shard names, then the index and config.json */
    size_t n_files;
} synth_plan;

static void synth_plan_free(synth_plan *plan)
{
    free(plan->tensors);
    free(plan->shard_of);
    free(plan->files);
    memset(plan, 0, sizeof(*plan));
}

/* Tensors go to shards in order; a new shard starts when the next tensor
 * would push the current one past shard_size. */
static mxq_status make_plan(mxq_ctx *ctx, const mxq_model_config *cfg, const mxq_synth_options *opt, synth_plan *plan)
{
    mxq_status status = MXQ_OK;
    size_t max_tensors = 4 + (size_t)cfg->n_layers * 16, esize = mxq_dtype_size(opt->dtype), in_shard = 0;
    plan->tensors = calloc(max_tensors, sizeof(*plan->tensors));
    plan->shard_of = calloc(max_tensors, sizeof(int));
    CHECK_ALLOC(ctx, plan->tensors && plan->shard_of, max_tensors * sizeof(*plan->tensors), "the tensor plan");
    plan->n = plan_tensors(cfg, plan->tensors);
    plan->n_shards = 1;
    for (size_t i = 0; i < plan->n; i++) {
        size_t bytes = tensor_numel(&plan->tensors[i]) * esize;
        if (opt->shard_size > 0 && in_shard > 0 && in_shard + bytes > opt->shard_size) {
            plan->n_shards++;
            in_shard = 0;
        }
        plan->shard_of[i] = plan->n_shards - 1;
        in_shard += bytes;
        plan->total_bytes += bytes;
    }
    plan->files = calloc((size_t)plan->n_shards + 2, sizeof(*plan->files));
    CHECK_ALLOC(ctx, plan->files, ((size_t)plan->n_shards + 2) * sizeof(*plan->files), "the file plan");
    for (int sh = 0; sh < plan->n_shards; sh++)
        if (plan->n_shards == 1)
            snprintf(plan->files[sh], sizeof(plan->files[0]), "model.safetensors");
        else
            mxq_shard_name(plan->files[sh], sizeof(plan->files[0]), sh, plan->n_shards);
    plan->n_files = (size_t)plan->n_shards;
    if (plan->n_shards > 1)
        snprintf(plan->files[plan->n_files++], sizeof(plan->files[0]), "model.safetensors.index.json");
    snprintf(plan->files[plan->n_files++], sizeof(plan->files[0]), "config.json");
fail:
    return status;
}

/* Fill tensor i in the output dtype (a new buffer: free() it). */
static mxq_status fill_in_dtype(mxq_ctx *ctx, const planned_tensor *t, const mxq_synth_options *opt, void **out)
{
    mxq_status status = MXQ_OK;
    size_t numel = tensor_numel(t);
    float *values = malloc(numel * sizeof(float));
    uint16_t *half = NULL;
    CHECK_ALLOC(ctx, values, numel * sizeof(float), t->name);
    fill_tensor(t, opt->seed, values, numel);
    if (opt->dtype == MXQ_DT_F32) {
        *out = values;
        return MXQ_OK;
    }
    half = malloc(numel * sizeof(uint16_t));
    CHECK_ALLOC(ctx, half, numel * sizeof(uint16_t), t->name);
    for (size_t i = 0; i < numel; i++)
        half[i] = mxq_f32_to_bf16(values[i]);
    *out = half;
fail:
    free(values);
    return status;
}

/* Shard sh: fill its tensors (peak memory is one shard) and write them
 * under a temporary name into *out, committed with the rest. */
static mxq_status write_shard(mxq_ctx *ctx, const synth_plan *plan, const mxq_synth_options *opt, const char *out_dir,
                              int sh, json_t *weight_map, mxq_output *out)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    size_t begin = 0, count = 0;
    while (begin < plan->n && plan->shard_of[begin] != sh)
        begin++;
    while (begin + count < plan->n && plan->shard_of[begin + count] == sh)
        count++;
    mxq_tensor_write *writes = calloc(count ? count : 1, sizeof(*writes));
    void **buffers = calloc(count ? count : 1, sizeof(void *));
    CHECK_ALLOC(ctx, writes && buffers, count * sizeof(*writes), "the shard table");
    for (size_t i = 0; i < count; i++) {
        const planned_tensor *t = &plan->tensors[begin + i];
        CALL(ctx, fill_in_dtype(ctx, t, opt, &buffers[i]));
        writes[i] = (mxq_tensor_write){t->name, opt->dtype, t->rank, {t->shape[0], t->shape[1]}, buffers[i]};
        CHECK(ctx, json_object_set_new(weight_map, t->name, json_string(plan->files[sh])) == 0, MXQ_ERR_NOMEM,
              "out of memory building the checkpoint index");
    }
    mxq_path_join(path, out_dir, plan->files[sh]);
    CALL(ctx, mxq_output_begin(ctx, path, NULL, out));
    CALL(ctx, mxq_st_write(ctx, out, writes, count));
    mxq_log(ctx, MXQ_LOG_INFO, "synth: wrote %s (%zu tensors)", plan->files[sh], count);
fail:
    for (size_t i = 0; buffers && i < count; i++)
        free(buffers[i]);
    free(buffers);
    free(writes);
    return status;
}

/* Everything under temporary names: the shards, the index if sharded, and
 * config.json (pending[] in that order, plan->n_files of them). */
static mxq_status write_pending(mxq_ctx *ctx, const mxq_synth_options *opt, const mxq_model_config *cfg,
                                const synth_plan *plan, const char *out_dir, mxq_output *pending)
{
    mxq_status status = MXQ_OK;
    json_t *weight_map = json_object(), *config = NULL;
    char path[MXQ_PATH_BUF];
    CHECK_ALLOC(ctx, weight_map, 1, "the checkpoint index");
    for (int sh = 0; sh < plan->n_shards; sh++)
        CALL(ctx, write_shard(ctx, plan, opt, out_dir, sh, weight_map, &pending[sh]));
    if (plan->n_shards > 1)
        CALL(ctx, mxq_ckpt_index_write(ctx, out_dir, weight_map, plan->total_bytes, NULL, NULL, NULL,
                                       &pending[plan->n_shards]));
    config = config_json(opt->preset, cfg, opt->dtype);
    CHECK_ALLOC(ctx, config, 1, "config.json");
    mxq_path_join(path, out_dir, "config.json");
    CALL(ctx, mxq_json_write_temp(ctx, config, path, NULL, &pending[plan->n_files - 1]));
fail:
    json_decref(weight_map);
    json_decref(config);
    return status;
}

mxq_status mxq_synth_write(mxq_ctx *ctx, const mxq_synth_options *opt, const char *out_dir)
{
    mxq_status status = MXQ_OK;
    synth_plan plan = {0};
    mxq_ckpt_dir dir = {0};
    mxq_output *pending = NULL;
    const char **names = NULL;
    mxq_model_config cfg;
    config_from_preset(opt, &cfg);
    CALL(ctx, make_plan(ctx, &cfg, opt, &plan));
    names = malloc(plan.n_files * sizeof(char *));
    pending = calloc(plan.n_files, sizeof(*pending)); /* zeroed: nothing to abort yet */
    CHECK_ALLOC(ctx, names && pending, plan.n_files * sizeof(*pending), "the file plan");
    for (size_t i = 0; i < plan.n_files; i++)
        names[i] = plan.files[i];
    CALL(ctx, mxq_ckpt_dir_prepare(ctx, &dir, out_dir, opt->force, names, plan.n_files, NULL));
    mxq_log(ctx, MXQ_LOG_INFO, "synth: %s with %d layers, %zu tensors, %.2f GB in %s, %d shard%s -> %s",
            opt->preset->name, cfg.n_layers, plan.n, (double)plan.total_bytes / 1e9, mxq_dtype_name(opt->dtype),
            plan.n_shards, plan.n_shards == 1 ? "" : "s", out_dir);
    CALL(ctx, write_pending(ctx, opt, &cfg, &plan, out_dir, pending));
    /* The commit: an earlier model's index and config.json go first; the
     * new config.json comes last, so that until then the directory is
     * visibly incomplete. */
    CALL(ctx, mxq_ckpt_dir_begin_commit(ctx, &dir));
    for (size_t i = 0; i < plan.n_files; i++)
        CALL(ctx, mxq_output_commit(ctx, &pending[i]));
    CALL(ctx, mxq_ckpt_dir_finish(ctx, &dir, NULL));
fail:
    for (size_t i = 0; pending && i < plan.n_files; i++)
        mxq_output_abort(&pending[i]);
    if (status != MXQ_OK)
        mxq_ckpt_dir_abandon(&dir);
    mxq_ckpt_dir_free(&dir);
    free(pending);
    free(names);
    synth_plan_free(&plan);
    return status;
}
