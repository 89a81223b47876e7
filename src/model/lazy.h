/* Models whose decoder layers stay in the mapped checkpoint, in its dtype,
 * until a job converts one: what lets a rank hold one or two layers of a 7B
 * model instead of all of them in float32. Internal (jobs, tests). */
#ifndef MXQ_MODEL_LAZY_H
#define MXQ_MODEL_LAZY_H

#include "mxq/model.h"

/* Like mxq_model_load, but the part's layers are not converted: the
 * checkpoint stays open (model->ckpt). The float tensors of the layers l
 * with (l - scan_offset) % scan_every == 0 are scanned for NaN/Inf now, so
 * that a bad weight stops a job before its first layer's work; ranks that
 * share a model split the scan that way. The embedding and head load as
 * the part asks. */
mxq_status mxq_model_load_lazy(mxq_ctx *ctx, const char *dir, const mxq_model_config *cfg, const mxq_model_part *part,
                               int scan_every, int scan_offset, mxq_model **out);

/* The float32 tensors of layer `layer` that are not held (all of them, or
 * those freed since). */
mxq_status mxq_model_layer_load(mxq_ctx *ctx, mxq_model *model, int layer);
/* Frees the float32 tensors of layer `layer` and gives back the process's
 * pages of its checkpoint tensors: what was converted no longer counts in
 * the resident set. */
mxq_status mxq_model_layer_unload(mxq_ctx *ctx, mxq_model *model, int layer);
/* Gives back the checkpoint pages of layer `layer`, keeping its float32
 * tensors. */
mxq_status mxq_model_layer_release_pages(mxq_ctx *ctx, mxq_model *model, int layer);
/* Frees the embedding table (unless it is the tied head) and gives back its
 * checkpoint pages: for ranks that embed their tokens once. */
mxq_status mxq_model_unload_embedding(mxq_ctx *ctx, mxq_model *model);

/* Frees a layer's float32 tensors (a model's, or a copy's) and clears it. */
void mxq_layer_free_tensors(mxq_layer *layer);

#endif
