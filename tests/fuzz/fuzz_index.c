/* libFuzzer target: model.safetensors.index.json of a sharded checkpoint.
 * The directory holds two small valid shards (a.safetensors, b.safetensors)
 * that the fuzzed index may name; every name it lists is then looked up. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "mxq/safetensors.h"

static void write_shard(const char *file, const char *tensor)
{
    char header[160];
    int n = snprintf(header, sizeof(header), "{\"%s\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                     tensor);
    uint8_t bytes[8 + 160 + 8];
    uint64_t len = (uint64_t)n;
    memcpy(bytes, &len, 8); /* little-endian host, as the format */
    memcpy(bytes + 8, header, (size_t)n);
    const float values[2] = {1.0f, -2.0f};
    memcpy(bytes + 8 + n, values, sizeof(values));
    fuzz_write(file, bytes, 8 + (size_t)n + sizeof(values));
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    write_shard("a.safetensors", "x");
    write_shard("b.safetensors", "y");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_write("model.safetensors.index.json", data, size);
    mxq_ctx *ctx = fuzz_ctx();
    mxq_checkpoint *ckpt = NULL;
    const char **names = NULL;
    size_t count = 0;
    if (mxq_checkpoint_open(ctx, fuzz_dir(), &ckpt) != MXQ_OK)
        goto done;
    if (mxq_checkpoint_names(ctx, ckpt, &names, &count) != MXQ_OK)
        goto done;
    for (size_t i = 0; i < count; i++) {
        const mxq_tensor_view *t = NULL;
        (void)mxq_checkpoint_lookup(ctx, ckpt, names[i], &t);
    }
    const mxq_tensor_view *absent = NULL;
    (void)mxq_checkpoint_lookup(ctx, ckpt, "not.in.the.index", &absent);
done:
    free(names);
    mxq_checkpoint_close(ckpt);
    mxq_ctx_destroy(ctx);
    return 0;
}
