/* libFuzzer target: one safetensors file (8-byte length, JSON header, data),
 * opened as every reader of weights and checkpoints opens it, then each
 * tensor read as eval would: converted to float if it is one. */
#include <stdlib.h>

#include "fuzz_common.h"
#include "mxq/safetensors.h"

static void read_tensor(mxq_ctx *ctx, const mxq_tensor_view *t)
{
    if (t->dtype != MXQ_DT_F32 && t->dtype != MXQ_DT_F16 && t->dtype != MXQ_DT_BF16)
        return;
    if (t->numel > (1u << 20))
        return; /* the parser bounds it by the file size; keep iterations fast */
    float *out = malloc((t->numel ? t->numel : 1) * sizeof(float));
    if (!out)
        return;
    (void)mxq_tensor_to_f32(ctx, t, t->rank, t->shape, out);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_write("model.safetensors", data, size);
    mxq_ctx *ctx = fuzz_ctx();
    mxq_st_file *file = NULL;
    if (mxq_st_file_open(ctx, fuzz_path("model.safetensors"), &file) == MXQ_OK) {
        for (size_t i = 0; i < mxq_st_file_count(file); i++) {
            const mxq_tensor_view *t = mxq_st_file_tensor(file, i);
            if (mxq_st_file_find(file, t->name) == NULL)
                abort(); /* every listed tensor must be found by its name */
            read_tensor(ctx, t);
        }
        mxq_st_file_close(file);
    }
    mxq_ctx_destroy(ctx);
    return 0;
}
