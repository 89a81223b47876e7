/* mxq: distributed post-training quantization of LLaMA-family models to
 * microscaling (MX) formats. Umbrella header of the public API. */
#ifndef MXQ_MXQ_H
#define MXQ_MXQ_H

#include "mxq/core.h"
#include "mxq/fsutil.h"
#include "mxq/gptq.h"
#include "mxq/h5io.h"
#include "mxq/dist.h"
#include "mxq/eval.h"
#include "mxq/model.h"
#include "mxq/quantize.h"
#include "mxq/mx.h"
#include "mxq/recipe.h"
#include "mxq/safetensors.h"
#include "mxq/synth.h"
#include "mxq/tokens.h"

#endif
