/* Forward pass of one decoder layer, against the machine's sgemm peak.
 *
 *   bench_forward --model DIR [--seq 512] [--batch 8] [--repeats 3] [--threads 1,2]
 *
 * DIR is a model from `mxq synth` (e.g. --preset llama-2-7b --layers 1). For
 * each thread count the benchmark first measures sgemm peak (a 4096^3 product,
 * median of --repeats) and then the layer forward on batch x seq tokens
 * (median of --repeats after a warm-up), and reports achieved GFLOP/s of the
 * layer as a fraction of that peak. FLOPs counted: the seven projections
 * (2 * tokens * in * out each) and the attention products as executed
 * (2 * 2 * seq^2 * head_dim per head and sequence). */
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
    const char *model_dir = NULL;
    int seq = 512, batch = 8, repeats = 3;
    int threads[8] = {1, 2}, n_threads = 2;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
            model_dir = argv[++i];
        else if (strcmp(argv[i], "--seq") == 0 && i + 1 < argc)
            seq = atoi(argv[++i]);
        else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc)
            batch = atoi(argv[++i]);
        else if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc)
            repeats = atoi(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            n_threads = 0;
            for (char *tok = strtok(argv[++i], ","); tok && n_threads < 8; tok = strtok(NULL, ","))
                threads[n_threads++] = atoi(tok);
        } else {
            fprintf(stderr, "usage: bench_forward --model DIR [--seq N] [--batch N] [--repeats N] [--threads 1,2]\n");
            return 2;
        }
    }
    if (!model_dir || seq < 2 || batch < 1 || repeats < 1 || repeats > 32) {
        fprintf(stderr, "bench_forward: --model is required; --repeats 1..32\n");
        return 2;
    }

    mxq_ctx *ctx;
    mxq_ctx_create(&ctx);
    mxq_model_config cfg;
    mxq_model *model = NULL;
    mxq_workspace *ws = NULL;
    mxq_model_part part = {0, 1, 0, 0};
    if (mxq_config_load(ctx, model_dir, &cfg) != MXQ_OK || mxq_model_load(ctx, model_dir, &cfg, &part, &model) != MXQ_OK ||
        mxq_workspace_create(ctx, &cfg, batch, seq, &ws) != MXQ_OK) {
        mxq_error_print(ctx, stderr, "bench_forward");
        return 1;
    }
    size_t T = (size_t)batch * seq, d = (size_t)cfg.hidden;
    float *x0 = malloc(T * d * sizeof(float)), *x = malloc(T * d * sizeof(float));
    uint64_t s = 88172645463325252ull;
    for (size_t i = 0; i < T * d; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x0[i] = (float)((double)(s >> 11) * 0x1.0p-53 - 0.5);
    }

    double flops = 0;
    for (int l = 0; l < MXQ_LIN_COUNT; l++) {
        int o, in;
        mxq_linear_shape(&cfg, (mxq_linear_id)l, &o, &in);
        flops += 2.0 * (double)T * o * in;
    }
    double attn_flops = 2.0 * 2.0 * (double)seq * seq * cfg.head_dim * cfg.n_heads * batch;
    flops += attn_flops;

    const char *coretype = getenv("OPENBLAS_CORETYPE"), *l2 = getenv("OPENBLAS_L2_SIZE");
    printf("# bench_forward: one %s-shaped layer (d=%d, ffn=%d, heads %d/%d), batch %d x seq %d = %zu tokens\n",
           model_dir, cfg.hidden, cfg.intermediate, cfg.n_heads, cfg.n_kv_heads, batch, seq, T);
    printf("# %.1f GFLOP per forward (%.1f%% attention products); medians of %d runs\n", flops / 1e9,
           100.0 * attn_flops / flops, repeats);
    printf("# env: OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s\n", coretype ? coretype : "(unset)", l2 ? l2 : "(unset)");
    printf("%7s %14s %12s %14s %10s\n", "threads", "sgemm GFLOP/s", "forward s", "layer GFLOP/s", "of peak");
    for (int ti = 0; ti < n_threads; ti++) {
        openblas_set_num_threads(threads[ti]);
        double peak = bench_gemm_peak(0, repeats);
        double times[32];
        memcpy(x, x0, T * d * sizeof(float));
        mxq_model_run_layers(ctx, model, 0, 1, x, batch, seq, NULL, ws); /* warm-up */
        for (int r = 0; r < repeats; r++) {
            memcpy(x, x0, T * d * sizeof(float));
            double t0 = mxq_time_now();
            if (mxq_model_run_layers(ctx, model, 0, 1, x, batch, seq, NULL, ws) != MXQ_OK) {
                mxq_error_print(ctx, stderr, "bench_forward");
                return 1;
            }
            times[r] = mxq_time_now() - t0;
        }
        double t = bench_median(times, repeats);
        double gflops = flops / t / 1e9;
        printf("%7d %14.1f %12.3f %14.1f %9.1f%%\n", threads[ti], peak, t, gflops, 100.0 * gflops / peak);
        fflush(stdout);
    }
    free(x0);
    free(x);
    mxq_workspace_free(ws);
    mxq_model_free(model);
    mxq_ctx_destroy(ctx);
    return 0;
}
