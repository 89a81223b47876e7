/* The LLaMA-family forward pass in FP32: RMSNorm, rotary embeddings
 * (rotate-half layout, as Hugging Face stores q/k), causal GQA attention,
 * SwiGLU MLP, residuals, final norm and logits. Matrix products are OpenBLAS
 * sgemm calls; everything else is plain loops over rows.
 *
 * Activations are [tokens, features] row-major, tokens = n_seqs * seq_len,
 * sequence-major; every sequence starts at position 0. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "model/model_internal.h"
#include "mxq/model.h"

struct mxq_workspace {
    int max_seqs, seq_len;
    float *h;      /* [T, d]    normed input of attention / MLP */
    float *q;      /* [T, nh*hd] */
    float *k;      /* [T, nkv*hd] */
    float *v;      /* [T, nkv*hd] */
    float *attn;   /* [T, nh*hd] attention output, input of o_proj */
    float *proj;   /* [T, d]    o_proj / down_proj output */
    float *gate;   /* [T, ffn] */
    float *up;     /* [T, ffn] */
    float *scores; /* [S, S] */
    float *cos_table, *sin_table; /* [S, hd/2] */
    float *logits; /* [S, vocab] one sequence at a time */
    int rope_ready;
};

double mxq_workspace_bytes(const mxq_model_config *cfg, int max_seqs, int seq_len)
{
    double T = (double)max_seqs * seq_len, S = seq_len, d = cfg->hidden, ffn = cfg->intermediate;
    double qd = (double)cfg->n_heads * cfg->head_dim, kvd = (double)cfg->n_kv_heads * cfg->head_dim;
    return sizeof(float) * (T * (2 * d + 2 * qd + 2 * kvd + 2 * ffn) + S * S + S * cfg->head_dim + S * cfg->vocab);
}

mxq_status mxq_workspace_create(mxq_ctx *ctx, const mxq_model_config *cfg, int max_seqs, int seq_len,
                                mxq_workspace **out)
{
    mxq_status status = MXQ_OK;
    mxq_workspace *ws = calloc(1, sizeof(*ws));
    CHECK_ALLOC(ctx, ws, sizeof(*ws), "the forward workspace");
    ws->max_seqs = max_seqs;
    ws->seq_len = seq_len;
    size_t T = (size_t)max_seqs * (size_t)seq_len;
    size_t d = (size_t)cfg->hidden, qd = (size_t)cfg->n_heads * cfg->head_dim,
           kvd = (size_t)cfg->n_kv_heads * cfg->head_dim, ffn = (size_t)cfg->intermediate;
    size_t S = (size_t)seq_len, half = (size_t)cfg->head_dim / 2;
    ws->h = mxq_alloc_floats(T * d);
    ws->q = mxq_alloc_floats(T * qd);
    ws->k = mxq_alloc_floats(T * kvd);
    ws->v = mxq_alloc_floats(T * kvd);
    ws->attn = mxq_alloc_floats(T * qd);
    ws->proj = mxq_alloc_floats(T * d);
    ws->gate = mxq_alloc_floats(T * ffn);
    ws->up = mxq_alloc_floats(T * ffn);
    ws->scores = mxq_alloc_floats(S * S);
    ws->cos_table = mxq_alloc_floats(S * half);
    ws->sin_table = mxq_alloc_floats(S * half);
    ws->logits = mxq_alloc_floats(S * (size_t)cfg->vocab);
    CHECK_ALLOC(ctx,
                ws->h && ws->q && ws->k && ws->v && ws->attn && ws->proj && ws->gate && ws->up && ws->scores &&
                    ws->cos_table && ws->sin_table && ws->logits,
                (size_t)mxq_workspace_bytes(cfg, max_seqs, seq_len), "the forward workspace");
    *out = ws;
    return MXQ_OK;
fail:
    mxq_workspace_free(ws);
    *out = NULL;
    return status;
}

void mxq_workspace_free(mxq_workspace *ws)
{
    if (!ws)
        return;
    free(ws->h);
    free(ws->q);
    free(ws->k);
    free(ws->v);
    free(ws->attn);
    free(ws->proj);
    free(ws->gate);
    free(ws->up);
    free(ws->scores);
    free(ws->cos_table);
    free(ws->sin_table);
    free(ws->logits);
    free(ws);
}

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, per token row. */
static void rms_norm(const float *x, const float *w, float *out, size_t tokens, int d, double eps)
{
    for (size_t t = 0; t < tokens; t++) {
        const float *row = x + t * (size_t)d;
        double sum = 0.0;
        for (int i = 0; i < d; i++)
            sum += (double)row[i] * row[i];
        float inv = (float)(1.0 / sqrt(sum / d + eps));
        float *o = out + t * (size_t)d;
        for (int i = 0; i < d; i++)
            o[i] = w[i] * (row[i] * inv);
    }
}

/* y [T, out] = x [T, in] W^T (+ b) */
static void linear(const float *x, const float *w, const float *b, float *y, size_t tokens, int out_f, int in_f)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)tokens, out_f, in_f, 1.0f, x, in_f, w, in_f, 0.0f, y,
                out_f);
    if (b)
        for (size_t t = 0; t < tokens; t++)
            for (int o = 0; o < out_f; o++)
                y[t * (size_t)out_f + o] += b[o];
}

static mxq_status quantize_acts(mxq_ctx *ctx, const mxq_fake_quant *fq, float *x, size_t tokens, int features)
{
    if (!fq || !fq->enabled_acts)
        return MXQ_OK;
    return mxq_mx_quantize_rows(ctx, &fq->acts, x, tokens, (size_t)features, NULL, NULL, x);
}

static void build_rope_tables(const mxq_model *m, mxq_workspace *ws)
{
    int half = m->cfg.head_dim / 2;
    for (int p = 0; p < ws->seq_len; p++)
        for (int i = 0; i < half; i++) {
            /* as transformers: the angle is a float32 product */
            float angle = (float)p * (float)m->rope_inv_freq[i];
            ws->cos_table[(size_t)p * half + i] = (float)cos((double)angle);
            ws->sin_table[(size_t)p * half + i] = (float)sin((double)angle);
        }
    ws->rope_ready = 1;
}

/* Rotate-half rotary embedding on each head of x [T, n_heads*hd]. */
static void apply_rope(float *x, const mxq_workspace *ws, int n_seqs, int seq_len, int n_heads, int hd)
{
    int half = hd / 2;
    size_t width = (size_t)n_heads * hd;
    for (int s = 0; s < n_seqs; s++)
        for (int p = 0; p < seq_len; p++) {
            float *row = x + ((size_t)s * seq_len + p) * width;
            const float *c = ws->cos_table + (size_t)p * half, *sn = ws->sin_table + (size_t)p * half;
            for (int h = 0; h < n_heads; h++) {
                float *head = row + (size_t)h * hd;
                for (int i = 0; i < half; i++) {
                    float x1 = head[i], x2 = head[i + half];
                    head[i] = x1 * c[i] - x2 * sn[i];
                    head[i + half] = x2 * c[i] + x1 * sn[i];
                }
            }
        }
}

/* Causal (optionally sliding-window) grouped-query attention, one sequence
 * and head at a time: scores = q k^T / sqrt(hd), masked softmax, out = P v. */
static void attention(const mxq_model_config *cfg, mxq_workspace *ws, int n_seqs, int seq_len)
{
    const int S = seq_len, hd = cfg->head_dim, nh = cfg->n_heads, nkv = cfg->n_kv_heads;
    const int qw = nh * hd, kvw = nkv * hd, group = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);
    const int window = cfg->sliding_window;
    for (int s = 0; s < n_seqs; s++) {
        const float *q = ws->q + (size_t)s * S * qw;
        const float *k = ws->k + (size_t)s * S * kvw;
        const float *v = ws->v + (size_t)s * S * kvw;
        float *out = ws->attn + (size_t)s * S * qw;
        for (int h = 0; h < nh; h++) {
            int g = h / group;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, S, hd, scale, q + (size_t)h * hd, qw,
                        k + (size_t)g * hd, kvw, 0.0f, ws->scores, S);
            for (int i = 0; i < S; i++) {
                float *row = ws->scores + (size_t)i * S;
                int lo = (window > 0 && i - window + 1 > 0) ? i - window + 1 : 0;
                float mx = -INFINITY;
                for (int j = lo; j <= i; j++)
                    mx = row[j] > mx ? row[j] : mx;
                /* exponentials first, then their sum in the same order: the
                 * same bits as one loop, without a float live across calls */
                for (int j = lo; j <= i; j++)
                    row[j] = expf(row[j] - mx);
                float sum = 0.0f;
                for (int j = lo; j <= i; j++)
                    sum += row[j];
                float inv = 1.0f / sum;
                for (int j = 0; j < lo; j++)
                    row[j] = 0.0f;
                for (int j = lo; j <= i; j++)
                    row[j] *= inv;
                for (int j = i + 1; j < S; j++)
                    row[j] = 0.0f;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, hd, S, 1.0f, ws->scores, S, v + (size_t)g * hd,
                        kvw, 0.0f, out + (size_t)h * hd, qw);
        }
    }
}

mxq_status mxq_model_embed(mxq_ctx *ctx, const mxq_model *m, const int32_t *tokens, int n_seqs, int seq_len, float *x)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, m->embedding != NULL, MXQ_ERR_INTERNAL, "this model part has no embedding");
    const int d = m->cfg.hidden;
    for (size_t t = 0; t < (size_t)n_seqs * seq_len; t++) {
        int32_t id = tokens[t];
        CHECK(ctx, id >= 0 && id < m->cfg.vocab, MXQ_ERR_ARG, "token id %d at position %zu is outside the vocabulary [0, %d)",
              id, t, m->cfg.vocab);
        memcpy(x + t * (size_t)d, m->embedding + (size_t)id * d, (size_t)d * sizeof(float));
    }
fail:
    return status;
}

mxq_status mxq_model_run_layers(mxq_ctx *ctx, const mxq_model *m, int from, int to, float *x, int n_seqs, int seq_len,
                                const mxq_fake_quant *fq, mxq_workspace *ws)
{
    return mxq_model_run_layers_observed(ctx, m, from, to, x, n_seqs, seq_len, fq, NULL, ws);
}

#define OBSERVE(input, buf, width)                                                                    \
    do {                                                                                             \
        if (observer)                                                                                \
            CALL(ctx, observer->fn(ctx, observer->user, l, (input), (buf), T, (width)));              \
    } while (0)

mxq_status mxq_model_run_layers_observed(mxq_ctx *ctx, const mxq_model *m, int from, int to, float *x, int n_seqs,
                                         int seq_len, const mxq_fake_quant *fq, const mxq_observer *observer,
                                         mxq_workspace *ws)
{
    mxq_status status = MXQ_OK;
    const mxq_model_config *cfg = &m->cfg;
    CHECK(ctx, from >= m->first_layer && to <= m->last_layer && from <= to, MXQ_ERR_INTERNAL,
          "layers [%d, %d) are not all held here ([%d, %d))", from, to, m->first_layer, m->last_layer);
    CHECK(ctx, n_seqs <= ws->max_seqs && seq_len == ws->seq_len, MXQ_ERR_INTERNAL,
          "workspace sized for %d x %d, asked for %d x %d", ws->max_seqs, ws->seq_len, n_seqs, seq_len);
    if (!ws->rope_ready)
        build_rope_tables(m, ws);

    const size_t T = (size_t)n_seqs * seq_len;
    const int d = cfg->hidden, qw = cfg->n_heads * cfg->head_dim, kvw = cfg->n_kv_heads * cfg->head_dim;
    const int ffn = cfg->intermediate;
    for (int l = from; l < to; l++) {
        const mxq_layer *L = &m->layers[l - m->first_layer];
        /* attention block */
        rms_norm(x, L->attn_norm, ws->h, T, d, cfg->rms_eps);
        OBSERVE(MXQ_INPUT_ATTN, ws->h, d);
        CALL(ctx, quantize_acts(ctx, fq, ws->h, T, d));
        linear(ws->h, L->weight[MXQ_LIN_Q], L->bias[MXQ_LIN_Q], ws->q, T, qw, d);
        linear(ws->h, L->weight[MXQ_LIN_K], L->bias[MXQ_LIN_K], ws->k, T, kvw, d);
        linear(ws->h, L->weight[MXQ_LIN_V], L->bias[MXQ_LIN_V], ws->v, T, kvw, d);
        apply_rope(ws->q, ws, n_seqs, seq_len, cfg->n_heads, cfg->head_dim);
        apply_rope(ws->k, ws, n_seqs, seq_len, cfg->n_kv_heads, cfg->head_dim);
        attention(cfg, ws, n_seqs, seq_len);
        OBSERVE(MXQ_INPUT_O, ws->attn, qw);
        CALL(ctx, quantize_acts(ctx, fq, ws->attn, T, qw));
        linear(ws->attn, L->weight[MXQ_LIN_O], L->bias[MXQ_LIN_O], ws->proj, T, d, qw);
        for (size_t i = 0; i < T * (size_t)d; i++)
            x[i] += ws->proj[i];
        /* MLP block: down(silu(gate(h)) * up(h)) */
        rms_norm(x, L->ffn_norm, ws->h, T, d, cfg->rms_eps);
        OBSERVE(MXQ_INPUT_MLP, ws->h, d);
        CALL(ctx, quantize_acts(ctx, fq, ws->h, T, d));
        linear(ws->h, L->weight[MXQ_LIN_GATE], NULL, ws->gate, T, ffn, d);
        linear(ws->h, L->weight[MXQ_LIN_UP], NULL, ws->up, T, ffn, d);
        for (size_t i = 0; i < T * (size_t)ffn; i++) {
            float g = ws->gate[i];
            ws->gate[i] = g / (1.0f + expf(-g)) * ws->up[i];
        }
        OBSERVE(MXQ_INPUT_DOWN, ws->gate, ffn);
        CALL(ctx, quantize_acts(ctx, fq, ws->gate, T, ffn));
        linear(ws->gate, L->weight[MXQ_LIN_DOWN], NULL, ws->proj, T, d, ffn);
        for (size_t i = 0; i < T * (size_t)d; i++)
            x[i] += ws->proj[i];
    }
fail:
    return status;
}

mxq_status mxq_model_logits(mxq_ctx *ctx, const mxq_model *m, const float *x, int n_seqs, int seq_len, float *logits,
                            mxq_workspace *ws)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, m->has_head, MXQ_ERR_INTERNAL, "this model part has no output head");
    const size_t T = (size_t)n_seqs * seq_len;
    const int d = m->cfg.hidden;
    for (size_t t0 = 0; t0 < T; t0 += (size_t)seq_len) {
        size_t n = T - t0 < (size_t)seq_len ? T - t0 : (size_t)seq_len;
        rms_norm(x + t0 * d, m->final_norm, ws->h, n, d, m->cfg.rms_eps);
        linear(ws->h, m->lm_head, NULL, logits + t0 * (size_t)m->cfg.vocab, n, m->cfg.vocab, d);
    }
fail:
    return status;
}

mxq_status mxq_model_sequence_nll(mxq_ctx *ctx, const mxq_model *m, const float *x, const int32_t *tokens, int n_seqs,
                                  int seq_len, double *nll, mxq_workspace *ws)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, m->has_head, MXQ_ERR_INTERNAL, "this model part has no output head");
    const int d = m->cfg.hidden, V = m->cfg.vocab;
    for (int s = 0; s < n_seqs; s++) {
        const float *xs = x + (size_t)s * seq_len * d;
        rms_norm(xs, m->final_norm, ws->h, (size_t)seq_len, d, m->cfg.rms_eps);
        /* positions 0..S-2 predict tokens 1..S-1; the last position predicts nothing */
        int rows = seq_len - 1;
        double total = 0.0;
        if (rows > 0) {
            linear(ws->h, m->lm_head, NULL, ws->logits, (size_t)rows, V, d);
            for (int t = 0; t < rows; t++) {
                const float *row = ws->logits + (size_t)t * V;
                int32_t target = tokens[(size_t)s * seq_len + t + 1];
                CHECK(ctx, target >= 0 && target < V, MXQ_ERR_ARG, "target token id %d is outside the vocabulary",
                      target);
                double mx = row[0];
                for (int j = 1; j < V; j++)
                    mx = row[j] > mx ? row[j] : mx;
                double sum = 0.0;
                for (int j = 0; j < V; j++)
                    sum += exp((double)row[j] - mx);
                total += mx + log(sum) - (double)row[target];
            }
        }
        nll[s] = total;
    }
fail:
    return status;
}
