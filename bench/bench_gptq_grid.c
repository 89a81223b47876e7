/* GPTQ of one big linear at group size 1 (local LAPACK, every core in one
 * rank) and group size P (a ScaLAPACK grid of P ranks): time per phase,
 * loss, and how many quantized values differ between the two.
 *
 *   mpirun -n 1 bench_gptq_grid --threads 2 --save q.bin   [shape options]
 *   mpirun -n 2 bench_gptq_grid --threads 1 --compare q.bin [shape options]
 *
 * Shape options: --out M --in N (default 8192 x 28672, llama-2-70b's
 * down_proj), --tokens T (default 4096), --format F (mxint4), --repeats R;
 * --hessian root: H is built whole on rank 0 and sent to the grid from
 * there (the default, partial, needs a whole H per rank: 2 x 6.6 GB at
 * 28672 inputs, more than this 24 GB machine has next to the rest).
 *
 * The Hessian is X^T X of T random correlated tokens, built in double
 * (dsyrk, not timed), plus a diagonal standing for per-channel noise (so
 * that it is full rank, as over a real calibration set). With P ranks each rank builds the part of its share
 * of the tokens, and the grid run reduces the parts straight into its
 * distribution: that reduction is part of the timed "factor" phase, as it
 * is in a job. Weights are regenerated (not timed) before every repeat.
 * Prints medians; the peak RSS of every rank. */
#include <cblas.h>
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "bench_util.h"
#include "mxq/mxq.h"
#include "core/alloc.h"
#include "parallel/gptq_grid.h"

void openblas_set_num_threads(int);

typedef struct {
    size_t m, n, tokens;
    int repeats, threads, on_root;
    const char *format, *save, *compare;
} options;

static uint64_t next_random(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static double normal(uint64_t *s)
{
    double u = ((double)(next_random(s) >> 11) + 0.5) / 9007199254740992.0,
           v = ((double)(next_random(s) >> 11) + 0.5) / 9007199254740992.0;
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* The partial Hessian of tokens t with t % P == rank: correlated channels
 * with uneven scales; token t's values depend on t alone, so the parts of
 * any P add up to the same H. 512 tokens at a time. */
static double *partial_hessian(const options *o, int rank, int P)
{
    const size_t n = o->n, chunk = 512;
    double *h = calloc(n * n, sizeof(double)), *x = malloc(chunk * n * sizeof(double));
    double *scale = malloc(n * sizeof(double));
    if (!h || !x || !scale)
        return NULL;
    uint64_t s = 99;
    for (size_t c = 0; c < n; c++)
        scale[c] = exp(normal(&s));
    size_t rows = 0;
    for (size_t t = (size_t)rank; t < o->tokens; t += (size_t)P) {
        uint64_t ts = 1000003 * (t + 1);
        double common = normal(&ts), prev = 0;
        for (size_t c = 0; c < n; c++)
            prev = x[rows * n + c] = scale[c] * (0.5 * common + normal(&ts) + 0.3 * prev);
        if (++rows == chunk || t + (size_t)P >= o->tokens) {
            cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)n, (int)rows, 1.0, x, (int)n, 1.0, h, (int)n);
            rows = 0;
        }
    }
    /* Real activations are full rank over 128 x 2048 calibration tokens;
     * T random tokens alone would leave rank T < n. Each token is taken to
     * carry, besides, independent noise of 0.5 scale[c] per channel, whose
     * Gram is in expectation diagonal: added once, by rank 0's part. */
    for (size_t c = 0; rank == 0 && c < n; c++)
        h[c * n + c] += (double)o->tokens * 0.25 * scale[c] * scale[c];
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < i; j++)
            h[i * n + j] = h[j * n + i];
    free(x);
    free(scale);
    return h;
}

static void fill_weight(float *w, size_t count)
{
    uint64_t s = 4242;
    for (size_t i = 0; i < count; i++)
        w[i] = (float)(0.02 * normal(&s) * (i % 29 == 0 ? 5.0 : 1.0));
}

static int parse(int argc, char **argv, options *o)
{
    *o = (options){8192, 28672, 4096, 3, 1, 0, "mxint4", NULL, NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return -1;
        if (strcmp(a, "--out") == 0)
            o->m = (size_t)atol(v);
        else if (strcmp(a, "--in") == 0)
            o->n = (size_t)atol(v);
        else if (strcmp(a, "--tokens") == 0)
            o->tokens = (size_t)atol(v);
        else if (strcmp(a, "--repeats") == 0)
            o->repeats = atoi(v);
        else if (strcmp(a, "--threads") == 0)
            o->threads = atoi(v);
        else if (strcmp(a, "--format") == 0)
            o->format = v;
        else if (strcmp(a, "--save") == 0)
            o->save = v;
        else if (strcmp(a, "--compare") == 0)
            o->compare = v;
        else if (strcmp(a, "--hessian") == 0 && (strcmp(v, "root") == 0 || strcmp(v, "partial") == 0))
            o->on_root = strcmp(v, "root") == 0;
        else
            return -1;
        i++;
    }
    return o->m && o->n && o->tokens && o->repeats >= 1 && o->repeats <= 16 && o->threads >= 1 &&
                   !(o->save && o->compare)
               ? 0
               : -1;
}

/* Q and scales to a file (--save: a header of the shape, then the data),
 * or the count of values and scales that differ from the file's
 * (--compare). Returns 0, or -1 having said why. */
static int save_or_compare(const options *o, const float *q, const uint8_t *scales, size_t nscales, size_t *q_diff,
                           size_t *s_diff)
{
    const size_t count = o->m * o->n;
    uint64_t shape[2] = {o->m, o->n}, file_shape[2] = {0, 0};
    const char *path = o->save ? o->save : o->compare;
    FILE *f = fopen(path, o->save ? "wb" : "rb");
    int ok = f != NULL;
    if (ok && o->save)
        ok = fwrite(shape, sizeof(shape), 1, f) == 1 && fwrite(q, sizeof(float), count, f) == count &&
             fwrite(scales, 1, nscales, f) == nscales;
    if (f && fclose(f) != 0)
        ok = 0;
    if (!ok || o->save) {
        if (!ok)
            fprintf(stderr, "bench_gptq_grid: cannot %s %s\n", o->save ? "write" : "read", path);
        return ok ? 0 : -1;
    }
    float *ref = malloc(count * sizeof(float));
    uint8_t *ref_scales = malloc(nscales);
    f = fopen(path, "rb");
    ok = ref && ref_scales && f && fread(file_shape, sizeof(file_shape), 1, f) == 1;
    if (ok && (file_shape[0] != shape[0] || file_shape[1] != shape[1])) {
        fprintf(stderr, "bench_gptq_grid: %s holds a [%llu, %llu] result, this run is [%zu, %zu]\n", path,
                (unsigned long long)file_shape[0], (unsigned long long)file_shape[1], o->m, o->n);
        ok = 0;
    } else if (ok && (fread(ref, sizeof(float), count, f) != count || fread(ref_scales, 1, nscales, f) != nscales)) {
        fprintf(stderr, "bench_gptq_grid: %s is shorter than its header says\n", path);
        ok = 0;
    }
    for (size_t i = 0; ok && i < count; i++)
        *q_diff += memcmp(&ref[i], &q[i], sizeof(float)) != 0;
    for (size_t i = 0; ok && i < nscales; i++)
        *s_diff += ref_scales[i] != scales[i];
    if (f)
        fclose(f);
    free(ref);
    free(ref_scales);
    return ok ? 0 : -1;
}

typedef struct {
    double total[16], factor[16], quant[16], gemm[16], loss_time[16];
    mxq_gptq_stats last;
} timings;

/* One GPTQ run, local on one rank or on the grid of all ranks. */
static mxq_status run_once(mxq_ctx *ctx, mxq_dist *dist, const options *o, const mxq_mx_spec *spec,
                           const mxq_gptq_options *go, float *w, const double *h, uint8_t *scales, timings *t, int i)
{
    mxq_status status;
    if (w)
        fill_weight(w, o->m * o->n);
    MPI_Barrier(dist->comm);
    double t0 = mxq_time_now();
    if (dist->size == 1)
        status = mxq_gptq_quantize(ctx, spec, go, w, o->m, o->n, h, (double)o->tokens, scales, &t->last);
    else
        status = mxq_gptq_grid(ctx, dist, 0, spec, go, w, o->m, o->n, h,
                               o->on_root ? MXQ_HESSIAN_ON_ROOT : MXQ_HESSIAN_PARTIAL, (double)o->tokens, scales,
                               &t->last);
    t->total[i] = mxq_time_now() - t0;
    t->factor[i] = t->last.seconds_factor;
    t->quant[i] = t->last.seconds_quant;
    t->gemm[i] = t->last.seconds_gemm;
    t->loss_time[i] = t->last.seconds_loss;
    return status;
}

static int report(const mxq_dist *dist, const options *o, timings *t, double sgemm_peak, size_t nscales,
                  const float *w, const uint8_t *scales)
{
    long long rss = (long long)mxq_peak_rss_bytes(), all_rss[256] = {0};
    MPI_Gather(&rss, 1, MPI_LONG_LONG, all_rss, 1, MPI_LONG_LONG, 0, dist->comm);
    if (dist->rank != 0)
        return 0;
    const double n = (double)o->n, m = (double)o->m, flops = n * n * n / 3 + m * n * n;
    const int r = o->repeats;
    const double total = bench_median(t->total, r);
    printf("GPTQ %s [%zu, %zu], %zu tokens, group size %d (%s), %d thread(s) per rank, median of %d:\n", o->format,
           o->m, o->n, o->tokens, dist->size, dist->size == 1 ? "LAPACK" : "ScaLAPACK grid", o->threads, r);
    printf("  total %.2f s = factor %.2f s (H in place, Cholesky) + sweep %.2f s + trailing updates %.2f s + "
           "losses %.2f s\n",
           total, bench_median(t->factor, r), bench_median(t->quant, r), bench_median(t->gemm, r),
           bench_median(t->loss_time, r));
    printf("  GPTQ proper (n^3/3 + m n^2 = %.2f TFLOP, losses excluded) at %.0f GFLOP/s; sgemm peak of all ranks "
           "%.0f GFLOP/s\n",
           flops * 1e-12, flops / (total - bench_median(t->loss_time, r)) * 1e-9, sgemm_peak);
    printf("  loss %.9g, round-to-nearest %.9g (ratio %.4f), dead channels %d\n", t->last.loss, t->last.loss_rtn,
           t->last.loss / t->last.loss_rtn, t->last.dead_channels);
    for (int p = 0; p < dist->size && p < 256; p++)
        printf("  rank %d peak RSS %.2f GB\n", p, (double)all_rss[p] / 1e9);
    size_t q_diff = 0, s_diff = 0;
    if (!o->save && !o->compare)
        return 0;
    if (save_or_compare(o, w, scales, nscales, &q_diff, &s_diff) != 0)
        return -1;
    if (o->compare)
        printf("  against %s: %zu of %zu values (%.4f%%) and %zu of %zu scales differ\n", o->compare, q_diff,
               o->m * o->n, 100.0 * (double)q_diff / (double)(o->m * o->n), s_diff, nscales);
    return 0;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    options o;
    mxq_ctx *ctx = NULL;
    mxq_dist dist;
    int bad = parse(argc, argv, &o);
    if (bad || mxq_ctx_create(&ctx) != MXQ_OK || mxq_dist_create(ctx, MPI_COMM_WORLD, &dist) != MXQ_OK) {
        fprintf(stderr, "usage: mpirun -n P bench_gptq_grid [--out M] [--in N] [--tokens T] [--format F] "
                        "[--repeats R] [--threads T] [--hessian partial|root] [--save FILE | --compare FILE]\n");
        MPI_Finalize();
        return 2;
    }
    openblas_set_num_threads(o.threads);
    double peak = bench_gemm_peak(0, 3), sgemm_peak = 0;
    MPI_Reduce(&peak, &sgemm_peak, 1, MPI_DOUBLE, MPI_SUM, 0, dist.comm);
    mxq_mx_spec spec = {mxq_format_by_name(o.format), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    mxq_gptq_options go;
    mxq_gptq_defaults(&go);
    const size_t nscales = o.m * ((o.n + 31) / 32);
    /* --hessian root: rank 0 builds all of H (with every thread of the
     * node) and the grid receives it from there */
    double *h = NULL;
    if (!o.on_root || dist.rank == 0) {
        openblas_set_num_threads(o.on_root ? 2 * o.threads : o.threads);
        h = partial_hessian(&o, o.on_root ? 0 : dist.rank, o.on_root ? 1 : dist.size);
        openblas_set_num_threads(o.threads);
    }
    float *w = dist.rank == 0 ? mxq_alloc_floats(o.m * o.n) : NULL;
    uint8_t *scales = dist.rank == 0 ? malloc(nscales) : NULL;
    timings t;
    int failed = !spec.format || (!h && (!o.on_root || dist.rank == 0)) || (dist.rank == 0 && (!w || !scales));
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, dist.comm);
    for (int i = 0; !failed && i < o.repeats; i++)
        failed = run_once(ctx, &dist, &o, &spec, &go, w, h, scales, &t, i) != MXQ_OK;
    if (failed)
        fprintf(stderr, "bench_gptq_grid: %s\n",
                spec.format ? mxq_error_message(ctx) : "unknown --format (see mxq cast --help for the names)");
    else
        failed = report(&dist, &o, &t, sgemm_peak, nscales, w, scales) != 0;
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, dist.comm);
    free(h);
    free(w);
    free(scales);
    mxq_dist_free(&dist);
    mxq_ctx_destroy(ctx);
    MPI_Finalize();
    return failed;
}
