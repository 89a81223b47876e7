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

#endif
