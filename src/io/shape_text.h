/* Tensor shapes in messages. Internal. */
#ifndef MXQ_SHAPE_TEXT_H
#define MXQ_SHAPE_TEXT_H

#include <stddef.h>
#include <stdint.h>

/* "[4096, 11008]" */
void mxq_shape_text(char *buf, size_t size, int rank, const int64_t *shape);

#endif
