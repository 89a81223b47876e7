/* mxq: distributed post-training quantization of LLaMA-family models to
 * microscaling (MX) formats. Umbrella header of the public API. */
#ifndef MXQ_MXQ_H
#define MXQ_MXQ_H

#include "mxq/core.h"
#include "mxq/gptq.h"
#include "mxq/jobs.h"
#include "mxq/model.h"
#include "mxq/mx.h"
#include "mxq/quantize.h"
#include "mxq/recipe.h"
#include "mxq/safetensors.h"
#include "mxq/synth.h"

#endif
