/* Allocation of large arrays. Internal. */
#ifndef MXQ_CORE_ALLOC_H
#define MXQ_CORE_ALLOC_H

#include <stddef.h>

/* `bytes` bytes (free() them), 64-byte aligned (AVX-512 loads, OpenBLAS
 * packing); from 4 MiB up 2 MiB-aligned and marked for transparent huge
 * pages. On this kind of machine THP is "madvise": without the mark, the
 * GEMMs over GPTQ's and the forward pass's arrays spend a large part of
 * their time in page faults and TLB misses. */
void *mxq_alloc(size_t bytes);

/* n floats, as mxq_alloc */
float *mxq_alloc_floats(size_t n);

/* Long-lived buffers (a layer's packed result, kept until the shard is
 * written), mapped on their own: allocated from the heap between the large
 * per-layer arrays that come and go, they would split the heap's big free
 * blocks, and a data-parallel run's peak would grow by about a layer's
 * worth every few layers (measured on a 32-layer 7B run: 90 MB a layer).
 * Free with mxq_free_lasting and the same size. */
void *mxq_alloc_lasting(size_t bytes);
void mxq_free_lasting(void *p, size_t bytes);

#endif
