/* Token files: HDF5 dataset /tokens, int32 [n_sequences, seq_len]. Internal. */
#ifndef MXQ_TOKENS_H
#define MXQ_TOKENS_H

#include <stdint.h>

#include "mxq/core.h"

typedef struct {
    int32_t *ids; /* [n_seqs, seq_len] */
    int n_seqs;
    int seq_len;
    int total_seqs; /* sequences in the file, before any limit */
} mxq_tokens;

/* Read the first `limit` sequences (0 = all) and check every id against
 * [0, vocab) and the sequence length against max_len (before allocating).
 * `what` names the file in messages ("token file", "calibration file"). Local to this rank (no collective call: every rank reads the
 * same small file). Errors name the file and, for a bad id, the sequence
 * and position. */
mxq_status mxq_tokens_read(mxq_ctx *ctx, const char *path, const char *what, int limit, int vocab, int max_len,
                           mxq_tokens *out);
void mxq_tokens_free(mxq_tokens *tokens);

#endif
