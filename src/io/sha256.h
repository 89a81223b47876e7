/* SHA-256 (FIPS 180-4): the fingerprints of a quantize job's inputs, which
 * a resumed run must match. Internal. */
#ifndef MXQ_SHA256_H
#define MXQ_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"

typedef struct {
    uint32_t h[8];
    uint64_t length;     /* bytes hashed so far */
    unsigned char block[64];
    size_t used;         /* bytes waiting in block */
} mxq_sha256;

void mxq_sha256_init(mxq_sha256 *s);
void mxq_sha256_update(mxq_sha256 *s, const void *data, size_t len);
/* The digest as 64 lowercase hex digits and a NUL. It pads the state: feed
 * nothing more after it. */
void mxq_sha256_hex(mxq_sha256 *s, char hex[65]);

/* The digest of a whole regular file (read in pieces, never all at once)
 * and its size. `what` names it in messages. */
mxq_status mxq_sha256_file(mxq_ctx *ctx, const char *path, const char *what, char hex[65], uint64_t *size);

#endif
