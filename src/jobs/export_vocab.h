/* The vocabulary of a GGUF export. Internal (jobs). */
#ifndef MXQ_EXPORT_VOCAB_H
#define MXQ_EXPORT_VOCAB_H

#include <stdint.h>

#include "io/gguf.h"
#include "mxq/model.h"

/* n tokens as llama.cpp's "llama" (SentencePiece) vocabulary takes them */
typedef struct {
    char **tokens;   /* [n] texts, U+2581 for spaces */
    float *scores;   /* [n] */
    int32_t *types;  /* [n] llama.cpp's: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte */
    int n;
    int unknown_id, eos_id;
} mxq_export_vocab;

/* Read `path`: a tokenizer.json (by its name) or a llama2.c tokenizer.bin,
 * of the model's vocabulary size; every text once. */
mxq_status mxq_export_vocab_read(mxq_ctx *ctx, const char *path, const mxq_model_config *cfg, mxq_export_vocab *v);
/* Its tokenizer.* key-values into g. */
mxq_status mxq_export_vocab_write(mxq_ctx *ctx, mxq_gguf *g, const mxq_export_vocab *v, const mxq_model_config *cfg);
void mxq_export_vocab_free(mxq_export_vocab *v);

/* --vocab-from: copy the tokenizer.* key-values of the GGUF at `path`, after
 * checking them as llama.cpp's loader would, for n_vocab tokens. */
mxq_status mxq_export_vocab_copy(mxq_ctx *ctx, mxq_gguf *g, const char *path, int n_vocab);

#endif
