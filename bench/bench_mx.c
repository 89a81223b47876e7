/* MX quantize+pack throughput on one core.
 *
 * A 4096 x 4096 float32 matrix (normal values, fixed seed) is quantized and
 * packed (E8M0 scales + packed elements, no dequantized copy) for MXINT4,
 * MXFP4 and MXINT8 at blocks 32 and 128. Each figure is the median of
 * --repeats runs after one warm-up run, next to the median of a memcpy of the
 * same input bytes in the same process, so the ratio is meaningful on any
 * machine. Target: >= 1 G elements/s (4 GB/s of FP32 input) for MXINT4 and
 * MXFP4 with the fast kernel.
 *
 *   build/bench/bench_mx [--repeats N] [--size N] [--reference]
 */
#define _GNU_SOURCE
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "mxq/mxq.h"


static void cpu_model(char *buf, size_t size)
{
    snprintf(buf, size, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[512];
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *colon = strchr(line, ':');
            if (colon) {
                snprintf(buf, size, "%s", colon + 2);
                buf[strcspn(buf, "\n")] = '\0';
            }
            break;
        }
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    int repeats = 9;
    size_t n = 4096;
    int with_reference = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc)
            repeats = atoi(argv[++i]);
        else if (strcmp(argv[i], "--size") == 0 && i + 1 < argc)
            n = (size_t)atol(argv[++i]);
        else if (strcmp(argv[i], "--reference") == 0)
            with_reference = 1;
        else {
            fprintf(stderr, "usage: bench_mx [--repeats N] [--size N] [--reference]\n");
            return 2;
        }
    }
    if (repeats < 1 || repeats > 1000 || n < 1 || n > 65536) {
        fprintf(stderr, "bench_mx: --repeats must be 1..1000 and --size 1..65536\n");
        return 2;
    }

    /* One core: pin to the CPU we start on so the figure is per core. */
    cpu_set_t set;
    CPU_ZERO(&set);
    int cpu = sched_getcpu();
    CPU_SET(cpu < 0 ? 0 : cpu, &set);
    int pinned = sched_setaffinity(0, sizeof(set), &set) == 0;

    char model[256];
    cpu_model(model, sizeof(model));
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    const char *l2 = getenv("OPENBLAS_L2_SIZE");
    printf("# bench_mx: MX quantize+pack of a %zu x %zu float32 matrix, one core%s\n", n, n,
           pinned ? " (pinned)" : "");
    printf("# cpu: %s; fast kernel: %s; AVX-512 available: %s\n", model,
           mxq_kernel_name(mxq_kernel_resolve(MXQ_KERNEL_AUTO)),
           mxq_kernel_available(MXQ_KERNEL_AVX512) ? "yes" : "no");
    printf("# env: OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s (not used by this benchmark: no BLAS calls)\n",
           coretype ? coretype : "(unset)", l2 ? l2 : "(unset)");
    printf("# each figure: median of %d runs after a warm-up\n", repeats);

    mxq_ctx *ctx;
    if (mxq_ctx_create(&ctx) != MXQ_OK)
        return 1;
    size_t count = n * n;
    float *x = malloc(count * sizeof(float));
    float *copy = malloc(count * sizeof(float));
    uint8_t *packed = malloc(count); /* 8-bit is the largest storage */
    uint8_t *scales = malloc(count);
    double *times = malloc((size_t)repeats * sizeof(double));
    if (!x || !copy || !packed || !scales || !times) {
        fprintf(stderr, "bench_mx: out of memory\n");
        return 1;
    }
    uint64_t s = 0x243F6A8885A308D3ull;
    for (size_t i = 0; i < count; i += 2) {
        /* Box-Muller from a xorshift stream */
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        double u1 = ((double)(s >> 11) + 1.0) * 0x1.0p-53;
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        double u2 = (double)(s >> 11) * 0x1.0p-53;
        double r = sqrt(-2.0 * log(u1));
        x[i] = (float)(r * cos(6.283185307179586 * u2));
        if (i + 1 < count)
            x[i + 1] = (float)(r * sin(6.283185307179586 * u2));
    }
    memset(copy, 0, count * sizeof(float));
    memset(packed, 0, count);
    memset(scales, 0, count);

    for (int i = 0; i < repeats; i++) {
        double t0 = mxq_time_now();
        memcpy(copy, x, count * sizeof(float));
        times[i] = mxq_time_now() - t0;
    }
    double memcpy_s = bench_median(times, repeats);
    double memcpy_gbs = (double)(count * sizeof(float)) / memcpy_s / 1e9;
    printf("memcpy of %.0f MiB: %.2f ms, %.2f GB/s read (= %.2f G float32/s)\n",
           (double)(count * sizeof(float)) / 1048576.0, memcpy_s * 1e3, memcpy_gbs, memcpy_gbs / 4.0);

    const char *formats[] = {"mxint4", "mxfp4_e2m1", "mxint8"};
    const int blocks[] = {32, 128};
    printf("\n%-11s %5s %-9s %10s %10s %10s %12s\n", "format", "block", "kernel", "ms", "Gelem/s", "GB/s in",
           "vs memcpy");
    int status = 0;
    for (int k = 0; k < (with_reference ? 2 : 1); k++) {
        mxq_kernel kernel = k == 0 ? MXQ_KERNEL_AUTO : MXQ_KERNEL_REFERENCE;
        int runs = k == 0 ? repeats : (repeats < 3 ? repeats : 3);
        for (size_t f = 0; f < 3; f++)
            for (size_t b = 0; b < 2; b++) {
                mxq_mx_spec spec = {mxq_format_by_name(formats[f]), blocks[b], MXQ_ROUND_EVEN, kernel};
                if (mxq_mx_quantize_rows(ctx, &spec, x, n, n, packed, scales, NULL) != MXQ_OK) {
                    mxq_error_print(ctx, stderr, "bench_mx");
                    return 1;
                }
                for (int i = 0; i < runs; i++) {
                    double t0 = mxq_time_now();
                    mxq_mx_quantize_rows(ctx, &spec, x, n, n, packed, scales, NULL);
                    times[i] = mxq_time_now() - t0;
                }
                double t = bench_median(times, runs);
                double geps = (double)count / t / 1e9;
                printf("%-11s %5d %-9s %10.2f %10.3f %10.2f %11.2fx\n", formats[f], blocks[b],
                       mxq_kernel_name(mxq_kernel_resolve(kernel)), t * 1e3, geps, geps * 4.0,
                       (geps * 4.0) / memcpy_gbs);
            }
    }
    free(x);
    free(copy);
    free(packed);
    free(scales);
    free(times);
    mxq_ctx_destroy(ctx);
    return status;
}
