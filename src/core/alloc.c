#define _DEFAULT_SOURCE
#include "core/alloc.h"
#include "mxq/core.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdlib.h>
#include <sys/mman.h>

enum { SMALL_ALIGN = 64, HUGE_PAGE = 2u << 20, HUGE_FROM = 4u << 20 };

void *mxq_alloc(size_t bytes)
{
    size_t align = bytes >= HUGE_FROM ? HUGE_PAGE : SMALL_ALIGN;
    size_t rounded = (bytes + align - 1) / align * align;
    void *p = NULL;
    if (rounded < bytes || posix_memalign(&p, align, rounded ? rounded : align) != 0)
        return NULL;
#ifdef MADV_HUGEPAGE
    if (align == HUGE_PAGE)
        (void)madvise(p, rounded, MADV_HUGEPAGE); /* advice only: failure changes nothing */
#endif
    return p;
}

float *mxq_alloc_floats(size_t n)
{
    if (n > (size_t)-1 / sizeof(float))
        return NULL;
    return mxq_alloc(n * sizeof(float));
}

void *mxq_alloc_lasting(size_t bytes)
{
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void mxq_free_lasting(void *p, size_t bytes)
{
    if (p)
        (void)munmap(p, bytes ? bytes : 1); /* only fails for a range that was never mapped */
}

void mxq_keep_freed_memory(void)
{
#ifdef __GLIBC__ /* elsewhere the allocator's own policy stands */
    (void)mallopt(M_MMAP_MAX, 0);
    (void)mallopt(M_TRIM_THRESHOLD, -1); /* -1: never trim */
#endif
}
