/* config.json parsing (llama, mistral, qwen2, rope variants), the layer
 * partition, and synthetic models written by mxq_synth_write read back
 * through the normal loader, single-file and sharded. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "model/lazy.h"
#include "mxq/mxq.h"
#include "parallel/parallel.h"
#include "testutil.h"

static const char *config_dir(const char *name, const char *json)
{
    char *dir = malloc(512);
    snprintf(dir, 512, "%s/%s", tu_scratch_dir(), name);
    mkdir(dir, 0755);
    char path[600];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    tu_write_file(path, json, strlen(json));
    return dir;
}

static void test_llama3_rope_parameters(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_model_config cfg;
    /* transformers >= 4.5x writes rope_parameters instead of rope_theta/rope_scaling */
    const char *dir = config_dir("l3", "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 14336,"
                                       "\"num_hidden_layers\": 32, \"num_attention_heads\": 32, \"num_key_value_heads\": 8,"
                                       "\"vocab_size\": 128256, \"max_position_embeddings\": 131072, \"head_dim\": null,"
                                       "\"rope_parameters\": {\"rope_theta\": 500000.0, \"rope_type\": \"llama3\","
                                       "\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0,"
                                       "\"original_max_position_embeddings\": 8192}}");
    assert_int_equal(mxq_config_load(ctx, dir, &cfg), MXQ_OK);
    assert_int_equal(cfg.head_dim, 128);
    assert_int_equal(cfg.n_kv_heads, 8);
    assert_true(cfg.rope_theta == 500000.0);
    assert_true(cfg.rope_factor == 8.0);
    assert_int_equal(cfg.rope_original_max_positions, 8192);
    assert_int_equal(cfg.tie_embeddings, 0);
    /* the classic spelling gives the same configuration */
    mxq_model_config classic;
    dir = config_dir("l3c", "{\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 14336,"
                            "\"num_hidden_layers\": 32, \"num_attention_heads\": 32, \"num_key_value_heads\": 8,"
                            "\"vocab_size\": 128256, \"max_position_embeddings\": 131072, \"rope_theta\": 500000.0,"
                            "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0,"
                            "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}}");
    assert_int_equal(mxq_config_load(ctx, dir, &classic), MXQ_OK);
    assert_memory_equal(&cfg, &classic, sizeof(cfg));
    /* both spellings at once: accepted when they agree, refused when not */
    const char *head = "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 128,"
                       "\"num_hidden_layers\": 1, \"num_attention_heads\": 4, \"vocab_size\": 32,"
                       "\"max_position_embeddings\": 64, \"rope_theta\": 500000.0,";
    const char *l3 = "{\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0,"
                     "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 32}";
    char json[1024];
    snprintf(json, sizeof(json), "%s \"rope_scaling\": %s, \"rope_parameters\": %s}", head, l3, l3);
    assert_int_equal(mxq_config_load(ctx, config_dir("both-same", json), &cfg), MXQ_OK);
    assert_true(cfg.rope_factor == 8.0);
    snprintf(json, sizeof(json), "%s \"rope_scaling\": %s, \"rope_parameters\": {\"rope_type\": \"default\"}}",
             head, l3);
    assert_int_equal(mxq_config_load(ctx, config_dir("both-differ", json), &cfg), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "rope_parameters disagrees with rope_scaling"));
    mxq_error_clear(ctx);
    snprintf(json, sizeof(json), "%s \"rope_parameters\": {\"rope_theta\": 10000.0}}", head);
    assert_int_equal(mxq_config_load(ctx, config_dir("theta-differ", json), &cfg), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "rope_parameters disagrees with rope_theta"));
    /* the same theta in both places, with llama3 scaling only in rope_parameters */
    mxq_error_clear(ctx);
    snprintf(json, sizeof(json), "%s \"rope_parameters\": {\"rope_theta\": 500000.0, \"rope_type\": \"llama3\","
             "\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 32}}",
             head);
    assert_int_equal(mxq_config_load(ctx, config_dir("theta-same", json), &cfg), MXQ_OK);
    assert_true(cfg.rope_factor == 8.0);
    /* eos_token_id: an id, a list (the first), out of range */
    snprintf(json, sizeof(json), "%s \"eos_token_id\": [7, 9]}", head);
    assert_int_equal(mxq_config_load(ctx, config_dir("eos-list", json), &cfg), MXQ_OK);
    assert_int_equal(cfg.eos_token, 7);
    snprintf(json, sizeof(json), "%s \"eos_token_id\": 5}", head);
    assert_int_equal(mxq_config_load(ctx, config_dir("eos-id", json), &cfg), MXQ_OK);
    assert_int_equal(cfg.eos_token, 5);
    snprintf(json, sizeof(json), "%s \"eos_token_id\": 32}", head);
    assert_int_equal(mxq_config_load(ctx, config_dir("eos-far", json), &cfg), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "eos_token_id 32 is not a token id below vocab_size (32)"));
    /* partial rotation is not LLaMA's */
    mxq_error_clear(ctx);
    snprintf(json, sizeof(json), "%s \"partial_rotary_factor\": 0.5}", head);
    assert_int_equal(mxq_config_load(ctx, config_dir("partial", json), &cfg), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "partial_rotary_factor 0.5"));
    mxq_error_clear(ctx);
    snprintf(json, sizeof(json), "%s \"rope_parameters\": {\"rope_type\": \"default\", \"partial_rotary_factor\": 0.5}}",
             head);
    assert_int_equal(mxq_config_load(ctx, config_dir("partial-in-params", json), &cfg), MXQ_ERR_FORMAT);
    assert_non_null(strstr(mxq_error_message(ctx), "rope_parameters.partial_rotary_factor 0.5"));
    mxq_ctx_destroy(ctx);
}

static void test_qwen2_and_mistral(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_model_config cfg;
    const char *dir = config_dir("q2", "{\"architectures\": [\"Qwen2ForCausalLM\"], \"hidden_size\": 3584,"
                                       "\"intermediate_size\": 18944, \"num_hidden_layers\": 28, \"num_attention_heads\": 28,"
                                       "\"num_key_value_heads\": 4, \"vocab_size\": 152064, \"rope_theta\": 1000000.0,"
                                       "\"sliding_window\": 131072, \"use_sliding_window\": false, \"rms_norm_eps\": 1e-06}");
    assert_int_equal(mxq_config_load(ctx, dir, &cfg), MXQ_OK);
    assert_int_equal(cfg.arch, MXQ_ARCH_QWEN2);
    assert_int_equal(cfg.qkv_bias, 1);
    assert_int_equal(cfg.o_bias, 0);
    assert_int_equal(cfg.sliding_window, 0);
    assert_int_equal(cfg.head_dim, 128);
    dir = config_dir("mi", "{\"model_type\": \"mistral\", \"hidden_size\": 4096, \"intermediate_size\": 14336,"
                           "\"num_hidden_layers\": 32, \"num_attention_heads\": 32, \"num_key_value_heads\": 8,"
                           "\"vocab_size\": 32000, \"sliding_window\": 4096}");
    assert_int_equal(mxq_config_load(ctx, dir, &cfg), MXQ_OK);
    assert_int_equal(cfg.sliding_window, 4096);
    assert_int_equal(cfg.qkv_bias, 0);
    mxq_ctx_destroy(ctx);
}

static void expect_config_error(const char *json, const char *fragment)
{
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_model_config cfg;
    const char *dir = config_dir("bad", json);
    assert_int_not_equal(mxq_config_load(ctx, dir, &cfg), MXQ_OK);
    if (!strstr(mxq_error_message(ctx), fragment) || !strstr(mxq_error_message(ctx), "config.json"))
        fail_msg("expected '%s' and the file name in: %s", fragment, mxq_error_message(ctx));
    mxq_ctx_destroy(ctx);
}

static void test_config_errors(void **state)
{
    (void)state;
    const char *base = "\"hidden_size\": 64, \"intermediate_size\": 172, \"num_hidden_layers\": 5,"
                       "\"num_attention_heads\": 8, \"vocab_size\": 512";
    char json[1024];
    snprintf(json, sizeof(json), "{\"model_type\": \"gpt_neox\", %s}", base);
    expect_config_error(json, "unsupported architecture 'gpt_neox'");
    snprintf(json, sizeof(json), "{%s}", base);
    expect_config_error(json, "missing required key 'model_type'");
    expect_config_error("{\"model_type\": \"llama\", \"hidden_size\": 64}", "missing required key 'intermediate_size'");
    snprintf(json, sizeof(json), "{\"model_type\": \"llama\", %s, \"num_key_value_heads\": 3}", base);
    expect_config_error(json, "multiple of num_key_value_heads");
    snprintf(json, sizeof(json), "{\"model_type\": \"llama\", %s, \"hidden_act\": \"gelu\"}", base);
    expect_config_error(json, "hidden_act 'gelu'");
    snprintf(json, sizeof(json), "{\"model_type\": \"llama\", %s, \"mlp_bias\": true}", base);
    expect_config_error(json, "mlp_bias");
    snprintf(json, sizeof(json), "{\"model_type\": \"llama\", %s, \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}}",
             base);
    expect_config_error(json, "rope_type 'linear' is not supported");
    snprintf(json, sizeof(json), "{\"model_type\": \"llama\", \"hidden_size\": \"64\", \"intermediate_size\": 172}");
    expect_config_error(json, "'hidden_size' must be an integer");
    expect_config_error("{\"model_type\": \"llama\",", "not valid JSON");
    /* found by tests/fuzz/fuzz_config: more heads than hidden_size gave head_dim 0 */
    expect_config_error("{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 172, "
                        "\"num_hidden_layers\": 5, \"num_attention_heads\": 98, \"vocab_size\": 512}",
                        "hidden_size (64) is not num_attention_heads (98) heads of 2 or more, and there is no head_dim");
    expect_config_error("{\"model_type\": \"llama\", \"hidden_size\": 65, \"intermediate_size\": 172, "
                        "\"num_hidden_layers\": 5, \"num_attention_heads\": 8, \"vocab_size\": 512}",
                        "hidden_size (65) is not num_attention_heads (8) heads");
}

static void test_partition(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_model_config cfg = {0};
    cfg.hidden = 4096;
    cfg.intermediate = 11008;
    cfg.n_layers = 32;
    cfg.n_heads = cfg.n_kv_heads = 32;
    cfg.head_dim = 128;
    cfg.vocab = 32000;
    for (int ranks = 1; ranks <= 32; ranks++) {
        int first[33];
        assert_int_equal(mxq_partition_layers(ctx, &cfg, ranks, first), MXQ_OK);
        assert_int_equal(first[0], 0);
        assert_int_equal(first[ranks], 32);
        int min = 1 << 30, max = 0;
        for (int r = 0; r < ranks; r++) {
            int n = first[r + 1] - first[r];
            assert_true(n >= 1);
            min = n < min ? n : min;
            max = n > max ? n : max;
        }
        /* embedding/lm_head make the end ranks lighter, never by much */
        assert_true(max - min <= 2);
    }
    int first[40];
    assert_int_equal(mxq_partition_layers(ctx, &cfg, 33, first), MXQ_ERR_ARG);
    assert_non_null(strstr(mxq_error_message(ctx), "at most 32 ranks"));
    mxq_ctx_destroy(ctx);
}

/* A tiny qwen2-like preset (q/k/v biases) through the real writer and loader. */
/* A lazy model holds no layer until asked; a loaded layer equals the eager
 * model's, and loads again the same after it is unloaded. */
static void check_lazy_layers(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, mxq_model *eager)
{
    mxq_model_part all = {0, 3, 1, 0};
    mxq_model *m;
    if (mxq_model_load_lazy(ctx, dir, cfg, &all, 1, 0, &m) != MXQ_OK)
        fail_msg("%s", mxq_error_message(ctx));
    assert_non_null(m->embedding);
    for (int l = 0; l < 3; l++) {
        assert_null(m->layers[l].weight[MXQ_LIN_DOWN]);
        assert_null(m->layers[l].attn_norm);
        for (int round = 0; round < 2; round++) {
            assert_int_equal(mxq_model_layer_load(ctx, m, l), MXQ_OK);
            assert_memory_equal(m->layers[l].attn_norm, eager->layers[l].attn_norm, (size_t)cfg->hidden * sizeof(float));
            assert_memory_equal(m->layers[l].bias[MXQ_LIN_K], eager->layers[l].bias[MXQ_LIN_K],
                                (size_t)cfg->n_kv_heads * cfg->head_dim * sizeof(float));
            for (int li = 0; li < MXQ_LIN_COUNT; li++) {
                int o, in;
                mxq_linear_shape(cfg, (mxq_linear_id)li, &o, &in);
                assert_memory_equal(m->layers[l].weight[li], eager->layers[l].weight[li], (size_t)o * in * sizeof(float));
            }
            assert_int_equal(mxq_model_layer_unload(ctx, m, l), MXQ_OK);
            assert_null(m->layers[l].weight[MXQ_LIN_Q]);
            assert_null(m->layers[l].bias[MXQ_LIN_Q]);
        }
    }
    assert_int_equal(mxq_model_unload_embedding(ctx, m), MXQ_OK);
    assert_null(m->embedding);
    /* an eager model has no checkpoint to load from: said, not a crash */
    assert_int_equal(mxq_model_layer_load(ctx, eager, 0), MXQ_ERR_INTERNAL);
    assert_non_null(strstr(mxq_error_message(ctx), "not loaded lazily"));
    mxq_error_clear(ctx);
    mxq_model_free(m);
}

static void test_synth_roundtrip(void **state)
{
    (void)state;
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR);
    mxq_synth_preset tiny = {"tiny-qwen2", MXQ_ARCH_QWEN2, 64, 96, 3, 4, 2, 100, 256, 1e-6, 10000.0, 0, 0};
    char single[512], sharded[512];
    snprintf(single, sizeof(single), "%s/synth1", tu_scratch_dir());
    snprintf(sharded, sizeof(sharded), "%s/synth2", tu_scratch_dir());
    mxq_synth_options opt = {&tiny, 0, MXQ_DT_F32, 0, 7, 0};
    assert_int_equal(mxq_synth_write(ctx, &opt, single), MXQ_OK);
    opt.shard_size = 40000; /* several shards */
    assert_int_equal(mxq_synth_write(ctx, &opt, sharded), MXQ_OK);
    /* writing again without force is refused */
    assert_int_equal(mxq_synth_write(ctx, &opt, sharded), MXQ_ERR_IO);
    assert_non_null(strstr(mxq_error_message(ctx), "--force"));
    mxq_error_clear(ctx);
    char path[600];
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", sharded);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    snprintf(path, sizeof(path), "%s/model-00002-of-", sharded);

    mxq_model_config c1, c2;
    assert_int_equal(mxq_config_load(ctx, single, &c1), MXQ_OK);
    assert_int_equal(mxq_config_load(ctx, sharded, &c2), MXQ_OK);
    assert_int_equal(c1.qkv_bias, 1);
    assert_int_equal(c1.n_layers, 3);
    mxq_model_part all = {0, 3, 1, 1};
    mxq_model *m1, *m2;
    if (mxq_model_load(ctx, single, &c1, &all, &m1) != MXQ_OK || mxq_model_load(ctx, sharded, &c2, &all, &m2) != MXQ_OK)
        fail_msg("%s", mxq_error_message(ctx));
    /* same seed and names: same values however it is sharded */
    for (int l = 0; l < 3; l++)
        for (int li = 0; li < MXQ_LIN_COUNT; li++) {
            int o, in;
            mxq_linear_shape(&c1, (mxq_linear_id)li, &o, &in);
            assert_memory_equal(m1->layers[l].weight[li], m2->layers[l].weight[li], (size_t)o * in * sizeof(float));
        }
    assert_non_null(m1->layers[0].bias[MXQ_LIN_Q]);
    assert_null(m1->layers[0].bias[MXQ_LIN_O]);
    /* the weights look like N(0, 0.02^2) */
    int o, in;
    mxq_linear_shape(&c1, MXQ_LIN_GATE, &o, &in);
    double sum = 0, sq = 0;
    for (int i = 0; i < o * in; i++) {
        sum += m1->layers[1].weight[MXQ_LIN_GATE][i];
        sq += (double)m1->layers[1].weight[MXQ_LIN_GATE][i] * m1->layers[1].weight[MXQ_LIN_GATE][i];
    }
    double mean = sum / (o * in), sd = sqrt(sq / (o * in) - mean * mean);
    assert_true(fabs(mean) < 0.002 && fabs(sd - 0.02) < 0.002);

    /* and it runs: finite NLL near log(vocab) for random weights */
    mxq_workspace *ws;
    assert_int_equal(mxq_workspace_create(ctx, &c1, 2, 16, &ws), MXQ_OK);
    int32_t tokens[32];
    for (int i = 0; i < 32; i++)
        tokens[i] = (i * 37) % 100;
    float *x = malloc(32 * 64 * sizeof(float));
    double nll[2];
    assert_int_equal(mxq_model_embed(ctx, m1, tokens, 2, 16, x), MXQ_OK);
    assert_int_equal(mxq_model_run_layers(ctx, m1, 0, 3, x, 2, 16, NULL, ws), MXQ_OK);
    assert_int_equal(mxq_model_sequence_nll(ctx, m1, x, tokens, 2, 16, nll, ws), MXQ_OK);
    assert_true(isfinite(nll[0]) && fabs(nll[0] / 15 - log(100.0)) < 0.5);
    free(x);
    mxq_workspace_free(ws);
    check_lazy_layers(ctx, sharded, &c2, m1);
    mxq_model_free(m1);
    mxq_model_free(m2);
    mxq_ctx_destroy(ctx);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama3_rope_parameters), cmocka_unit_test(test_qwen2_and_mistral),
        cmocka_unit_test(test_config_errors),          cmocka_unit_test(test_partition),
        cmocka_unit_test(test_synth_roundtrip),
    };
    return cmocka_run_group_tests_name("config_synth", tests, NULL, NULL);
}
