/* Set-up steps the MPI jobs share. Each is local to a rank: a job chains
 * them and agrees once, before its first collective. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "jobs/jobs_internal.h"

/* Whether model_dir holds any weights (a dry run may plan from config.json
 * alone). */
static int has_weights(const char *model_dir)
{
    char path[MXQ_PATH_BUF];
    mxq_path_join(path, model_dir, "model.safetensors");
    if (access(path, F_OK) == 0)
        return 1;
    mxq_path_join(path, model_dir, "model.safetensors.index.json");
    return access(path, F_OK) == 0;
}

mxq_status mxq_job_config(mxq_ctx *ctx, const char *model_dir, int weights_optional, mxq_model_config *cfg)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, mxq_config_load(ctx, model_dir, cfg));
    if (weights_optional && !has_weights(model_dir)) {
        if (mxq_ctx_rank(ctx) == 0) /* every rank finds the same */
            mxq_log(ctx, MXQ_LOG_INFO, "'%s' holds no weights: planning from config.json alone", model_dir);
        return MXQ_OK;
    }
    CALL(ctx, mxq_model_check_checkpoint(ctx, model_dir, cfg));
fail:
    return status;
}

mxq_status mxq_job_partition(mxq_ctx *ctx, int size, const mxq_model_config *cfg, int **first)
{
    mxq_status status = MXQ_OK;
    *first = malloc((size_t)(size + 1) * sizeof(int));
    CHECK_ALLOC(ctx, *first, (size_t)(size + 1) * sizeof(int), "the layer partition");
    CALL(ctx, mxq_partition_layers(ctx, cfg, size, *first));
fail:
    return status;
}

mxq_status mxq_calibration_tokens(mxq_ctx *ctx, const char *calib_path, const mxq_recipe *recipe,
                                  const char *recipe_path, const mxq_model_config *cfg, mxq_tokens *tokens)
{
    mxq_status status = MXQ_OK;
    memset(tokens, 0, sizeof(*tokens));
    CHECK(ctx, calib_path != NULL, MXQ_ERR_ARG, "a calibration token file is needed to apply a recipe");
    CALL(ctx, mxq_tokens_read(ctx, calib_path, "calibration file", recipe->calib_samples, cfg->vocab, cfg->max_positions,
                              tokens));
    CHECK(ctx, tokens->total_seqs >= recipe->calib_samples, MXQ_ERR_ARG,
          "calibration file '%s' has %d sequences, but the recipe%s%s asks for calibration.samples = %d", calib_path,
          tokens->total_seqs, recipe_path ? " " : "", recipe_path ? recipe_path : "", recipe->calib_samples);
    return MXQ_OK;
fail:
    mxq_tokens_free(tokens);
    return status;
}

void mxq_layer_results_free(mxq_layer_result *results, int n)
{
    for (int i = 0; results && i < n; i++)
        mxq_layer_result_free(&results[i]);
    free(results);
}
