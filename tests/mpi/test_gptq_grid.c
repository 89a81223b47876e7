/* GPTQ on a ScaLAPACK grid against the local LAPACK path, on every rank
 * count it is started with (mpirun -n 2, -n 3): the losses agree to a
 * relative 1e-6 and at most 0.1% of the quantized values differ (the
 * Cholesky factor is computed by blocks in another order, so float32
 * rounding may move a value across a rounding boundary). Every rank runs
 * every case (the grid is collective); rank 0 alone checks and prints.
 * "Loss" is tr(D H D^T) of each result, computed here in double; GPTQ's own
 * estimate of it, from its float32 factor, is checked to 1e-5. */
#include <math.h>
#include <mpi.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mxq/gptq.h"
#include "mxq/mxq.h"
#include "parallel/gptq_grid.h"
#include "mpi_main.h"
#include "testutil.h"

typedef struct {
    const char *format;
    size_t m, n, tokens;
    int b1, b2, act_order, n_dead;
    mxq_hessian_source source;
    int root_last; /* weights and H on the last rank instead of rank 0 */
} grid_case;

static mxq_ctx *ctx;
static mxq_dist dist;

/* Tokens with correlated channels and uneven scales; H of the tokens t with
 * t % share_count == share (share_count 1: all of them). */
static double *make_hessian(size_t n, size_t tokens, int n_dead, int share, int share_count)
{
    tu_rng rng = {12345};
    double *x = malloc(n * sizeof(double)), *h = calloc(n * n, sizeof(double)), *scale = malloc(n * sizeof(double));
    for (size_t c = 0; c < n; c++)
        scale[c] = exp(1.2 * tu_rng_normal(&rng));
    for (size_t t = 0; t < tokens; t++) {
        double common = tu_rng_normal(&rng);
        for (size_t c = 0; c < n; c++)
            x[c] = scale[c] * (0.6 * common + tu_rng_normal(&rng) + 0.3 * (c ? x[c - 1] : 0));
        for (int d = 0; d < n_dead; d++)
            x[(size_t)(7 + 61 * d) % n] = 0.0;
        if ((int)(t % (size_t)share_count) != share)
            continue;
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < n; j++)
                h[i * n + j] += x[i] * x[j];
    }
    free(x);
    free(scale);
    return h;
}

static float *make_weight(size_t m, size_t n)
{
    tu_rng rng = {777};
    float *w = calloc(m * n, sizeof(float));
    for (size_t i = 0; w && i < m * n; i++)
        w[i] = (float)(0.05 * tu_rng_normal(&rng) * (i % 17 == 0 ? 6.0 : 1.0));
    return w;
}

/* tr(D H D^T), D = orig - q, in double: the loss itself, free of the
 * float32 rounding of GPTQ's own estimate (from its Cholesky factor). */
static double exact_loss(const float *orig, const float *q, size_t m, size_t n, const double *h)
{
    double total = 0.0, *d = malloc(n * sizeof(double));
    for (size_t r = 0; r < m; r++) {
        for (size_t i = 0; i < n; i++)
            d[i] = (double)orig[r * n + i] - (double)q[r * n + i];
        for (size_t i = 0; i < n; i++) {
            double hd = 0.0;
            for (size_t j = 0; j < n; j++)
                hd += h[i * n + j] * d[j];
            total += d[i] * hd;
        }
    }
    free(d);
    return total;
}

static void run_case(const grid_case *c)
{
    const int root = c->root_last ? dist.size - 1 : 0;
    mxq_mx_spec spec = {mxq_format_by_name(c->format), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    mxq_gptq_options opt;
    mxq_gptq_defaults(&opt);
    opt.lazy_block = c->b1;
    opt.microblock = c->b2;
    opt.act_order = c->act_order;
    const size_t m = c->m, n = c->n, nblocks = n / 32;
    double *h = make_hessian(n, c->tokens, c->n_dead, 0, 1);
    double *part = c->source == MXQ_HESSIAN_PARTIAL ? make_hessian(n, c->tokens, c->n_dead, dist.rank, dist.size)
                                                    : NULL;
    float *local = make_weight(m, n), *grid = make_weight(m, n);
    uint8_t *local_scales = malloc(m * nblocks), *grid_scales = calloc(m * nblocks, 1);
    mxq_gptq_stats ls, gs;
    mxq_status local_status =
        mxq_gptq_quantize(ctx, &spec, &opt, local, m, n, h, (double)c->tokens, local_scales, &ls);
    const double *given = c->source == MXQ_HESSIAN_PARTIAL ? part : dist.rank == root ? h : NULL;
    mxq_status grid_status = mxq_gptq_grid(ctx, &dist, root, &spec, &opt, dist.rank == root ? grid : NULL, m, n,
                                           given, c->source, (double)c->tokens, dist.rank == root ? grid_scales : NULL,
                                           &gs);
    MPI_Bcast(grid, (int)(m * n), MPI_FLOAT, root, dist.comm);
    MPI_Bcast(grid_scales, (int)(m * nblocks), MPI_UINT8_T, root, dist.comm);
    float *orig = make_weight(m, n);
    const double exact_local = exact_loss(orig, local, m, n, h), exact_grid = exact_loss(orig, grid, m, n, h);
    free(orig);
    size_t q_diff = 0, s_diff = 0;
    for (size_t i = 0; i < m * n; i++)
        q_diff += !tu_same_float(local[i], grid[i]);
    for (size_t i = 0; i < m * nblocks; i++)
        s_diff += local_scales[i] != grid_scales[i];
    if (dist.rank == 0)
        printf("# %s [%zu, %zu] b1 %d b2 %d act_order %d dead %d %s root %d on %d ranks: loss %.9g vs %.9g (rel "
               "%.2e; GPTQ's estimates %.9g vs %.9g), rtn %.9g vs %.9g, %zu values and %zu scales differ\n",
               c->format, m, n, c->b1, c->b2, c->act_order, gs.dead_channels,
               c->source == MXQ_HESSIAN_PARTIAL ? "partial H" : "H on root", root, dist.size, exact_grid,
               exact_local, fabs(exact_grid - exact_local) / exact_local, gs.loss, ls.loss, gs.loss_rtn, ls.loss_rtn,
               q_diff, s_diff);
    free(h);
    free(part);
    free(local_scales);
    free(grid_scales);
    assert_int_equal(local_status, MXQ_OK);
    assert_int_equal(grid_status, MXQ_OK);
    assert_int_equal(gs.dead_channels, ls.dead_channels);
    assert_true(ls.loss > 0 && ls.loss < ls.loss_rtn);
    assert_true(fabs(exact_grid - exact_local) <= 1e-6 * exact_local);
    /* the estimates from each path's own float32 factor: to its rounding */
    assert_true(fabs(gs.loss - ls.loss) <= 1e-5 * ls.loss);
    assert_true(fabs(gs.loss_rtn - ls.loss_rtn) <= 1e-6 * ls.loss_rtn);
    assert_true(fabs(gs.loss - exact_grid) <= 1e-5 * exact_grid);
    assert_true(q_diff * 1000 <= m * n);
    assert_true(s_diff * 1000 <= m * nblocks);
    free(local);
    free(grid);
}

static void test_microblocks_on_root(void **state)
{
    (void)state;
    grid_case c = {"mxint4", 96, 512, 700, 128, 128, 0, 0, MXQ_HESSIAN_ON_ROOT, 0};
    run_case(&c);
}

static void test_columns_act_order_dead_partial(void **state)
{
    (void)state;
    grid_case c = {"mxfp4_e2m1", 80, 640, 900, 128, 1, 1, 3, MXQ_HESSIAN_PARTIAL, 0};
    run_case(&c);
}

static void test_wide_batches_root_last(void **state)
{
    (void)state;
    grid_case c = {"mxint8", 64, 768, 500, 256, 64, 0, 0, MXQ_HESSIAN_ON_ROOT, 1};
    run_case(&c);
}

static void test_fewer_tokens_than_inputs_partial(void **state)
{
    (void)state;
    grid_case c = {"mxint4", 48, 384, 200, 128, 32, 0, 1, MXQ_HESSIAN_PARTIAL, 0};
    run_case(&c);
}

/* One batch: every rank but the first holds no rows of the grid. */
static void test_one_batch_empty_ranks(void **state)
{
    (void)state;
    grid_case c = {"mxint4", 40, 128, 300, 128, 32, 0, 1, MXQ_HESSIAN_PARTIAL, 0};
    run_case(&c);
}

/* A shape that is not whole batches: the same clear error on every rank. */
static void test_refuses_partial_batches(void **state)
{
    (void)state;
    mxq_mx_spec spec = {mxq_format_by_name("mxint4"), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    mxq_gptq_options opt;
    mxq_gptq_defaults(&opt);
    const size_t m = 8, n = 160;
    double *h = make_hessian(n, 300, 0, 0, 1);
    float *w = make_weight(m, n);
    mxq_gptq_stats st;
    mxq_status s = mxq_gptq_grid(ctx, &dist, 0, &spec, &opt, dist.rank == 0 ? w : NULL, m, n, dist.rank == 0 ? h : NULL,
                                 MXQ_HESSIAN_ON_ROOT, 300.0, NULL, &st);
    int mine = s != MXQ_OK, all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_SUM, dist.comm);
    const char *msg = mxq_error_message(ctx);
    free(h);
    free(w);
    assert_int_equal(all, dist.size);
    assert_int_equal(s, MXQ_ERR_ARG);
    assert_non_null(strstr(msg, "not a whole number of gptq.block batches"));
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_microblocks_on_root),
        cmocka_unit_test(test_columns_act_order_dead_partial),
        cmocka_unit_test(test_wide_batches_root_last),
        cmocka_unit_test(test_fewer_tokens_than_inputs_partial),
        cmocka_unit_test(test_one_batch_empty_ranks),
        cmocka_unit_test(test_refuses_partial_batches),
    };
    return tu_mpi_main(argc, argv, tests, sizeof(tests) / sizeof(tests[0]), &ctx, &dist);
}
