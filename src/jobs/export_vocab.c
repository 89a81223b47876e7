/* The vocabulary of a GGUF export: llama2.c's tokenizer.bin, Hugging Face's
 * tokenizer.json (SentencePiece-style BPE), or the tokenizer.* key-values
 * of another GGUF of the model (--vocab-from), each checked for what
 * llama.cpp's loader refuses or aborts on. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "jobs/export_vocab.h"

void mxq_export_vocab_free(mxq_export_vocab *v)
{
    for (int i = 0; v->tokens && i < v->n; i++)
        free(v->tokens[i]);
    free(v->tokens), free(v->scores), free(v->types);
    memset(v, 0, sizeof(*v));
}

/* token text as SentencePiece spells it: ' ' -> U+2581 (3 bytes) */
static char *spm_text(const char *bytes, int len)
{
    char *out = malloc((size_t)len * 3 + 1), *o = out;
    if (!out)
        return NULL;
    for (int i = 0; i < len; i++) {
        if (bytes[i] == ' ')
            memcpy(o, "\xe2\x96\x81", 3), o += 3;
        else
            *o++ = bytes[i];
    }
    *o = '\0';
    return out;
}

/* llama.cpp's token types: tokenizer.bin's by id (SentencePiece's export:
 * <unk> 0, <s> 1, </s> 2), any by text (id -1): bytes and normal pieces */
static int token_type(int id, const char *text)
{
    if (id == 0)
        return 2; /* unknown */
    if (id == 1 || id == 2)
        return 3; /* control: BOS, EOS */
    if (strlen(text) == 6 && strncmp(text, "<0x", 3) == 0 && text[5] == '>')
        return 6; /* byte */
    return 1;     /* normal */
}

/* llama.cpp's SentencePiece vocabulary finds its line feed as the byte
 * token <0x0A>, and aborts without one. */
static mxq_status check_linefeed(mxq_ctx *ctx, const char *path, const mxq_export_vocab *v)
{
    mxq_status status = MXQ_OK;
    int found = 0;
    for (int i = 0; i < v->n && !found; i++)
        found = strcmp(v->tokens[i], "<0x0A>") == 0;
    CHECK(ctx, found, MXQ_ERR_FORMAT,
          "%s: no byte token <0x0A>; llama.cpp's SentencePiece vocabulary needs it for the line feed (it aborts "
          "without)",
          path);
fail:
    return status;
}

static int compare_text(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* llama.cpp aborts on a vocabulary with two tokens of one text. */
static mxq_status check_unique_tokens(mxq_ctx *ctx, const char *path, const mxq_export_vocab *v)
{
    mxq_status status = MXQ_OK;
    char **sorted = malloc((size_t)v->n * sizeof(char *));
    CHECK_ALLOC(ctx, sorted, (size_t)v->n * sizeof(char *), "the sorted vocabulary");
    memcpy(sorted, v->tokens, (size_t)v->n * sizeof(char *));
    qsort(sorted, (size_t)v->n, sizeof(char *), compare_text);
    for (int i = 1; i < v->n; i++)
        CHECK(ctx, strcmp(sorted[i - 1], sorted[i]) != 0, MXQ_ERR_FORMAT,
              "%s: the token '%.40s' appears twice; llama.cpp needs every token text once", path, sorted[i]);
fail:
    free(sorted);
    return status;
}

/* A llama2.c tokenizer.bin: int32 max token length, then per token a float
 * score, an int32 length and the bytes, with spaces where SentencePiece
 * has U+2581. */
static mxq_status read_tokenizer_bin(mxq_ctx *ctx, const char *path, int n, mxq_export_vocab *v)
{
    mxq_status status = MXQ_OK;
    char *bytes = NULL;
    size_t size = 0, at = 4;
    memset(v, 0, sizeof(*v));
    CALL(ctx, mxq_input_read_all(ctx, path, "tokenizer", (size_t)1 << 28, &bytes, &size));
    v->tokens = calloc((size_t)n, sizeof(char *));
    v->scores = calloc((size_t)n, sizeof(float));
    v->types = calloc((size_t)n, sizeof(int32_t));
    CHECK_ALLOC(ctx, v->tokens && v->scores && v->types, (size_t)n * 16, "the vocabulary");
    for (int i = 0; i < n; i++) {
        int32_t len = -1;
        CHECK(ctx, at + 8 <= size, MXQ_ERR_FORMAT, "%s: ends at token %d; the model's vocabulary has %d (llama2.c "
              "tokenizer.bin: int32 max length, then per token float score, int32 length, bytes)", path, i, n);
        memcpy(&v->scores[i], bytes + at, 4);
        memcpy(&len, bytes + at + 4, 4);
        at += 8;
        CHECK(ctx, len >= 0 && (size_t)len <= size - at, MXQ_ERR_FORMAT, "%s: token %d has length %d, past the file's end",
              path, i, len);
        /* mxq and llama.cpp both hold token texts as C strings: a NUL
         * would cut the token short */
        CHECK(ctx, !memchr(bytes + at, '\0', (size_t)len), MXQ_ERR_FORMAT,
              "%s: token %d holds a NUL byte; SentencePiece pieces never do (not a tokenizer.bin?)", path, i);
        v->tokens[i] = spm_text(bytes + at, len);
        CHECK_ALLOC(ctx, v->tokens[i], (size_t)len * 3 + 1, "a token");
        v->n = i + 1;
        v->types[i] = token_type(i, v->tokens[i]);
        at += (size_t)len;
    }
    CHECK(ctx, at == size, MXQ_ERR_FORMAT, "%s: %zu bytes after the model's %d tokens: not this model's tokenizer", path,
          size - at, n);
    CALL(ctx, check_unique_tokens(ctx, path, v));
    CALL(ctx, check_linefeed(ctx, path, v));
fail:
    free(bytes);
    v->unknown_id = 0, v->eos_id = 2; /* SentencePiece's export: <unk> 0, <s> 1, </s> 2 */
    if (status != MXQ_OK)
        mxq_export_vocab_free(v);
    return status;
}

/* ---- tokenizer.json (Hugging Face, SentencePiece-style BPE) ------------- */

/* token text of tokenizer.json: already with U+2581 for spaces */
static mxq_status json_token(mxq_ctx *ctx, const char *path, mxq_export_vocab *v, const char *text, json_int_t id, int n)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, id >= 0 && id < n, MXQ_ERR_FORMAT, "%s: token '%.40s' has id %lld; the model's vocabulary has %d", path,
          text, (long long)id, n);
    CHECK(ctx, !v->tokens[id] || strcmp(v->tokens[id], text) == 0, MXQ_ERR_FORMAT,
          "%s: id %lld is both '%.40s' and '%.40s'", path, (long long)id, v->tokens[id], text);
    if (!v->tokens[id]) {
        v->tokens[id] = strdup(text);
        CHECK_ALLOC(ctx, v->tokens[id], strlen(text) + 1, "a token");
    }
fail:
    return status;
}

/* ids of model.vocab and added_tokens; added special tokens are control
 * tokens (the unknown token, model.unk_token, is of its own type) */
static mxq_status json_tokens(mxq_ctx *ctx, const char *path, json_t *root, int n, mxq_export_vocab *v)
{
    mxq_status status = MXQ_OK;
    json_t *model = json_object_get(root, "model"), *vocab = json_object_get(model, "vocab");
    json_t *added = json_object_get(root, "added_tokens"), *value, *item;
    const char *text;
    size_t i;
    CHECK(ctx, json_is_object(vocab), MXQ_ERR_FORMAT, "%s: no model.vocab object (token -> id)", path);
    json_object_foreach(vocab, text, value) {
        CHECK(ctx, json_is_integer(value), MXQ_ERR_FORMAT, "%s: model.vocab['%.40s'] is not an integer id", path, text);
        CALL(ctx, json_token(ctx, path, v, text, json_integer_value(value), n));
    }
    json_array_foreach(added, i, item) {
        json_t *id = json_object_get(item, "id"), *content = json_object_get(item, "content");
        CHECK(ctx, json_is_integer(id) && json_is_string(content), MXQ_ERR_FORMAT,
              "%s: added_tokens[%zu] needs an integer id and a string content", path, i);
        CALL(ctx, json_token(ctx, path, v, json_string_value(content), json_integer_value(id), n));
        if (json_is_true(json_object_get(item, "special")))
            v->types[json_integer_value(id)] = 3; /* control */
    }
fail:
    return status;
}

/* Types and scores: SentencePiece's BPE gives its normal pieces the score
 * -(their rank among the normal pieces), and 0 to the others. Ids no token
 * names become "[PAD<id>]" of type unused, as llama.cpp's converter does. */
static void json_types_and_scores(const char *unk, int n, mxq_export_vocab *v)
{
    int rank = 0;
    for (int id = 0; id < n; id++) {
        if (!v->tokens[id]) {
            char pad[32];
            snprintf(pad, sizeof(pad), "[PAD%d]", id);
            v->tokens[id] = strdup(pad), v->types[id] = 5; /* unused */
        } else if (unk && strcmp(v->tokens[id], unk) == 0) {
            v->types[id] = 2, v->unknown_id = id;
        } else if (v->types[id] != 3) {
            v->types[id] = token_type(-1, v->tokens[id]); /* byte or normal */
        }
        if (v->types[id] == 1)
            v->scores[id] = -(float)rank++;
    }
}

/* A tokenizer.json whose model is SentencePiece-style BPE (byte_fallback:
 * Llama-2's); a byte-level BPE (Llama-3's) needs llama.cpp's own pre-
 * tokenizer name and merges, and is left to --vocab-from. */
static mxq_status read_tokenizer_json(mxq_ctx *ctx, const char *path, const mxq_model_config *cfg, mxq_export_vocab *v)
{
    mxq_status status = MXQ_OK;
    json_t *root = NULL;
    const int n = cfg->vocab;
    memset(v, 0, sizeof(*v));
    CALL(ctx, mxq_json_read(ctx, path, "tokenizer", &root));
    json_t *model = json_object_get(root, "model");
    const char *type = json_string_value(json_object_get(model, "type"));
    CHECK(ctx, type && strcmp(type, "BPE") == 0 && json_is_true(json_object_get(model, "byte_fallback")),
          MXQ_ERR_FORMAT,
          "%s: model.type '%s'%s: the export reads SentencePiece-style BPE (byte_fallback, as Llama-2's); for another "
          "tokenizer give --vocab-from a GGUF of the model made by llama.cpp's convert_hf_to_gguf.py",
          path, type ? type : "(none)", type && strcmp(type, "BPE") == 0 ? " without byte_fallback (byte-level BPE)" : "");
    v->tokens = calloc((size_t)n, sizeof(char *));
    v->scores = calloc((size_t)n, sizeof(float));
    v->types = calloc((size_t)n, sizeof(int32_t));
    CHECK_ALLOC(ctx, v->tokens && v->scores && v->types, (size_t)n * 16, "the vocabulary");
    v->n = n;
    CALL(ctx, json_tokens(ctx, path, root, n, v));
    json_types_and_scores(json_string_value(json_object_get(model, "unk_token")), n, v);
    for (int id = 0; id < n; id++)
        CHECK_ALLOC(ctx, v->tokens[id], 32, "a token");
    v->eos_id = cfg->eos_token;
    CALL(ctx, check_unique_tokens(ctx, path, v));
    CALL(ctx, check_linefeed(ctx, path, v));
fail:
    json_decref(root);
    if (status != MXQ_OK)
        mxq_export_vocab_free(v);
    return status;
}

mxq_status mxq_export_vocab_read(mxq_ctx *ctx, const char *path, const mxq_model_config *cfg, mxq_export_vocab *v)
{
    const size_t len = strlen(path);
    if (len >= 5 && strcmp(path + len - 5, ".json") == 0)
        return read_tokenizer_json(ctx, path, cfg, v);
    return read_tokenizer_bin(ctx, path, cfg->vocab, v);
}

mxq_status mxq_export_vocab_write(mxq_ctx *ctx, mxq_gguf *g, const mxq_export_vocab *v, const mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_gguf_kv_string(ctx, g, "tokenizer.ggml.model", "llama"));
    CALL(ctx, mxq_gguf_kv_strings(ctx, g, "tokenizer.ggml.tokens", (const char *const *)v->tokens, (size_t)v->n));
    CALL(ctx, mxq_gguf_kv_f32s(ctx, g, "tokenizer.ggml.scores", v->scores, (size_t)v->n));
    CALL(ctx, mxq_gguf_kv_i32s(ctx, g, "tokenizer.ggml.token_type", v->types, (size_t)v->n));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "tokenizer.ggml.bos_token_id", (uint32_t)cfg->bos_token));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "tokenizer.ggml.eos_token_id", (uint32_t)v->eos_id));
    CALL(ctx, mxq_gguf_kv_u32(ctx, g, "tokenizer.ggml.unknown_token_id", (uint32_t)v->unknown_id));
    CALL(ctx, mxq_gguf_kv_bool(ctx, g, "tokenizer.ggml.add_bos_token", 1));
fail:
    return status;
}


/* The token texts of a GGUF's tokenizer.ggml.tokens (its strings were
 * bounded by the reader), as a vocabulary for check_unique_tokens. */
static mxq_status gguf_token_texts(mxq_ctx *ctx, const char *path, const uint8_t *bytes, size_t size,
                                   const mxq_gguf_array *tokens, mxq_export_vocab *v)
{
    mxq_status status = MXQ_OK;
    v->tokens = calloc((size_t)tokens->count, sizeof(char *));
    CHECK_ALLOC(ctx, v->tokens, (size_t)tokens->count * sizeof(char *), "the vocabulary's texts");
    v->n = (int)tokens->count;
    size_t at = tokens->first;
    for (uint64_t i = 0; i < tokens->count; i++) {
        uint64_t len = 0;
        /* bounded again: the file is mapped, and may have changed since */
        CHECK(ctx, at <= size && size - at >= 8, MXQ_ERR_IO, "%s: changed while it was read", path);
        memcpy(&len, bytes + at, 8);
        CHECK(ctx, len <= size - at - 8, MXQ_ERR_IO, "%s: changed while it was read", path);
        v->tokens[i] = strndup((const char *)bytes + at + 8, (size_t)len);
        CHECK_ALLOC(ctx, v->tokens[i], (size_t)len + 1, "a token's text");
        at += 8 + (size_t)len;
    }
fail:
    return status;
}

/* tokenizer.ggml.model: a string naming a tokenizer llama.cpp has (and for
 * gpt2, its merges). "no_vocab" is refused: llama.cpp aborts on it. */
static mxq_status check_gguf_tokenizer_model(mxq_ctx *ctx, const char *path, const uint8_t *bytes, size_t size,
                                             const mxq_gguf_kvs *kvs, int *sentencepiece)
{
    mxq_status status = MXQ_OK;
    /* the vocabularies llama.cpp pairs with its llama architecture */
    static const char *const known[] = {"llama", "gpt2"};
    char name[32] = "";
    uint64_t len = 0;
    CHECK(ctx, kvs->model.present && kvs->model.type == MXQ_GGUF_STRING, MXQ_ERR_FORMAT,
          "%s: tokenizer.ggml.model is %s; a string naming the tokenizer (llama, gpt2, ...) was expected", path,
          kvs->model.present ? "not a string" : "missing");
    CHECK(ctx, kvs->model.first <= size && size - kvs->model.first >= 8, MXQ_ERR_IO, "%s: changed while it was read",
          path);
    memcpy(&len, bytes + kvs->model.first, 8);
    if (len < sizeof(name) && len <= size - kvs->model.first - 8)
        memcpy(name, bytes + kvs->model.first + 8, (size_t)len), name[len] = '\0';
    int found = 0;
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
        found |= strcmp(name, known[i]) == 0;
    CHECK(ctx, found, MXQ_ERR_FORMAT,
          "%s: tokenizer.ggml.model '%.31s' is not one llama.cpp's llama architecture takes (llama, gpt2)",
          path, name);
    CHECK(ctx, strcmp(name, "gpt2") != 0 || (kvs->merges.present && kvs->merges.type == MXQ_GGUF_ARRAY &&
                                              kvs->merges.element == MXQ_GGUF_STRING),
          MXQ_ERR_FORMAT, "%s: a gpt2 tokenizer needs tokenizer.ggml.merges, an array of strings", path);
    *sentencepiece = strcmp(name, "llama") == 0;
fail:
    return status;
}

/* The vocabulary arrays llama.cpp reads for each token: the texts (n_vocab
 * strings, each once), and if present F32 scores and I32 types as many. */
static mxq_status check_gguf_vocab(mxq_ctx *ctx, const char *path, const uint8_t *bytes, size_t size,
                                   const mxq_gguf_kvs *kvs,
                                   int n_vocab)
{
    mxq_status status = MXQ_OK;
    mxq_export_vocab texts = {0};
    CHECK(ctx, kvs->tokens.present && kvs->tokens.type == MXQ_GGUF_ARRAY && kvs->tokens.element == MXQ_GGUF_STRING,
          MXQ_ERR_FORMAT, "%s: tokenizer.ggml.tokens is %s; an array of strings was expected", path,
          kvs->tokens.present ? "not an array of strings" : "missing");
    CHECK(ctx, kvs->tokens.count == (uint64_t)n_vocab, MXQ_ERR_FORMAT,
          "%s: its tokenizer.ggml.tokens has %llu tokens; the model's vocabulary has %d: not the same model", path,
          (unsigned long long)kvs->tokens.count, n_vocab);
    const struct {
        const mxq_gguf_array *array;
        const char *key;
        uint32_t element;
        const char *element_name;
    } per_token[] = {{&kvs->scores, "tokenizer.ggml.scores", MXQ_GGUF_F32, "f32"},
                     {&kvs->token_types, "tokenizer.ggml.token_type", MXQ_GGUF_I32, "i32"}};
    for (size_t i = 0; i < sizeof(per_token) / sizeof(per_token[0]); i++) {
        const mxq_gguf_array *a = per_token[i].array;
        CHECK(ctx, !a->present || (a->type == MXQ_GGUF_ARRAY && a->element == per_token[i].element &&
                                   a->count == (uint64_t)n_vocab),
              MXQ_ERR_FORMAT, "%s: %s must be an array of %d %s values (one per token)", path, per_token[i].key,
              n_vocab, per_token[i].element_name);
    }
    CHECK(ctx, !kvs->bad_type_key[0], MXQ_ERR_FORMAT, "%s: %s must be a %s (llama.cpp reads it so)", path,
          kvs->bad_type_key, kvs->bad_type_expected);
    int sentencepiece = 0;
    CALL(ctx, check_gguf_tokenizer_model(ctx, path, bytes, size, kvs, &sentencepiece));
    CALL(ctx, gguf_token_texts(ctx, path, bytes, size, &kvs->tokens, &texts));
    CALL(ctx, check_unique_tokens(ctx, path, &texts));
    if (sentencepiece)
        CALL(ctx, check_linefeed(ctx, path, &texts));
fail:
    mxq_export_vocab_free(&texts);
    return status;
}

/* --vocab-from: the tokenizer.* key-values of another GGUF of the model. */
mxq_status mxq_export_vocab_copy(mxq_ctx *ctx, mxq_gguf *g, const char *path, int n_vocab)
{
    mxq_status status = MXQ_OK;
    int fd = -1;
    void *map = MAP_FAILED;
    struct stat st;
    mxq_gguf_kvs kvs;
    CALL(ctx, mxq_input_open(ctx, path, "vocabulary GGUF", &fd));
    CHECK(ctx, fstat(fd, &st) == 0 && st.st_size > 0, MXQ_ERR_IO, "%s: cannot read its size, or it is empty", path);
    map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    CHECK(ctx, map != MAP_FAILED, MXQ_ERR_IO, "%s: cannot map it", path);
    CALL(ctx, mxq_gguf_copy_kvs(ctx, g, path, map, (size_t)st.st_size, "tokenizer.", &kvs));
    CHECK(ctx, kvs.copied > 0, MXQ_ERR_FORMAT, "%s: has no tokenizer.* keys to take the vocabulary from", path);
    CALL(ctx, check_gguf_vocab(ctx, path, map, (size_t)st.st_size, &kvs, n_vocab));
fail:
    if (map != MAP_FAILED)
        munmap(map, (size_t)st.st_size);
    if (fd >= 0)
        close(fd);
    return status;
}
