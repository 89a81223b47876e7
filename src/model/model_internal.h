/* Helpers shared by the model's sources. Internal. */
#ifndef MXQ_MODEL_INTERNAL_H
#define MXQ_MODEL_INTERNAL_H

#include <stddef.h>

#include "core/alloc.h"

#endif
