/* LLaMA-family models: Hugging Face config.json, weights of a range of
 * decoder layers, and the FP32 forward pass (OpenBLAS GEMMs). */
#ifndef MXQ_MODEL_H
#define MXQ_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"
#include "mxq/mx.h"
#include "mxq/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MXQ_ARCH_LLAMA = 0, MXQ_ARCH_MISTRAL, MXQ_ARCH_QWEN2 } mxq_arch;

typedef struct {
    mxq_arch arch;
    char model_type[32];
    int hidden;         /* d */
    int intermediate;   /* FFN width */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int vocab;
    int max_positions;
    double rms_eps;
    double rope_theta;
    /* Llama-3 rope scaling (rope_type "llama3"); factor 0 = none */
    double rope_factor;
    double rope_low_freq_factor;
    double rope_high_freq_factor;
    int rope_original_max_positions;
    int tie_embeddings;
    int qkv_bias;       /* q/k/v projections have biases (qwen2, llama attention_bias) */
    int o_bias;         /* o_proj has a bias (llama attention_bias) */
    int sliding_window; /* 0 = full causal attention */
    int bos_token;
    int eos_token; /* the first of eos_token_id's ids; 2 when absent */
    /* mxq's own checkpoints (quantization_config.quant_method = "mxq"):
     * quantized linears are stored as weight_packed + weight_scale. */
    int mx_weights;
    mxq_mx_spec mx_weight_spec;
    int mx_acts; /* activations MX-quantized at every linear input */
    mxq_mx_spec mx_act_spec;
} mxq_model_config;

/* Bounds on config.json sizes: far above any real model (Llama-3.1-405B:
 * width 53248, 126 layers, 128 heads), low enough that no size derived from
 * them overflows and that a corrupt value fails at once. */
#define MXQ_MAX_WIDTH (1 << 20)     /* hidden_size, intermediate_size */
#define MXQ_MAX_LAYERS 1024
#define MXQ_MAX_HEADS 4096
#define MXQ_MAX_HEAD_DIM 4096
#define MXQ_MAX_VOCAB (1 << 24)
#define MXQ_MAX_POSITIONS (1 << 24)

/* Parse <dir>/config.json. Unsupported architectures and values are errors
 * naming the key. Reads both top-level rope_theta/rope_scaling and the
 * rope_parameters object of recent transformers versions. */
mxq_status mxq_config_load(mxq_ctx *ctx, const char *dir, mxq_model_config *cfg);
const char *mxq_arch_name(mxq_arch arch);

/* Parameter counts, used to balance layers over ranks. */
size_t mxq_config_layer_params(const mxq_model_config *cfg);
size_t mxq_config_embedding_params(const mxq_model_config *cfg);

/* The seven linear projections of a decoder layer, in a fixed order. */
typedef enum {
    MXQ_LIN_Q = 0,
    MXQ_LIN_K,
    MXQ_LIN_V,
    MXQ_LIN_O,
    MXQ_LIN_GATE,
    MXQ_LIN_UP,
    MXQ_LIN_DOWN,
    MXQ_LIN_COUNT
} mxq_linear_id;

const char *mxq_linear_name(mxq_linear_id id); /* "self_attn.q_proj", "mlp.up_proj", ... */
/* [out, in] of a linear under cfg */
void mxq_linear_shape(const mxq_model_config *cfg, mxq_linear_id id, int *out_features, int *in_features);

typedef struct {
    float *attn_norm;               /* [d] */
    float *ffn_norm;                /* [d] */
    float *weight[MXQ_LIN_COUNT];   /* [out, in] row-major, as in the checkpoint */
    float *bias[MXQ_LIN_COUNT];     /* [out] or NULL */
} mxq_layer;

/* The part of a model one rank holds: layers [first_layer, last_layer), plus
 * the embedding when it owns the input and the final norm and lm_head when it
 * owns the output. */
typedef struct {
    mxq_model_config cfg;
    int first_layer;
    int last_layer;
    int has_embedding;
    int has_head;
    float *embedding;  /* [vocab, d] when has_embedding */
    float *final_norm; /* [d] when has_head */
    float *lm_head;    /* [vocab, d] when has_head (the embedding when tied) */
    mxq_layer *layers; /* last_layer - first_layer entries */
    double *rope_inv_freq; /* [head_dim / 2] */
    mxq_checkpoint *ckpt;  /* internal (src/model/lazy.h): where a lazily loaded model's layers
                              come from; NULL when every layer is loaded */
} mxq_model;

typedef struct {
    int first_layer, last_layer; /* [first, last) */
    int embedding, head;
} mxq_model_part;

/* The checkpoint in `dir` against cfg, from the headers alone and before
 * anything proportional to the config is allocated: every tensor cfg
 * implies exists with the shape cfg implies, and no tensor belongs to a
 * decoder layer cfg does not have. Errors name the tensor and file. */
mxq_status mxq_model_check_checkpoint(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg);

mxq_status mxq_model_load(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, const mxq_model_part *part,
                          mxq_model **out);
void mxq_model_free(mxq_model *model);

/* Fake quantization for evaluation: weights rounded to nearest in MX once,
 * and the input of every linear MX-quantized at run time. */
typedef struct {
    int enabled_weights;
    int enabled_acts;
    mxq_mx_spec weights;
    mxq_mx_spec acts;
} mxq_fake_quant;

mxq_status mxq_model_fake_quantize_weights(mxq_ctx *ctx, mxq_model *model, const mxq_mx_spec *spec);

/* The four distinct inputs of a layer's linears: q/k/v share the normed
 * attention input, gate/up the normed MLP input. */
typedef enum {
    MXQ_INPUT_ATTN = 0, /* q_proj, k_proj, v_proj */
    MXQ_INPUT_O,        /* o_proj: attention output */
    MXQ_INPUT_MLP,      /* gate_proj, up_proj */
    MXQ_INPUT_DOWN,     /* down_proj: silu(gate) * up */
    MXQ_INPUT_COUNT
} mxq_input_id;

mxq_input_id mxq_linear_input(mxq_linear_id id);
const char *mxq_input_name(mxq_input_id id); /* "attn_in", "o_in", "mlp_in", "down_in" */
int mxq_input_features(const mxq_model_config *cfg, mxq_input_id id);

/* Called with each linear input x [tokens, features] as the forward pass
 * produces it (before any activation quantization), once per shared input. */
typedef struct {
    mxq_status (*fn)(mxq_ctx *ctx, void *user, int layer, mxq_input_id input, const float *x, size_t tokens,
                     int features);
    void *user;
} mxq_observer;

/* Scratch space for a forward pass over up to max_seqs sequences of seq_len. */
typedef struct mxq_workspace mxq_workspace;
mxq_status mxq_workspace_create(mxq_ctx *ctx, const mxq_model_config *cfg, int max_seqs, int seq_len,
                                mxq_workspace **out);
void mxq_workspace_free(mxq_workspace *ws);
/* Bytes a workspace takes (for memory plans; double: plans of any size). */
double mxq_workspace_bytes(const mxq_model_config *cfg, int max_seqs, int seq_len);

/* x [n_seqs * seq_len, d] <- embedding rows of tokens [n_seqs, seq_len] */
mxq_status mxq_model_embed(mxq_ctx *ctx, const mxq_model *model, const int32_t *tokens, int n_seqs, int seq_len,
                           float *x);
/* Run layers [from, to) (absolute indices, owned by this model part) in place
 * on x [n_seqs * seq_len, d]. Every sequence starts at position 0. */
mxq_status mxq_model_run_layers(mxq_ctx *ctx, const mxq_model *model, int from, int to, float *x, int n_seqs,
                                int seq_len, const mxq_fake_quant *fq, mxq_workspace *ws);
/* The same, showing every linear input to `observer` (may be NULL). */
mxq_status mxq_model_run_layers_observed(mxq_ctx *ctx, const mxq_model *model, int from, int to, float *x,
                                         int n_seqs, int seq_len, const mxq_fake_quant *fq,
                                         const mxq_observer *observer, mxq_workspace *ws);
/* logits [n_seqs * seq_len, vocab] = lm_head(final_norm(x)); x is not changed. */
mxq_status mxq_model_logits(mxq_ctx *ctx, const mxq_model *model, const float *x, int n_seqs, int seq_len,
                            float *logits, mxq_workspace *ws);
/* Sum of -log p(tokens[t+1] | tokens[..t]) over t < seq_len-1 per sequence:
 * nll [n_seqs]. Computes the logits internally, a chunk at a time. */
mxq_status mxq_model_sequence_nll(mxq_ctx *ctx, const mxq_model *model, const float *x, const int32_t *tokens,
                                  int n_seqs, int seq_len, double *nll, mxq_workspace *ws);

#ifdef __cplusplus
}
#endif

#endif
