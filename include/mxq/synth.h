/* Random-weight models with the shapes of real ones (mxq synth). */
#ifndef MXQ_SYNTH_H
#define MXQ_SYNTH_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"
#include "mxq/model.h"
#include "mxq/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *name;
    mxq_arch arch;
    int hidden, intermediate, layers, heads, kv_heads, vocab, max_positions;
    double rms_eps, rope_theta;
    int tie;
    int llama3_rope;
} mxq_synth_preset;

const mxq_synth_preset *mxq_synth_preset_by_name(const char *name);
const char *mxq_synth_preset_names(void);

typedef struct {
    const mxq_synth_preset *preset;
    int layers;         /* 0 = the preset's */
    mxq_dtype dtype;    /* MXQ_DT_BF16 or MXQ_DT_F32 */
    size_t shard_size;  /* bytes per shard; 0 = one file */
    uint64_t seed;
    int force;          /* overwrite a model already in out_dir */
} mxq_synth_options;

/* Writes <out_dir>/model*.safetensors (+ index when sharded) and, last,
 * config.json. Peak memory is one shard. */
mxq_status mxq_synth_write(mxq_ctx *ctx, const mxq_synth_options *options, const char *out_dir);

#ifdef __cplusplus
}
#endif

#endif
