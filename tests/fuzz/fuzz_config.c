/* libFuzzer target: config.json, as `mxq quantize`, `eval` and `--dry-run`
 * read it. A config that loads must give sizes the planner can use. */
#include <stdlib.h>

#include "fuzz_common.h"
#include "mxq/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_write("config.json", data, size);
    mxq_ctx *ctx = fuzz_ctx();
    mxq_model_config cfg;
    if (mxq_config_load(ctx, fuzz_dir(), &cfg) == MXQ_OK) {
        /* What the partition and the memory plan compute from it. */
        volatile size_t params = mxq_config_layer_params(&cfg) + mxq_config_embedding_params(&cfg);
        (void)params;
        for (int l = 0; l < MXQ_LIN_COUNT; l++) {
            int out = 0, in = 0;
            mxq_linear_shape(&cfg, (mxq_linear_id)l, &out, &in);
            if (out <= 0 || in <= 0)
                abort(); /* a loaded config promised positive shapes */
        }
    }
    mxq_ctx_destroy(ctx);
    return 0;
}
