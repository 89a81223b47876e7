/* libFuzzer target: the GGUF key-value reader behind `mxq export
 * --vocab-from` (io/gguf.c). Every key is copied (prefix ""), written into a
 * GGUF of mxq's own and read back: the copy's key-value bytes must be the
 * input's, byte for byte, and read back to the same vocabulary arrays, or
 * the target aborts. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "io/fsutil.h"
#include "io/gguf.h"

/* What mxq writes from `g`, committed to <fuzz_dir>/copy.gguf and read
 * back whole (NULL: the harness failed). */
static uint8_t *write_and_read(mxq_ctx *ctx, mxq_gguf *g, size_t *size)
{
    mxq_input_set inputs = {0};
    mxq_output out = {.fd = -1};
    char *text = NULL;
    if (mxq_output_begin(ctx, fuzz_path("copy.gguf"), &inputs, &out) != MXQ_OK ||
        mxq_gguf_write_header(ctx, g, &out) != MXQ_OK || mxq_gguf_finish(ctx, g) != MXQ_OK ||
        mxq_output_commit(ctx, &out) != MXQ_OK ||
        mxq_input_read_all(ctx, fuzz_path("copy.gguf"), "copy", (size_t)1 << 30, &text, size) != MXQ_OK)
        text = NULL;
    mxq_output_abort(&out);
    return (uint8_t *)text;
}

static int same_array(const mxq_gguf_array *a, const mxq_gguf_array *b)
{
    return a->present == b->present && a->type == b->type && a->element == b->element && a->count == b->count &&
           (!a->present || a->type != MXQ_GGUF_ARRAY || a->first == b->first);
}

enum { HEADER_BYTES = 24 }; /* magic, version, tensor and key-value counts */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mxq_ctx *ctx = fuzz_ctx();
    mxq_gguf *g = NULL, *again = NULL;
    uint8_t *copy = NULL;
    size_t copy_size = 0;
    mxq_gguf_kvs kvs, kvs_again;
    if (mxq_gguf_create(ctx, &g) != MXQ_OK || mxq_gguf_create(ctx, &again) != MXQ_OK)
        abort();
    if (mxq_gguf_copy_kvs(ctx, g, "fuzzed.gguf", data, size, "", &kvs) != MXQ_OK)
        goto done;
    copy = write_and_read(ctx, g, &copy_size);
    if (!copy)
        abort(); /* what was read must be writable */
    if (mxq_gguf_copy_kvs(ctx, again, "copy.gguf", copy, copy_size, "", &kvs_again) != MXQ_OK)
        abort(); /* and readable */
    const size_t kv_bytes = kvs.end - HEADER_BYTES;
    if (kvs_again.copied != kvs.copied || kvs_again.end != HEADER_BYTES + kv_bytes ||
        memcmp(copy + HEADER_BYTES, data + HEADER_BYTES, kv_bytes) != 0)
        abort(); /* the same key-values, byte for byte */
    if (!same_array(&kvs.tokens, &kvs_again.tokens) || !same_array(&kvs.scores, &kvs_again.scores) ||
        !same_array(&kvs.token_types, &kvs_again.token_types))
        abort(); /* the same vocabulary arrays, at the same places */
done:
    free(copy);
    mxq_gguf_free(g);
    mxq_gguf_free(again);
    mxq_ctx_destroy(ctx);
    return 0;
}
