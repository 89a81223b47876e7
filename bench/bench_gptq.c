/* GPTQ-MX on layer shapes of llama-2-7b (4096 x 4096: q/k/v/o; 11008 x 4096:
 * gate/up), time per phase, against the sgemm peak (GPTQ works in float32)
 * measured in the same run; the dgemm peak is shown for reference.
 *
 *   bench_gptq [--repeats N] [--threads T] [--format mxint4] [--block 32]
 *              [--lazy 128] [--microblock 128] [--shapes 4096x4096,11008x4096]
 *
 * The Hessian is X^T X of 2048 random correlated tokens (built with dsyrk,
 * not timed). FLOPs counted for GPTQ proper: the Cholesky factor (n^3/3),
 * the lazy-batch updates (2 m (n-i1) b1 summed), and the micro-block solves
 * and updates inside a lazy batch (m n b2 + 2 m b2 (b1 - b2)/2 per batch,
 * about m n b1). The report's losses (GPTQ's from the factor, RTN's with one
 * strmm of m n^2 flops) are timed separately. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "mxq/mxq.h"

void openblas_set_num_threads(int);


int main(int argc, char **argv)
{
    int repeats = 3, threads = 1, block = 32, micro = 128, lazy = 128;
    const char *format = "mxint4";
    char shapes_arg[256] = "4096x4096,11008x4096";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc)
            repeats = atoi(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--format") == 0 && i + 1 < argc)
            format = argv[++i];
        else if (strcmp(argv[i], "--block") == 0 && i + 1 < argc)
            block = atoi(argv[++i]);
        else if (strcmp(argv[i], "--lazy") == 0 && i + 1 < argc)
            lazy = atoi(argv[++i]);
        else if (strcmp(argv[i], "--microblock") == 0 && i + 1 < argc)
            micro = atoi(argv[++i]);
        else if (strcmp(argv[i], "--shapes") == 0 && i + 1 < argc)
            snprintf(shapes_arg, sizeof(shapes_arg), "%s", argv[++i]);
        else {
            fprintf(stderr, "usage: bench_gptq [--repeats N] [--threads T] [--format F] [--block B] [--lazy L] [--microblock M] "
                            "[--shapes OUTxIN,...]\n");
            return 2;
        }
    }
    if (repeats < 1 || repeats > 32 || threads < 1) {
        fprintf(stderr, "bench_gptq: --repeats 1..32, --threads >= 1\n");
        return 2;
    }
    openblas_set_num_threads(threads);
    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_mx_spec spec = {mxq_format_by_name(format), block, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    mxq_gptq_options opt;
    mxq_gptq_defaults(&opt);
    opt.microblock = micro;
    opt.lazy_block = lazy;
    if (!spec.format || mxq_gptq_check(ctx, &opt, &spec) != MXQ_OK) {
        fprintf(stderr, "bench_gptq: bad format/block/microblock: %s\n", mxq_error_message(ctx));
        return 2;
    }
    double dpeak = bench_gemm_peak(1, repeats), speak = bench_gemm_peak(0, repeats);
    const char *coretype = getenv("OPENBLAS_CORETYPE");
    printf("# bench_gptq: %s block %d, gptq block %d microblock %d, %d thread%s, medians of %d runs\n", format, block,
           lazy, micro, threads, threads == 1 ? "" : "s", repeats);
    printf("# env: OPENBLAS_CORETYPE=%s; measured peak: dgemm %.1f GFLOP/s, sgemm %.1f GFLOP/s\n",
           coretype ? coretype : "(unset)", dpeak, speak);
    printf("%-11s %9s %9s %9s %9s %11s %9s %12s %12s %9s\n", "shape", "factor s", "quant s", "gemm s", "total s",
           "gemm GF/s", "gemm %pk", "gptq GFLOP", "peak-time s", "x peak");

    for (char *tok = strtok(shapes_arg, ","); tok; tok = strtok(NULL, ",")) {
        size_t m = 0, n = 0;
        if (sscanf(tok, "%zux%zu", &m, &n) != 2 || m == 0 || n == 0) {
            fprintf(stderr, "bench_gptq: bad shape '%s'\n", tok);
            return 2;
        }
        const size_t tokens = 2048;
        double *x = malloc(tokens * n * sizeof(double)), *h = calloc(n * n, sizeof(double));
        float *w0 = malloc(m * n * sizeof(float)), *w = malloc(m * n * sizeof(float));
        uint64_t s = 0x9E3779B97F4A7C15ull;
        for (size_t i = 0; i < tokens * n; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            double u = (double)(s >> 11) * 0x1.0p-53 - 0.5;
            x[i] = u * (1.0 + (double)((i % n) % 7)) + (i % n ? 0.3 * x[i - 1] : 0.0);
        }
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)n, (int)tokens, 1.0, x, (int)n, 0.0, h, (int)n);
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < i; j++)
                h[i * n + j] = h[j * n + i];
        for (size_t i = 0; i < m * n; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            w0[i] = (float)(((double)(s >> 11) * 0x1.0p-53 - 0.5) * 0.07);
        }
        double tf[32], tq[32], tg[32], tt[32], tl = 0, gflops = 0, loss = 0, loss_rtn = 0;
        for (int r = 0; r < repeats; r++) {
            memcpy(w, w0, m * n * sizeof(float));
            mxq_gptq_stats st;
            opt.skip_losses = r != 0; /* losses once, timed apart */
            double t0 = mxq_time_now();
            if (mxq_gptq_quantize(ctx, &spec, &opt, w, m, n, h, (double)tokens, NULL, &st) != MXQ_OK) {
                mxq_error_print(ctx, stderr, "bench_gptq");
                return 1;
            }
            tt[r] = mxq_time_now() - t0 - st.seconds_loss;
            tf[r] = st.seconds_factor;
            tq[r] = st.seconds_quant;
            tg[r] = st.seconds_gemm;
            gflops = st.gemm_flops / 1e9;
            if (r == 0) {
                tl = st.seconds_loss;
                loss = st.loss;
                loss_rtn = st.loss_rtn;
            }
        }
        double f = bench_median(tf, repeats), q = bench_median(tq, repeats), g = bench_median(tg, repeats),
               t = bench_median(tt, repeats);
        double nd = (double)n, md = (double)m;
        double factor_flops = nd * nd * nd / 3.0; /* spotrf */
        double inner_flops = md * nd * (double)lazy; /* solves + updates inside the lazy batches */
        double total_gflop = (factor_flops + inner_flops) / 1e9 + gflops;
        double peak_time = total_gflop / speak;
        printf("%-11s %9.3f %9.3f %9.3f %9.3f %11.1f %8.0f%% %12.1f %12.3f %8.2fx\n", tok, f, q, g, t, gflops / g,
               100.0 * gflops / g / speak, total_gflop, peak_time, t / peak_time);
        printf("#   losses (not in total): %.3f s; GPTQ loss %.4g vs RTN %.4g (%.1f%% lower)\n", tl, loss, loss_rtn,
               100.0 * (1.0 - loss / loss_rtn));
        fflush(stdout);
        free(x);
        free(h);
        free(w0);
        free(w);
    }
    mxq_ctx_destroy(ctx);
    return 0;
}
