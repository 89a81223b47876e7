/* Helpers shared by the model's sources. Internal. */
#ifndef MXQ_MODEL_INTERNAL_H
#define MXQ_MODEL_INTERNAL_H

#include <stddef.h>

/* n floats, 64-byte aligned (free() them): weights and activations. */
float *mxq_alloc_floats(size_t n);

#endif
