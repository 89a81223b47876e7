/* mxq export --to gguf, checked without llama.cpp: a GGUF reader written
 * here from the format's description (not mxq's writer) decodes every
 * tensor of the exported file (F32, BF16, Q4_0, Q8_0, MXFP4), puts q_proj
 * and k_proj rows back in Hugging Face order, and finds every weight
 * bit-identical to what mxq loads from the checkpoint (mxq_model_load, as
 * mxq eval does), for every MX format and the BF16 fallback (the bundled
 * model's down_proj has 172 inputs). Bad input: an unsupported
 * architecture, an output path that is an input, a checkpoint with
 * activation quantization (exported with a notice). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "mxq/mxq.h"
#include "testutil.h"

/* ---- a GGUF reader (tensor infos and data only) -------------------------- */

typedef struct {
    char name[96];
    uint32_t type;
    int64_t ne[4];
    uint32_t n_dims;
    uint64_t offset;
} gguf_tensor;

typedef struct {
    uint8_t *bytes;
    size_t size, at;
    gguf_tensor *tensors;
    uint64_t n_tensors;
    size_t data_start;
} gguf_file;

static uint64_t rd(gguf_file *f, int n)
{
    uint64_t v = 0;
    assert_true(f->at + (size_t)n <= f->size);
    memcpy(&v, f->bytes + f->at, (size_t)n);
    f->at += (size_t)n;
    return v;
}

/* skip a value of gguf type `type` */
static void skip_value(gguf_file *f, uint32_t type)
{
    static const int sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    assert_true(type <= 12);
    if (type == 8) { /* string */
        f->at += rd(f, 8);
    } else if (type == 9) { /* array */
        uint32_t element = (uint32_t)rd(f, 4);
        uint64_t n = rd(f, 8);
        for (uint64_t i = 0; i < n; i++)
            skip_value(f, element);
    } else {
        f->at += (size_t)sizes[type];
    }
}

static void gguf_open(const char *path, gguf_file *f)
{
    memset(f, 0, sizeof(*f));
    f->bytes = (uint8_t *)tu_read_file(path, &f->size);
    assert_non_null(f->bytes);
    assert_memory_equal(f->bytes, "GGUF", 4);
    f->at = 4;
    assert_int_equal(rd(f, 4), 3);
    f->n_tensors = rd(f, 8);
    uint64_t n_kv = rd(f, 8);
    for (uint64_t i = 0; i < n_kv; i++) {
        f->at += rd(f, 8); /* key */
        skip_value(f, (uint32_t)rd(f, 4));
    }
    f->tensors = calloc(f->n_tensors, sizeof(gguf_tensor));
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        uint64_t len = rd(f, 8);
        assert_true(len < sizeof(t->name));
        memcpy(t->name, f->bytes + f->at, len);
        f->at += len;
        t->n_dims = (uint32_t)rd(f, 4);
        t->ne[1] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++)
            t->ne[d] = (int64_t)rd(f, 8);
        t->type = (uint32_t)rd(f, 4);
        t->offset = rd(f, 8);
    }
    f->data_start = (f->at + 31) / 32 * 32;
}

static const gguf_tensor *gguf_find(const gguf_file *f, const char *name)
{
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0)
            return &f->tensors[i];
    fail_msg("no tensor '%s' in the GGUF", name);
    return NULL;
}

static float half_to_float(uint16_t h)
{
    const int e = (h >> 10) & 31, m = h & 1023;
    const float v = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m | 1024), e - 25);
    return h & 0x8000 ? -v : v;
}

static float bf16_to_float(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

/* Row r of tensor t as floats. */
static void decode_row(const gguf_file *f, const gguf_tensor *t, int64_t r, float *out)
{
    static const float e2m1[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
    const int64_t n = t->ne[0];
    const uint8_t *base = f->bytes + f->data_start + t->offset;
    switch (t->type) {
    case 0: memcpy(out, base + (size_t)r * (size_t)n * 4, (size_t)n * 4); break;
    case 30:
        for (int64_t c = 0; c < n; c++) {
            uint16_t b;
            memcpy(&b, base + ((size_t)r * (size_t)n + (size_t)c) * 2, 2);
            out[c] = bf16_to_float(b);
        }
        break;
    case 2: /* Q4_0: f16 d, 16 bytes: element j low nibble of byte j, j + 16 high */
    case 8: /* Q8_0: f16 d, 32 int8 */
    case 39: /* MXFP4: E8M0 byte, 16 bytes of E2M1 in Q4_0's order */
        for (int64_t b = 0; b < n / 32; b++) {
            const size_t bytes = t->type == 2 ? 18 : t->type == 8 ? 34 : 17;
            const uint8_t *blk = base + ((size_t)r * (size_t)(n / 32) + (size_t)b) * bytes;
            uint16_t d16;
            memcpy(&d16, blk, 2);
            for (int j = 0; j < 32; j++) {
                float v;
                if (t->type == 2)
                    v = half_to_float(d16) * (float)(((j < 16 ? blk[2 + j] : blk[2 + j - 16] >> 4) & 15) - 8);
                else if (t->type == 8)
                    v = half_to_float(d16) * (float)(int8_t)blk[2 + j];
                else
                    v = ldexpf(e2m1[(j < 16 ? blk[1 + j] : blk[1 + j - 16] >> 4) & 15], blk[0] - 127);
                out[b * 32 + j] = v;
            }
        }
        break;
    default: fail_msg("tensor %s: ggml type %u not expected", t->name, t->type);
    }
}

/* ---- the checks --------------------------------------------------------- */

/* GGUF row r of q_proj/k_proj holds Hugging Face row source(r). */
static int64_t hf_row(int64_t r, int64_t rows, int heads)
{
    if (heads <= 0)
        return r;
    const int64_t hd = rows / heads, h = r / hd, w = r % hd;
    return h * hd + (w % 2) * (hd / 2) + w / 2;
}

/* Every value of GGUF tensor `name` against mxq's [rows, cols] floats. */
static int compare_tensor(const gguf_file *f, const char *name, const float *want, int64_t rows, int64_t cols,
                          int heads, uint32_t *type)
{
    const gguf_tensor *t = gguf_find(f, name);
    assert_int_equal(t->ne[0], cols);
    assert_int_equal(t->ne[1], rows);
    *type = t->type;
    float *row = malloc((size_t)cols * sizeof(float));
    int differ = 0;
    for (int64_t r = 0; r < rows && !differ; r++) {
        decode_row(f, t, r, row);
        differ = memcmp(row, want + hf_row(r, rows, heads) * cols, (size_t)cols * sizeof(float)) != 0;
        if (differ)
            print_message("# %s: row %lld differs\n", name, (long long)r);
    }
    free(row);
    return !differ;
}

static tu_run_result run_mxq(const char *const *args)
{
    const char *argv[32] = {getenv("MXQ_BIN")};
    for (int i = 0; args[i]; i++)
        argv[i + 1] = args[i];
    tu_run_result r;
    tu_run(argv, &r);
    return r;
}

/* The checkpoint of `format` at `block` (round to nearest, weights only),
 * in scratch directory `name` (NULL: "<format>-<block>"). */
static const char *quantized_to(const char *format, int block, const char *name_or_null)
{
    char from[] = "weights:     {format: mxint4, block: 32, rounding: even}", to[128], name[64];
    snprintf(to, sizeof(to), "weights:     {format: %s, block: %d, rounding: even}", format, block);
    snprintf(name, sizeof(name), "%s-%d.yaml", format, block);
    const char *recipe = tu_edited_copy(tu_data_path("../configs/recipes/block32/w4a8-mxint-rtn.yaml"), from, to, name);
    recipe = tu_edited_copy(recipe, "activations: {format: mxint8, block: 32}", "activations: none", name);
    const char *dir = name_or_null ? tu_scratch_path("%s", name_or_null) : tu_scratch_path("%s-%d", format, block);
    const char *args[] = {"quantize", "-q", "--model", tu_data_path("stories260K"), "--calib",
                          tu_data_path("stories260K/calib.h5"), "--recipe", recipe, "--out", dir, NULL};
    tu_run_result r = run_mxq(args);
    if (r.exit_code != 0)
        fail_msg("quantize %s-%d failed: %.600s", format, block, r.err);
    return dir;
}

static const char *quantized(const char *format, int block) { return quantized_to(format, block, NULL); }

/* Export `dir` and compare every tensor with mxq's own load of it; counts
 * the GGUF types seen into `seen` (indexed by ggml type). */
static void check_bit_identity(const char *dir, int seen[64])
{
    const char *gguf = tu_scratch_path("%s.gguf", strrchr(dir, '/') + 1);
    const char *args[] = {"export", "-q", "--to", "gguf", dir, gguf, "--tokenizer",
                          tu_data_path("stories260K/tokenizer.bin"), NULL};
    tu_run_result r = run_mxq(args);
    if (r.exit_code != 0)
        fail_msg("export of %s failed: %.600s", dir, r.err);
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_model_config cfg;
    assert_int_equal(mxq_config_load(ctx, dir, &cfg), MXQ_OK);
    mxq_model_part part = {0, cfg.n_layers, 1, 1};
    mxq_model *m = NULL;
    assert_int_equal(mxq_model_load(ctx, dir, &cfg, &part, &m), MXQ_OK);
    gguf_file f;
    gguf_open(gguf, &f);
    static const char *names[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    uint32_t type;
    assert_true(compare_tensor(&f, "token_embd.weight", m->embedding, cfg.vocab, cfg.hidden, 0, &type));
    for (int l = 0; l < cfg.n_layers; l++)
        for (int w = 0; w < MXQ_LIN_COUNT; w++) {
            int out, in;
            char name[64];
            mxq_linear_shape(&cfg, (mxq_linear_id)w, &out, &in);
            snprintf(name, sizeof(name), "blk.%d.%s.weight", l, names[w]);
            const int heads = w == MXQ_LIN_Q ? cfg.n_heads : w == MXQ_LIN_K ? cfg.n_kv_heads : 0;
            if (!compare_tensor(&f, name, m->layers[l].weight[w], out, in, heads, &type))
                fail_msg("%s of %s is not bit-identical to mxq's weights", name, dir);
            seen[type & 63]++;
        }
    free(f.tensors);
    free(f.bytes);
    mxq_model_free(m);
    mxq_ctx_destroy(ctx);
}

static void test_bit_identity_every_format(void **state)
{
    (void)state;
    /* the reordering by hand: a head of 4 rows (pairs (0,2), (1,3) in
     * rotate-half order) interleaved is 0, 2, 1, 3 */
    const int64_t want[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    for (int r = 0; r < 8; r++)
        assert_int_equal(hf_row(r, 8, 2), want[r]);
    const struct {
        const char *format;
        int block;
        int expect_type; /* of the linears with 64 inputs */
    } cases[] = {{"mxint4", 32, 2},  {"mxint4", 128, 2},     {"mxint3", 32, 2},     {"mxint2", 32, 2},
                 {"mxint8", 32, 8},  {"mxfp4_e2m1", 32, 39}, {"mxfp6_e2m3", 32, 30}, {"mxfp8_e4m3", 32, 30}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int seen[64] = {0};
        check_bit_identity(quantized(cases[i].format, cases[i].block), seen);
        print_message("# %s block %d: %d linears as type %d, %d as BF16\n", cases[i].format, cases[i].block,
                      seen[cases[i].expect_type], cases[i].expect_type, seen[30]);
        assert_int_equal(seen[cases[i].expect_type] + (cases[i].expect_type == 30 ? 0 : seen[30]), 35);
        if (cases[i].expect_type != 30)
            assert_int_equal(seen[30], 5); /* down_proj: 172 inputs, the BF16 fallback */
    }
    int seen[64] = {0};
    check_bit_identity(tu_data_path("stories260K"), seen); /* the FP model: F32 throughout */
    assert_int_equal(seen[0], 35);
}

/* Llama-3 rope scaling: the rope_freqs factors llama.cpp divides each
 * frequency by, against the converter's formula in double: of head_dim 8's
 * four wavelengths (2 pi 10000^(i/4): 6.3, 63, 628, 6283) with an original
 * context of 64, low_freq_factor 1 and high 4 (wavelengths 64 and 16), the
 * first is kept, the second smoothed, the others divided by the factor 8. */
static void test_llama3_rope_freqs(void **state)
{
    (void)state;
    const char *model = tu_scratch_path("rope3");
    char cmd[2048];
    snprintf(cmd, sizeof(cmd),
             "mkdir -p %s && cp %s/model.safetensors %s/ && sed 's/\"rope_theta\": 10000.0,/&\"rope_scaling\": "
             "{\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
             "\"original_max_position_embeddings\": 64},/' %s/config.json > %s/config.json",
             model, tu_data_path("stories260K"), model, tu_data_path("stories260K"), model);
    assert_int_equal(system(cmd), 0);
    const char *gguf = tu_scratch_path("rope3.gguf");
    const char *args[] = {"export", "-q", "--to", "gguf", model, gguf, "--tokenizer",
                          tu_data_path("stories260K/tokenizer.bin"), NULL};
    tu_run_result r = run_mxq(args);
    if (r.exit_code != 0)
        fail_msg("export with Llama-3 rope scaling failed: %.600s", r.err);
    gguf_file f;
    gguf_open(gguf, &f);
    const gguf_tensor *t = gguf_find(&f, "rope_freqs.weight");
    assert_int_equal(t->type, 0);
    assert_int_equal(t->n_dims, 1);
    assert_int_equal(t->ne[0], 4);
    assert_true(f.data_start + t->offset + 4 * sizeof(float) <= f.size);
    const float *got = (const float *)(f.bytes + f.data_start + t->offset);
    for (int i = 0; i < 4; i++) {
        const double wavelen = 2 * M_PI * pow(10000.0, i / 4.0);
        const double smooth = (64 / wavelen - 1.0) / (4.0 - 1.0);
        const double want = wavelen < 16 ? 1 : wavelen > 64 ? 8 : 1 / ((1 - smooth) / 8 + smooth);
        print_message("# rope_freqs[%d] = %.7g (converter's formula %.7g)\n", i, got[i], want);
        assert_true(fabs(got[i] - want) <= 1e-6 * want);
    }
    assert_true(got[1] > 1 && got[1] < 8);
    free(f.tensors);
    free(f.bytes);
    /* a factor whose divisors are not float32 numbers llama.cpp can divide by */
    snprintf(cmd, sizeof(cmd), "sed -i 's/\"factor\": 8.0/\"factor\": 1e-300/' %s/config.json", model);
    assert_int_equal(system(cmd), 0);
    r = run_mxq(args);
    if (r.exit_code != 1 || !strstr(r.err, "rope_scaling factor 1e-300 gives frequency 1 a divisor of 0"))
        fail_msg("a rope factor of 1e-300 was not refused: %.600s", r.err);
}

/* A NaN block (E8M0 0xFF, zero codes, as mxq stores one) has no Q4_0 or
 * MXFP4 form (Q4_0's d would make it zeros, ggml reads an MXFP4 0xFF as
 * infinity): its linear goes to BF16, which keeps the NaN, and says why. */
static void test_nan_block(void **state)
{
    (void)state;
    const char *formats[] = {"mxint4", "mxfp4_e2m1"};
    for (int i = 0; i < 2; i++) {
        const char *dir = quantized_to(formats[i], 32, i ? "nan-mxfp4" : "nan-mxint4");
        const uint8_t nan_scale = 0xFF, zeros[16] = {0};
        tu_poke_tensor(dir, "model-00001-of-00001.safetensors", "model.layers.0.self_attn.q_proj.weight_scale", 0,
                       &nan_scale, 1);
        tu_poke_tensor(dir, "model-00001-of-00001.safetensors", "model.layers.0.self_attn.q_proj.weight_packed", 0,
                       zeros, sizeof(zeros));
        const char *gguf = tu_scratch_path("nan-%d.gguf", i);
        const char *args[] = {"export", "--to", "gguf", dir, gguf, NULL};
        tu_run_result r = run_mxq(args);
        if (r.exit_code != 0 || !strstr(r.err, "blk.0.attn_q.weight as BF16 (lossless): a block's scale is NaN"))
            fail_msg("%s: a NaN block was not sent to BF16 with its reason: %.600s", formats[i], r.err);
        gguf_file f;
        gguf_open(gguf, &f);
        const gguf_tensor *t = gguf_find(&f, "blk.0.attn_q.weight");
        assert_int_equal(t->type, 30);
        float row[64];
        decode_row(&f, t, 0, row); /* GGUF row 0 is Hugging Face row 0 */
        for (int c = 0; c < 32; c++)
            assert_true(isnan(row[c]));
        assert_false(isnan(row[32]));
        free(f.tensors);
        free(f.bytes);
    }
}

/* ---- --vocab-from GGUFs, written here byte by byte ---------------------- */

typedef struct {
    uint8_t bytes[16384];
    size_t len;
    uint64_t n_kv;
} gguf_builder;

static void put(gguf_builder *b, const void *data, size_t n)
{
    assert_true(b->len + n <= sizeof(b->bytes));
    memcpy(b->bytes + b->len, data, n);
    b->len += n;
}

static void put_u32(gguf_builder *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(gguf_builder *b, uint64_t v) { put(b, &v, 8); }
static void put_str(gguf_builder *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

/* key, then an array header of `count` elements of `element` */
static void put_array(gguf_builder *b, const char *key, uint32_t element, uint64_t count)
{
    put_str(b, key);
    put_u32(b, 9);
    put_u32(b, element);
    put_u64(b, count);
    b->n_kv++;
}

static void put_string_kv(gguf_builder *b, const char *key, const char *value)
{
    put_str(b, key);
    put_u32(b, 8);
    put_str(b, value);
    b->n_kv++;
}

/* A vocabulary of tokenizer `model` (NULL: none) with `n` tokens "t0", "t1",
 * ...; token `dup` (if >= 0) repeats token 0's text; scores of `n_scores`
 * f32 values. */
static void vocab_gguf_of(gguf_builder *b, const char *model, int n, int dup, int n_scores)
{
    memset(b, 0, sizeof(*b));
    if (model)
        put_string_kv(b, "tokenizer.ggml.model", model);
    put_array(b, "tokenizer.ggml.tokens", 8, (uint64_t)n);
    for (int i = 0; i < n; i++) {
        char text[16];
        snprintf(text, sizeof(text), "t%d", i == dup ? 0 : i);
        if (i == 13)
            snprintf(text, sizeof(text), "<0x0A>"); /* the line feed llama.cpp looks for */
        put_str(b, text);
    }
    put_array(b, "tokenizer.ggml.scores", 6, (uint64_t)n_scores);
    for (int i = 0; i < n_scores; i++) {
        const float score = (float)-i;
        put(b, &score, 4);
    }
}

/* b's key-values under a GGUF v3 header (no tensors), into scratch `name` */
static void vocab_gguf(gguf_builder *b, int n, int dup, int n_scores) { vocab_gguf_of(b, "llama", n, dup, n_scores); }

static const char *gguf_file_of(const gguf_builder *b, const char *name)
{
    uint8_t *file = malloc(24 + b->len);
    memcpy(file, "GGUF", 4);
    const uint32_t version = 3;
    const uint64_t n_tensors = 0;
    memcpy(file + 4, &version, 4);
    memcpy(file + 8, &n_tensors, 8);
    memcpy(file + 16, &b->n_kv, 8);
    memcpy(file + 24, b->bytes, b->len);
    const char *path = tu_scratch_path("%s", name);
    tu_write_file(path, file, 24 + b->len);
    free(file);
    return path;
}

static void expect_vocab_refused(const char *vocab, const char *message)
{
    const char *args[] = {"export", "-q", "--to", "gguf", tu_data_path("stories260K"), tu_scratch_path("refused.gguf"),
                          "--vocab-from", vocab, NULL};
    tu_run_result r = run_mxq(args);
    if (r.exit_code != 1 || !strstr(r.err, message))
        fail_msg("--vocab-from %s: exit %d, expected '%s' in: %.600s", vocab, r.exit_code, message, r.err);
    if (strchr(r.err, '\n') != strrchr(r.err, '\n'))
        fail_msg("--vocab-from %s: more than one line: %.600s", vocab, r.err);
}

static void test_vocab_from_bad(void **state)
{
    (void)state;
    gguf_builder b;
    vocab_gguf(&b, 512, -1, 512);
    const char *good = gguf_file_of(&b, "good-vocab.gguf");
    const char *args[] = {"export", "-q", "--to", "gguf", tu_data_path("stories260K"), tu_scratch_path("ok.gguf"),
                          "--vocab-from", good, NULL};
    tu_run_result r = run_mxq(args);
    if (r.exit_code != 0)
        fail_msg("a well-formed --vocab-from was refused: %.600s", r.err);
    size_t size = 0;
    char *bytes = tu_read_file(good, &size);
    tu_write_file(tu_scratch_path("cut-vocab.gguf"), bytes, size / 2);
    free(bytes);
    expect_vocab_refused(tu_scratch_path("cut-vocab.gguf"), "ends inside a string");
    vocab_gguf(&b, 511, -1, 511);
    expect_vocab_refused(gguf_file_of(&b, "short-vocab.gguf"), "has 511 tokens; the model's vocabulary has 512");
    vocab_gguf(&b, 512, 7, 512);
    expect_vocab_refused(gguf_file_of(&b, "dup-vocab.gguf"), "the token 't0' appears twice");
    vocab_gguf(&b, 512, -1, 500);
    expect_vocab_refused(gguf_file_of(&b, "scores-vocab.gguf"),
                         "tokenizer.ggml.scores must be an array of 512 f32 values (one per token)");
    vocab_gguf(&b, 512, -1, 512);
    put_str(&b, "tokenizer.ggml.model");
    put_u32(&b, 8);
    put_str(&b, "gpt2");
    b.n_kv++;
    expect_vocab_refused(gguf_file_of(&b, "twice-vocab.gguf"), "key 'tokenizer.ggml.model' appears twice");
    vocab_gguf(&b, 512, -1, 512);
    put_array(&b, "tokenizer.nested", 9, 0);
    expect_vocab_refused(gguf_file_of(&b, "nested-vocab.gguf"), "an array of element type 9");
    /* a GGUF mxq did not write (no mxq.version) is not replaced by an export */
    const char *theirs[] = {"export", "--to", "gguf", tu_data_path("stories260K"), good, NULL};
    r = run_mxq(theirs);
    if (r.exit_code != 1 || !strstr(r.err, "exists and mxq did not write it"))
        fail_msg("a GGUF mxq did not write was replaced: %.600s", r.err);
    /* what llama.cpp's vocabulary loader would refuse */
    vocab_gguf_of(&b, NULL, 512, -1, 512);
    expect_vocab_refused(gguf_file_of(&b, "nomodel-vocab.gguf"), "tokenizer.ggml.model is missing");
    vocab_gguf_of(&b, "nonsense", 512, -1, 512);
    expect_vocab_refused(gguf_file_of(&b, "nonsense-vocab.gguf"), "tokenizer.ggml.model 'nonsense' is not one llama.cpp's llama architecture takes");
    vocab_gguf_of(&b, "gpt2", 512, -1, 512);
    expect_vocab_refused(gguf_file_of(&b, "gpt2-vocab.gguf"), "a gpt2 tokenizer needs tokenizer.ggml.merges");
    vocab_gguf(&b, 512, -1, 512);
    put_string_kv(&b, "tokenizer.ggml.bos_token_id", "1");
    expect_vocab_refused(gguf_file_of(&b, "bos-vocab.gguf"), "tokenizer.ggml.bos_token_id must be a u32");
    vocab_gguf(&b, 512, -1, 512);
    put_string_kv(&b, "tokenizer.ggml.add_bos_token", "yes");
    expect_vocab_refused(gguf_file_of(&b, "addbos-vocab.gguf"), "tokenizer.ggml.add_bos_token must be a bool");
    vocab_gguf_of(&b, "bert", 512, -1, 512);
    expect_vocab_refused(gguf_file_of(&b, "bert-vocab.gguf"), "tokenizer.ggml.model 'bert' is not one llama.cpp's llama");
    /* a SentencePiece vocabulary without the line feed's byte token */
    vocab_gguf(&b, 512, -1, 512);
    /* the builder names token 13 <0x0A>: rename it */
    for (size_t at = 0; at + 6 <= b.len; at++)
        if (memcmp(b.bytes + at, "<0x0A>", 6) == 0)
            memcpy(b.bytes + at, "<0x0B>", 6);
    expect_vocab_refused(gguf_file_of(&b, "nolf-vocab.gguf"), "no byte token <0x0A>");
}

/* The bundled tokenizer.bin as Hugging Face's tokenizer.json would hold it
 * (SentencePiece-style BPE: U+2581 for spaces, byte_fallback, the control
 * tokens in added_tokens), written here with jansson. */
static const char *tokenizer_json_of_bin(const char *name)
{
    size_t size = 0, at = 4;
    char *bin = tu_read_file(tu_data_path("stories260K/tokenizer.bin"), &size);
    json_t *vocab = json_object(), *added = json_array();
    for (int id = 0; id < 512; id++) {
        int32_t len;
        memcpy(&len, bin + at + 4, 4);
        char text[256], *o = text;
        for (int i = 0; i < len; i++)
            if (bin[at + 8 + (size_t)i] == ' ')
                memcpy(o, "\xe2\x96\x81", 3), o += 3;
            else
                *o++ = bin[at + 8 + (size_t)i];
        *o = '\0';
        at += 8 + (size_t)len;
        if (id == 1 || id == 2)
            json_array_append_new(added, json_pack("{s:i, s:s, s:b}", "id", id, "content", text, "special", 1));
        else
            json_object_set_new(vocab, text, json_integer(id));
    }
    free(bin);
    json_t *root = json_pack("{s:o, s:{s:s, s:b, s:s, s:o, s:[]}}", "added_tokens", added, "model", "type", "BPE",
                             "byte_fallback", 1, "unk_token", "<unk>", "vocab", vocab, "merges");
    const char *path = tu_scratch_path("%s", name);
    assert_int_equal(json_dump_file(root, path, 0), 0);
    json_decref(root);
    return path;
}

/* A vocabulary from tokenizer.json gives the same GGUF, byte for byte, as
 * the same vocabulary from tokenizer.bin; found beside a model that has no
 * tokenizer.bin; a byte-level BPE one is refused, naming --vocab-from. */
static void test_tokenizer_json(void **state)
{
    (void)state;
    const char *json = tokenizer_json_of_bin("tokenizer.json");
    const char *from_bin = tu_scratch_path("vocab-bin.gguf"), *from_json = tu_scratch_path("vocab-json.gguf");
    const char *a[] = {"export", "-q", "--to", "gguf", tu_data_path("stories260K"), from_bin, NULL};
    const char *b[] = {"export", "-q", "--to", "gguf", tu_data_path("stories260K"), from_json, "--tokenizer", json, NULL};
    assert_int_equal(run_mxq(a).exit_code, 0);
    tu_run_result r = run_mxq(b);
    if (r.exit_code != 0)
        fail_msg("export with a tokenizer.json failed: %.600s", r.err);
    size_t size_a = 0, size_b = 0;
    char *bytes_a = tu_read_file(from_bin, &size_a), *bytes_b = tu_read_file(from_json, &size_b);
    assert_int_equal(size_a, size_b);
    assert_memory_equal(bytes_a, bytes_b, size_a);
    free(bytes_a);
    free(bytes_b);
    /* found by itself beside a model without tokenizer.bin */
    const char *model = tu_scratch_path("json-model");
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "mkdir -p %s && cp %s/config.json %s/model.safetensors %s %s/", model,
             tu_data_path("stories260K"), tu_data_path("stories260K"), json, model);
    assert_int_equal(system(cmd), 0);
    const char *found[] = {"export", "-q", "--to", "gguf", model, tu_scratch_path("found.gguf"), NULL};
    r = run_mxq(found);
    if (r.exit_code != 0)
        fail_msg("the tokenizer.json beside the model was not used: %.600s", r.err);
    /* byte-level BPE (Llama-3's) */
    const char *byte_level = tu_edited_copy(json, "\"byte_fallback\": true", "\"byte_fallback\": false", "bytelevel.json");
    const char *c[] = {"export", "--to", "gguf", tu_data_path("stories260K"), tu_scratch_path("bl.gguf"), "--tokenizer",
                       byte_level, NULL};
    r = run_mxq(c);
    assert_int_equal(r.exit_code, 1);
    if (!strstr(r.err, "without byte_fallback (byte-level BPE)") || !strstr(r.err, "--vocab-from"))
        fail_msg("a byte-level BPE tokenizer.json was not refused clearly: %.600s", r.err);
}

static void test_bad_input(void **state)
{
    (void)state;
    /* an output that is an input */
    const char *over[] = {"export", "--to", "gguf", tu_data_path("stories260K"), tu_data_path("stories260K/model.safetensors"), NULL};
    tu_run_result r = run_mxq(over);
    assert_int_equal(r.exit_code, 1);
    assert_non_null(strstr(r.err, "model.safetensors"));
    /* a truncated tokenizer.bin: one line, no crash */
    size_t size = 0;
    char *tok = tu_read_file(tu_data_path("stories260K/tokenizer.bin"), &size);
    tu_write_file(tu_scratch_path("short-tokenizer.bin"), tok, 5000);
    free(tok);
    const char *shortt[] = {"export", "--to", "gguf", tu_data_path("stories260K"), tu_scratch_path("short.gguf"),
                            "--tokenizer", tu_scratch_path("short-tokenizer.bin"), NULL};
    r = run_mxq(shortt);
    assert_int_equal(r.exit_code, 1);
    if (!strstr(r.err, "short-tokenizer.bin: token 385 has length 4, past the file's end"))
        fail_msg("a truncated tokenizer was not named: %s", r.err);
    /* a NUL byte in a token (token 3's text is "<0x00>": its '>' made NUL;
     * "<0x00" is no other token's text, so without the check the export
     * would succeed with the token cut short) */
    tok = tu_read_file(tu_data_path("stories260K/tokenizer.bin"), &size);
    size_t at = 4;
    for (int id = 0; id < 3; id++) {
        int32_t len;
        memcpy(&len, tok + at + 4, 4);
        at += 8 + (size_t)len;
    }
    assert_memory_equal(tok + at + 8, "<0x00>", 6);
    tok[at + 8 + 5] = '\0';
    tu_write_file(tu_scratch_path("nul-tokenizer.bin"), tok, size);
    free(tok);
    const char *nul[] = {"export", "--to", "gguf", tu_data_path("stories260K"), tu_scratch_path("nul.gguf"),
                         "--tokenizer", tu_scratch_path("nul-tokenizer.bin"), NULL};
    r = run_mxq(nul);
    assert_int_equal(r.exit_code, 1);
    if (!strstr(r.err, "nul-tokenizer.bin: token 3 holds a NUL byte"))
        fail_msg("a token with a NUL byte was not refused: %s", r.err);
    assert_int_equal(access(tu_scratch_path("nul.gguf"), F_OK), -1);
    /* a file mxq did not write is not replaced; a GGUF it wrote is */
    const char *mine = tu_scratch_path("mine.gguf");
    tu_write_file(mine, "precious", 8);
    const char *onto_mine[] = {"export", "--to", "gguf", tu_data_path("stories260K"), mine, NULL};
    r = run_mxq(onto_mine);
    assert_int_equal(r.exit_code, 1);
    if (!strstr(r.err, "exists and mxq did not write it (it has no mxq.version key-value)"))
        fail_msg("a file mxq did not write was replaced or not named: %s", r.err);
    char *kept = tu_read_file(mine, &size);
    assert_memory_equal(kept, "precious", 8);
    free(kept);
    const char *fresh[] = {"export", "-q", "--to", "gguf", tu_data_path("stories260K"), tu_scratch_path("again.gguf"), NULL};
    assert_int_equal(run_mxq(fresh).exit_code, 0);
    assert_int_equal(run_mxq(fresh).exit_code, 0);
    /* the model a checkpoint was quantized from is an input too */
    const char *src = tu_scratch_path("source-model");
    char copy[2048];
    snprintf(copy, sizeof(copy), "mkdir -p %s && cp %s/config.json %s/model.safetensors %s/tokenizer.bin %s/", src,
             tu_data_path("stories260K"), tu_data_path("stories260K"), tu_data_path("stories260K"), src);
    assert_int_equal(system(copy), 0);
    const char *from_src[] = {"quantize", "-q", "--model", src, "--calib", tu_data_path("stories260K/calib.h5"),
                              "--recipe", tu_data_path("../configs/recipes/block32/w4a8-mxint-rtn.yaml"), "--out",
                              tu_scratch_path("from-source"), NULL};
    assert_int_equal(run_mxq(from_src).exit_code, 0);
    const char *onto_src[] = {"export", "--to", "gguf", tu_scratch_path("from-source"),
                              tu_scratch_path("source-model/config.json"), NULL};
    r = run_mxq(onto_src);
    assert_int_equal(r.exit_code, 1);
    if (!strstr(r.err, "source-model/config.json") || !strstr(r.err, "a file of the input model"))
        fail_msg("the source model's config was not protected as an input: %s", r.err);
    /* an unsupported architecture */
    const char *model = tu_scratch_path("qwen2");
    char cmd[2048];
    snprintf(cmd, sizeof(cmd), "mkdir -p %s && cp %s/model.safetensors %s/ && sed 's/\"llama\"/\"qwen2\"/; s/LlamaForCausalLM/Qwen2ForCausalLM/' %s/config.json > %s/config.json",
             model, tu_data_path("stories260K"), model, tu_data_path("stories260K"), model);
    assert_int_equal(system(cmd), 0);
    const char *qwen[] = {"export", "--to", "gguf", model, tu_scratch_path("qwen2.gguf"), NULL};
    r = run_mxq(qwen);
    assert_int_equal(r.exit_code, 1);
    if (!strstr(r.err, "llama.cpp's 'llama' architecture"))
        fail_msg("an unsupported architecture was not named: %s", r.err);
    /* activation quantization: exported, with one notice */
    const char *dir = tu_scratch_path("w4a8");
    const char *q[] = {"quantize", "-q", "--model", tu_data_path("stories260K"), "--calib",
                       tu_data_path("stories260K/calib.h5"), "--recipe",
                       tu_data_path("../configs/recipes/block32/w4a8-mxint-rtn.yaml"), "--out", dir, NULL};
    assert_int_equal(run_mxq(q).exit_code, 0);
    const char *e[] = {"export", "--to", "gguf", dir, tu_scratch_path("w4a8.gguf"), NULL};
    r = run_mxq(e);
    assert_int_equal(r.exit_code, 0);
    assert_non_null(strstr(r.err, "GGUF carries the weights only"));
    assert_non_null(strstr(r.out, "weights only"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bit_identity_every_format),
        cmocka_unit_test(test_llama3_rope_freqs),
        cmocka_unit_test(test_nan_block),
        cmocka_unit_test(test_vocab_from_bad),
        cmocka_unit_test(test_tokenizer_json),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
