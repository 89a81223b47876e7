/* mxq: distributed post-training quantization of LLaMA-family models to
 * microscaling (MX) formats. Umbrella header of the public API. */
#ifndef MXQ_MXQ_H
#define MXQ_MXQ_H

#include "mxq/core.h"
#include "mxq/fsutil.h"
#include "mxq/h5io.h"
#include "mxq/mx.h"

#endif
