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

#include "check.h"
#include "mxq/fsutil.h"
#include "mxq/model.h"
#include "mxq/synth.h"

static const mxq_synth_preset presets[] = {
    /* name           arch             d     ffn    L   heads kv  vocab   ctx     eps   theta     tie */
    {"llama-2-7b",   MXQ_ARCH_LLAMA,   4096, 11008, 32, 32, 32, 32000,  4096,   1e-5, 10000.0,   0, 0},
    {"llama-2-70b",  MXQ_ARCH_LLAMA,   8192, 28672, 80, 64, 8,  32000,  4096,   1e-5, 10000.0,   0, 0},
    {"llama-3.1-8b", MXQ_ARCH_LLAMA,   4096, 14336, 32, 32, 8,  128256, 131072, 1e-5, 500000.0,  0, 1},
    {"qwen2-7b",     MXQ_ARCH_QWEN2,   3584, 18944, 28, 28, 4,  152064, 131072, 1e-6, 1000000.0, 0, 0},
    {"mistral-7b",   MXQ_ARCH_MISTRAL, 4096, 14336, 32, 32, 8,  32000,  32768,  1e-5, 10000.0,   0, 0},
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
    return "llama-2-7b llama-2-70b llama-3.1-8b qwen2-7b mistral-7b";
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

mxq_status mxq_synth_write(mxq_ctx *ctx, const mxq_synth_options *opt, const char *out_dir)
{
    mxq_status status = MXQ_OK;
    planned_tensor *plan = NULL;
    int *shard_of = NULL;
    mxq_tensor_write *writes = NULL;
    void **buffers = NULL;
    float *scratch = NULL;
    json_t *index = NULL, *config = NULL;
    char path[4096];
    size_t n_planned = 0;
    const mxq_synth_preset *p = opt->preset;

    mxq_model_config cfg = {0};
    cfg.arch = p->arch;
    cfg.hidden = p->hidden;
    cfg.intermediate = p->intermediate;
    cfg.n_layers = opt->layers > 0 ? opt->layers : p->layers;
    cfg.n_heads = p->heads;
    cfg.n_kv_heads = p->kv_heads;
    cfg.head_dim = p->hidden / p->heads;
    cfg.vocab = p->vocab;
    cfg.max_positions = p->max_positions;
    cfg.rms_eps = p->rms_eps;
    cfg.rope_theta = p->rope_theta;
    cfg.tie_embeddings = p->tie;
    cfg.qkv_bias = p->arch == MXQ_ARCH_QWEN2;

    struct stat st;
    if (stat(out_dir, &st) == 0) {
        CHECK(ctx, S_ISDIR(st.st_mode), MXQ_ERR_IO, "output '%s' exists and is not a directory", out_dir);
        snprintf(path, sizeof(path), "%s/config.json", out_dir);
        CHECK(ctx, opt->force || access(path, F_OK) != 0, MXQ_ERR_IO,
              "output directory '%s' already holds a model (config.json); use --force to overwrite it", out_dir);
    } else {
        CHECK(ctx, mkdir(out_dir, 0755) == 0, MXQ_ERR_IO, "cannot create output directory '%s': %s", out_dir,
              strerror(errno));
    }
    /* config.json goes last: until then the directory is visibly incomplete. */
    snprintf(path, sizeof(path), "%s/config.json", out_dir);
    unlink(path);

    size_t max_tensors = 4 + (size_t)cfg.n_layers * 16;
    plan = calloc(max_tensors, sizeof(*plan));
    shard_of = calloc(max_tensors, sizeof(int));
    CHECK_ALLOC(ctx, plan && shard_of, max_tensors * sizeof(*plan), "the tensor plan");
    size_t n = plan_tensors(&cfg, plan);
    n_planned = n;
    size_t esize = mxq_dtype_size(opt->dtype);

    /* Assign tensors to shards in order, starting a new shard when the next
     * tensor would push the current one past shard_size. */
    int n_shards = 1;
    size_t in_shard = 0, total_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        size_t bytes = tensor_numel(&plan[i]) * esize;
        if (opt->shard_size > 0 && in_shard > 0 && in_shard + bytes > opt->shard_size) {
            n_shards++;
            in_shard = 0;
        }
        shard_of[i] = n_shards - 1;
        in_shard += bytes;
        total_bytes += bytes;
    }
    mxq_log(ctx, MXQ_LOG_INFO, "synth: %s with %d layers, %zu tensors, %.2f GB in %s, %d shard%s -> %s", p->name,
            cfg.n_layers, n, (double)total_bytes / 1e9, mxq_dtype_name(opt->dtype), n_shards, n_shards == 1 ? "" : "s",
            out_dir);

    writes = calloc(n, sizeof(*writes));
    buffers = calloc(n, sizeof(void *));
    CHECK_ALLOC(ctx, writes && buffers, n * sizeof(*writes), "the shard table");
    index = json_object();
    json_t *weight_map = json_object();
    json_object_set_new(index, "metadata", json_pack("{s:I}", "total_size", (json_int_t)total_bytes));
    json_object_set_new(index, "weight_map", weight_map);

    size_t next = 0;
    for (int s = 0; s < n_shards; s++) {
        char shard_name[64];
        if (n_shards == 1)
            snprintf(shard_name, sizeof(shard_name), "model.safetensors");
        else
            snprintf(shard_name, sizeof(shard_name), "model-%05d-of-%05d.safetensors", s + 1, n_shards);
        size_t begin = next, count = 0;
        for (; next < n && shard_of[next] == s; next++, count++) {
            planned_tensor *t = &plan[next];
            size_t numel = tensor_numel(t);
            buffers[next] = malloc(numel * esize);
            CHECK_ALLOC(ctx, buffers[next], numel * esize, t->name);
            if (opt->dtype == MXQ_DT_F32) {
                fill_tensor(t, opt->seed, buffers[next], numel);
            } else {
                free(scratch);
                scratch = malloc(numel * sizeof(float));
                CHECK_ALLOC(ctx, scratch, numel * sizeof(float), t->name);
                fill_tensor(t, opt->seed, scratch, numel);
                uint16_t *dst = buffers[next];
                for (size_t i = 0; i < numel; i++)
                    dst[i] = mxq_f32_to_bf16(scratch[i]);
                free(scratch);
                scratch = NULL;
            }
            writes[next] = (mxq_tensor_write){t->name, opt->dtype, t->rank, {t->shape[0], t->shape[1]}, buffers[next]};
            json_object_set_new(weight_map, t->name, json_string(shard_name));
        }
        snprintf(path, sizeof(path), "%s/%s", out_dir, shard_name);
        CALL(ctx, mxq_st_write_file(ctx, path, writes + begin, count));
        for (size_t i = begin; i < begin + count; i++) {
            free(buffers[i]);
            buffers[i] = NULL;
        }
        mxq_log(ctx, MXQ_LOG_INFO, "synth: wrote %s (%zu tensors)", shard_name, count);
    }
    if (n_shards > 1) {
        snprintf(path, sizeof(path), "%s/model.safetensors.index.json", out_dir);
        CALL(ctx, mxq_json_write_atomic(ctx, index, path));
    } else {
        snprintf(path, sizeof(path), "%s/model.safetensors.index.json", out_dir);
        unlink(path); /* a stale index from an earlier sharded run would shadow the single file */
    }
    config = config_json(p, &cfg, opt->dtype);
    snprintf(path, sizeof(path), "%s/config.json", out_dir);
    CALL(ctx, mxq_json_write_atomic(ctx, config, path));
fail:
    for (size_t i = 0; buffers && i < n_planned; i++)
        free(buffers[i]);
    free(scratch);
    free(buffers);
    free(writes);
    free(plan);
    free(shard_of);
    json_decref(index);
    json_decref(config);
    return status;
}
