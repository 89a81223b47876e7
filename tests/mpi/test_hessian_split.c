/* Hessians spread over the ranks (parallel/hessian_split.c) against the
 * whole Hessian of the same tokens (mxq_input_stats_add, the local path),
 * on every rank count it is started with (mpirun -n 2, -n 3):
 *   - every stored block row equals H's, to float32 rounding of the Gram
 *     products (the tokens are grouped otherwise), also with exchanges cut
 *     into small slabs and ranks with fewer or no tokens;
 *   - max|x|, sum|x| and the token count summed onto the root exactly;
 *   - the owner's requests: quadratic forms tr(d H d^T) (before and after a
 *     rescale) and diagonal blocks against the whole H; GPTQ on the grid
 *     against local GPTQ (the same algorithm: the losses to 1e-6); and the
 *     quadratic forms from the factor GPTQ leaves, to 1e-4.
 * The root is the last rank (a layer's owner need not be rank 0). */
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
#include "parallel/hessian_split.h"
#include "mpi_main.h"
#include "testutil.h"

enum { N = 256, NB = 32, CALLS = 4 };

static mxq_ctx *ctx;
static mxq_dist dist;

/* Rank r's tokens of call c: a count that varies (0 for some), values with
 * correlated channels and uneven scales, the same on every rank. */
static size_t tokens_of(int r, int c)
{
    return (size_t)((c * 37 + r * 53) % 97);
}

static float *activations(int r, int c)
{
    const size_t t = tokens_of(r, c);
    float *x = malloc((t ? t : 1) * N * sizeof(float));
    tu_rng rng = {(uint64_t)(1000 + 17 * r + c)};
    for (size_t k = 0; k < t; k++) {
        double common = tu_rng_normal(&rng);
        for (size_t j = 0; j < N; j++)
            x[k * N + j] = (float)((0.5 + (double)(j % 7)) * (0.6 * common + tu_rng_normal(&rng)));
    }
    return x;
}

/* The whole statistics of every rank's tokens, in rank order. */
static void whole_stats(mxq_input_stats *whole)
{
    assert_int_equal(mxq_input_stats_init(ctx, N, whole), MXQ_OK);
    for (int r = 0; r < dist.size; r++)
        for (int c = 0; c < CALLS; c++) {
            float *x = activations(r, c);
            assert_int_equal(mxq_input_stats_add(ctx, whole, x, tokens_of(r, c)), MXQ_OK);
            free(x);
        }
    mxq_input_stats_finish(whole);
}

static void spread_stats(mxq_hsplit *hs, mxq_hsplit_work *w, size_t slab)
{
    assert_int_equal(mxq_hsplit_init(ctx, &dist, N, NB, hs), MXQ_OK);
    assert_int_equal(mxq_hsplit_work_init(ctx, &dist, N, NB, 1000, w), MXQ_OK);
    w->slab = slab;
    for (int c = 0; c < CALLS; c++) {
        float *x = activations(dist.rank, c);
        assert_int_equal(mxq_hsplit_add(ctx, &dist, hs, w, x, tokens_of(dist.rank, c), MXQ_OK), MXQ_OK);
        free(x);
    }
}

/* The largest difference of a stored element from H's, relative to max|H|. */
static double stored_difference(const mxq_hsplit *hs, const double *h)
{
    double worst = 0, scale = 0;
    for (size_t i = 0; i < (size_t)N * N; i++)
        scale = fmax(scale, fabs(h[i]));
    for (size_t l = 0; l < hs->n_loc; l++) {
        const size_t g = ((l / NB) * (size_t)dist.size + (size_t)dist.rank) * NB + l % NB;
        for (size_t cc = (g / NB) * NB; cc < N; cc++)
            worst = fmax(worst, fabs(hs->grid.rows[cc * hs->n_loc + l] - h[(N - 1 - g) * N + N - 1 - cc]));
    }
    MPI_Allreduce(MPI_IN_PLACE, &worst, 1, MPI_DOUBLE, MPI_MAX, dist.comm);
    return worst / scale;
}

static void test_accumulation(void **state)
{
    (void)state;
    mxq_input_stats whole;
    whole_stats(&whole);
    for (size_t slab = 5; slab <= 1000; slab += 995) { /* many exchanges per call, and one */
        mxq_hsplit hs;
        mxq_hsplit_work w;
        spread_stats(&hs, &w, slab);
        double diff = stored_difference(&hs, whole.hessian);
        print_message("# slab %zu: stored block rows within %.1e of H (relative to max|H|)\n", slab, diff);
        assert_true(diff <= 1e-6);
        const int root = dist.size - 1;
        assert_int_equal(mxq_hsplit_finish(ctx, &dist, &hs, root, "test input"), MXQ_OK);
        if (dist.rank == root) {
            assert_true(hs.abs.n_tokens == whole.n_tokens);
            for (size_t j = 0; j < N; j++) {
                assert_true(hs.abs.abs_max[j] == whole.abs_max[j]);
                assert_true(fabs(hs.abs.abs_sum[j] - whole.abs_sum[j]) <= 1e-12 * whole.abs_sum[j]);
            }
        }
        mxq_hsplit_free(&hs);
        mxq_hsplit_work_free(&w);
    }
    mxq_input_stats_free(&whole);
}

/* d [rows, N], the same on every rank. */
static float *random_rows(size_t rows, uint64_t seed)
{
    tu_rng rng = {seed};
    float *d = malloc(rows * N * sizeof(float));
    for (size_t i = 0; i < rows * N; i++)
        d[i] = (float)(0.01 * tu_rng_normal(&rng));
    return d;
}

/* Checks on the root while the other ranks serve it: a failed one is
 * counted, not fatal, so that the root still ends the serving (a cmocka
 * assertion there would leave the others waiting). */
static int root_failures;
#define ROOT_CHECK(cond)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            root_failures++;                                                               \
            fprintf(stderr, "%s:%d: root check failed: %s\n", __FILE__, __LINE__, #cond);   \
        }                                                                                  \
    } while (0)
#define ROOT_EQUAL(a, b) ROOT_CHECK((a) == (b))

/* Root: per-group sums of d_k H d_k^T against mxq_quant_loss on the whole H. */
static double quadratic_difference(mxq_hsplit_server *sv, const double *h, const float *d, size_t rows, size_t per)
{
    double sums[8], worst = 0;
    float *zero = calloc(per * N, sizeof(float));
    ROOT_EQUAL(sv->ops.quadratic(ctx, sv->ops.user, MXQ_INPUT_ATTN, d, rows, per, sums), MXQ_OK);
    for (size_t g = 0; g < rows / per; g++) {
        double want;
        ROOT_EQUAL(mxq_quant_loss(ctx, d + g * per * N, zero, per, N, h, &want), MXQ_OK);
        worst = fmax(worst, fabs(sums[g] - want) / want);
    }
    free(zero);
    return worst;
}

/* Root: the diagonal blocks of B against the whole H's. */
static void check_blocks(mxq_hsplit_server *sv, const double *h, int B)
{
    double *blocks = malloc((size_t)N * B * sizeof(double)), worst = 0;
    ROOT_EQUAL(sv->ops.diagonal_blocks(ctx, sv->ops.user, MXQ_INPUT_ATTN, B, blocks), MXQ_OK);
    for (size_t c0 = 0; c0 < N; c0 += (size_t)B)
        for (size_t a = 0; a < (size_t)B; a++)
            for (size_t b = 0; b < (size_t)B; b++)
                worst = fmax(worst, fabs(blocks[(c0 / B) * B * B + a * B + b] - h[(c0 + a) * N + c0 + b]) /
                                        fabs(h[(c0 + a) * N + c0 + a]));
    print_message("# diagonal blocks of %d within %.1e (relative to their row's diagonal)\n", B, worst);
    ROOT_CHECK(worst <= 1e-5);
    free(blocks);
}

/* tr(D H D^T) of D = a - b [m, N] in double. */
static double exact_loss(const float *a, const float *b, size_t m, const double *h)
{
    double total = 0;
    for (size_t r = 0; r < m; r++)
        for (size_t i = 0; i < N; i++)
            for (size_t j = 0; j < N; j++)
                total += ((double)a[r * N + i] - b[r * N + i]) * h[i * N + j] * ((double)a[r * N + j] - b[r * N + j]);
    return total;
}

/* Root: GPTQ of a random [48, N] weight on the grid against the local path
 * on the whole H; then the quadratic forms from the factor. */
static void check_gptq(mxq_hsplit_server *sv, const mxq_input_stats *whole)
{
    const size_t m = 48;
    float *w = random_rows(m, 77), *grid = malloc(m * N * sizeof(float)), *local = malloc(m * N * sizeof(float));
    uint8_t *s1 = calloc(m * N, 1), *s2 = calloc(m * N, 1);
    memcpy(grid, w, m * N * sizeof(float));
    memcpy(local, w, m * N * sizeof(float));
    mxq_gptq_options o = sv->recipe->steps[0].gptq;
    o.skip_losses = 1;
    mxq_gptq_stats st;
    int dead = -1;
    ROOT_EQUAL(sv->ops.gptq(ctx, sv->ops.user, MXQ_LIN_Q, grid, m, N, whole->n_tokens, s1, &dead), MXQ_OK);
    ROOT_EQUAL(mxq_gptq_quantize(ctx, &sv->recipe->weights, &o, local, m, N, whole->hessian, whole->n_tokens, s2,
                                       &st),
                     MXQ_OK);
    size_t differ = 0;
    for (size_t i = 0; i < m * N; i++)
        differ += grid[i] != local[i];
    const double lg = exact_loss(w, grid, m, whole->hessian), ll = exact_loss(w, local, m, whole->hessian);
    print_message("# GPTQ on the spread H: loss %.9e vs %.9e locally, %zu of %zu values differ\n", lg, ll, differ,
                  m * N);
    ROOT_EQUAL(dead, st.dead_channels);
    ROOT_CHECK(fabs(lg - ll) <= 1e-6 * ll);
    ROOT_CHECK(differ * 1000 <= m * N);
    float *d = random_rows(8, 99);
    double diff = quadratic_difference(sv, whole->hessian, d, 8, 2);
    print_message("# quadratic forms from the factor within %.1e\n", diff);
    ROOT_CHECK(diff <= 1e-4);
    free(d);
    free(w);
    free(grid);
    free(local);
    free(s1);
    free(s2);
}

/* Root: AWQ clipping with the spread H's blocks against the whole H's. */
static void check_clip(mxq_hsplit_server *sv, const double *h)
{
    const size_t m = 64;
    float *a = random_rows(m, 31), *b = malloc(m * N * sizeof(float));
    memcpy(b, a, m * N * sizeof(float));
    const mxq_hessian_ref spread = {.remote = &sv->ops, .input = MXQ_INPUT_ATTN};
    ROOT_EQUAL(mxq_awq_clip_ref(ctx, &sv->recipe->weights, a, (int)m, N, &spread, 20, 0.5), MXQ_OK);
    ROOT_EQUAL(mxq_awq_clip(ctx, &sv->recipe->weights, b, (int)m, N, h, 20, 0.5), MXQ_OK);
    size_t differ = 0;
    for (size_t i = 0; i < m * N; i++)
        differ += a[i] != b[i];
    print_message("# AWQ clipping: %zu of %zu values differ\n", differ, m * N);
    /* a block's shrink tips between candidates of nearly equal loss on H's
     * last bits (about 1% of the values); blocks taken from the wrong place
     * would change most of them */
    ROOT_CHECK(differ * 20 <= m * N);
    free(a);
    free(b);
}

/* The owner's requests, in the order a layer makes them. */
static void root_requests(mxq_hsplit_server *sv, mxq_input_stats *whole)
{
    float *d = random_rows(12, 5);
    double diff = quadratic_difference(sv, whole->hessian, d, 12, 4);
    print_message("# quadratic forms within %.1e\n", diff);
    ROOT_CHECK(diff <= 1e-5);
    check_blocks(sv, whole->hessian, 16);
    check_blocks(sv, whole->hessian, 32);
    check_clip(sv, whole->hessian);
    double s[N];
    for (size_t j = 0; j < N; j++)
        s[j] = 0.5 + (double)(j % 5) * 0.25;
    ROOT_EQUAL(sv->ops.rescale(ctx, sv->ops.user, MXQ_INPUT_ATTN, s), MXQ_OK);
    mxq_input_stats_rescale(whole, s);
    diff = quadratic_difference(sv, whole->hessian, d, 12, 4);
    print_message("# after a rescale: quadratic forms within %.1e\n", diff);
    ROOT_CHECK(diff <= 1e-5);
    check_gptq(sv, whole);
    check_blocks(sv, whole->hessian, 32); /* kept from before the factor */
    free(d);
}

static void test_requests(void **state)
{
    (void)state;
    mxq_input_stats whole;
    mxq_hsplit hs[MXQ_INPUT_COUNT];
    mxq_hsplit_work w;
    mxq_recipe recipe;
    const char *text = "weights: {format: mxint4, block: 16, rounding: even}\n"
                       "activations: {format: mxint8, block: 32}\n"
                       "algorithms:\n  - gptq: {block: 32, microblock: 16, damp: 0.01, act_order: false}\n"
                       "calibration: {samples: 8, mode: fp}\n";
    assert_int_equal(mxq_recipe_parse_string(ctx, text, "test recipe", &recipe), MXQ_OK);
    whole_stats(&whole);
    spread_stats(&hs[MXQ_INPUT_ATTN], &w, 64);
    const int root = getenv("ROOT0") ? 0 : dist.size - 1;
    assert_int_equal(mxq_hsplit_finish(ctx, &dist, &hs[MXQ_INPUT_ATTN], root, "test input"), MXQ_OK);
    mxq_hsplit_server sv;
    mxq_hsplit_server_init(&sv, &dist, root, 0, &recipe, hs);
    if (dist.rank == root) {
        root_failures = 0;
        root_requests(&sv, &whole);
        assert_int_equal(mxq_hsplit_end(ctx, &sv), MXQ_OK);
        assert_int_equal(root_failures, 0);
    } else {
        assert_int_equal(mxq_hsplit_serve(ctx, &sv), MXQ_OK);
    }
    mxq_hsplit_free(&hs[MXQ_INPUT_ATTN]);
    mxq_hsplit_work_free(&w);
    mxq_input_stats_free(&whole);
    mxq_recipe_free(&recipe);
}

/* A rank that failed before an exchange joins it with its failure: every
 * rank returns an error there, none waits. */
static void test_failure_reaches_every_rank(void **state)
{
    (void)state;
    mxq_hsplit hs;
    mxq_hsplit_work w;
    assert_int_equal(mxq_hsplit_init(ctx, &dist, N, NB, &hs), MXQ_OK);
    assert_int_equal(mxq_hsplit_work_init(ctx, &dist, N, NB, 1000, &w), MXQ_OK);
    float *x = activations(dist.rank, 1);
    mxq_status local = dist.rank == 1 ? MXQ_ERR_NOMEM : MXQ_OK;
    mxq_status s = mxq_hsplit_add(ctx, &dist, &hs, &w, x, tokens_of(dist.rank, 1), local);
    assert_int_equal(s, dist.rank == 1 ? MXQ_ERR_NOMEM : MXQ_ERR_REMOTE);
    free(x);
    mxq_hsplit_free(&hs);
    mxq_hsplit_work_free(&w);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accumulation),
        cmocka_unit_test(test_requests),
        cmocka_unit_test(test_failure_reaches_every_rank),
    };
    return tu_mpi_main(argc, argv, tests, sizeof(tests) / sizeof(tests[0]), &ctx, &dist);
}
