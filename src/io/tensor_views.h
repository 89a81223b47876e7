/* What the model's lazy loading needs of a mapped tensor. Internal. */
#ifndef MXQ_IO_TENSOR_VIEWS_H
#define MXQ_IO_TENSOR_VIEWS_H

#include "mxq/safetensors.h"

/* A floating-point tensor (F32, F16, BF16) with no NaN or Inf, checked
 * without converting it (the error names the tensor and the index). */
mxq_status mxq_tensor_check_float(mxq_ctx *ctx, const mxq_tensor_view *tensor);

/* Give back the process's pages of the tensor's bytes (the page cache keeps
 * them; a later read faults them in again): a rank's resident set is then
 * the layers it is working on. */
void mxq_tensor_view_release(const mxq_tensor_view *tensor);

#endif
