/* Shared by the benchmarks: medians of repeated timings. */
#ifndef MXQ_BENCH_UTIL_H
#define MXQ_BENCH_UTIL_H

#include <cblas.h>
#include <stdlib.h>

#include "mxq/core.h"

static int bench_compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n values (sorts v in place). */
static inline double bench_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), bench_compare_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* GFLOP/s of a 4096^3 GEMM (double or single precision), median of
 * `repeats` runs after a warm-up: the machine's peak, measured in the same
 * run as the figure it is compared with. */
static inline double bench_gemm_peak(int use_double, int repeats)
{
    const int n = 4096;
    size_t es = use_double ? sizeof(double) : sizeof(float);
    void *a = malloc((size_t)n * n * es), *b = malloc((size_t)n * n * es), *c = malloc((size_t)n * n * es);
    if (!a || !b || !c) {
        free(a);
        free(b);
        free(c);
        return 0.0;
    }
    for (size_t i = 0; i < (size_t)n * n; i++) {
        if (use_double) {
            ((double *)a)[i] = (double)((i * 7) % 13) * 0.01;
            ((double *)b)[i] = (double)((i * 5) % 11) * 0.01;
        } else {
            ((float *)a)[i] = (float)((i * 7) % 13) * 0.01f;
            ((float *)b)[i] = (float)((i * 5) % 11) * 0.01f;
        }
    }
    double times[64];
    if (repeats > 64)
        repeats = 64;
    for (int r = -1; r < repeats; r++) {
        double t0 = mxq_time_now();
        if (use_double)
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0, a, n, b, n, 0.0, c, n);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        if (r >= 0)
            times[r] = mxq_time_now() - t0;
    }
    free(a);
    free(b);
    free(c);
    return 2.0 * n * (double)n * n / bench_median(times, repeats) / 1e9;
}

#endif
