/* Perplexity evaluation, pipelined over MPI ranks. */
#ifndef MXQ_EVAL_H
#define MXQ_EVAL_H

#include <mpi.h>
#include <stddef.h>

#include "mxq/core.h"
#include "mxq/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int batch;            /* sequences per micro-batch (default 8) */
    int limit;            /* evaluate the first `limit` sequences; 0 = all */
    mxq_fake_quant quant; /* optional fake quantization */
    /* Optional: quantize in memory with this recipe, calibrated on
     * calib_path, before evaluating (what mxq quantize would write). */
    const struct mxq_recipe_s *recipe; /* mxq/recipe.h */
    const char *recipe_path;
    const char *calib_path;
} mxq_eval_options;

typedef struct {
    double mean_nll;
    double ppl;
    size_t tokens_scored;
    int sequences;
    int seq_len;
    double seconds;      /* pipeline wall time (after loading) */
    double load_seconds; /* config, weights and tokens */
    double tokens_per_s; /* tokens pushed through the model per second */
    int ranks;
    int acts_quantized; /* activations were MX-quantized (flag, recipe or checkpoint) */
    mxq_mx_spec acts;
} mxq_eval_result;

/* Collective over `comm`. Every rank returns the same result. */
mxq_status mxq_eval_perplexity(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *tokens_path,
                               const mxq_eval_options *options, mxq_eval_result *result);

#ifdef __cplusplus
}
#endif

#endif
