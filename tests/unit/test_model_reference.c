/* The forward pass against Hugging Face transformers: logits of the bundled
 * stories260K model on reference.h5:/tokens must match /logits (computed by
 * transformers' LlamaForCausalLM in FP32) to 1e-3, and the per-sequence NLL
 * must agree with a log-softmax of those reference logits. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mxq/mxq.h"
#include "testutil.h"

typedef struct {
    mxq_ctx *ctx;
    mxq_model_config cfg;
    mxq_model *model;
    int32_t *tokens;
    float *ref_logits;
    size_t n, S, V;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    assert_int_equal(mxq_ctx_create(&f->ctx), MXQ_OK);
    const char *dir = tu_data_path("stories260K");
    char model_dir[4096];
    snprintf(model_dir, sizeof(model_dir), "%s", dir);
    assert_int_equal(mxq_config_load(f->ctx, model_dir, &f->cfg), MXQ_OK);
    mxq_model_part all = {0, f->cfg.n_layers, 1, 1};
    if (mxq_model_load(f->ctx, model_dir, &f->cfg, &all, &f->model) != MXQ_OK)
        fail_msg("%s", mxq_error_message(f->ctx));
    hid_t file = H5Fopen(tu_data_path("stories260K/reference.h5"), H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(file >= 0);
    int rank;
    size_t dt[4], dl[4];
    f->tokens = tu_h5_read(file, "/tokens", H5T_NATIVE_INT32, 4, &rank, dt);
    assert_int_equal(rank, 2);
    f->ref_logits = tu_h5_read(file, "/logits", H5T_NATIVE_FLOAT, 4, &rank, dl);
    assert_int_equal(rank, 3);
    H5Fclose(file);
    f->n = dt[0];
    f->S = dt[1];
    f->V = dl[2];
    assert_int_equal(f->V, (size_t)f->cfg.vocab);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    mxq_model_free(f->model);
    free(f->tokens);
    free(f->ref_logits);
    mxq_ctx_destroy(f->ctx);
    free(f);
    return 0;
}

static float *forward_hidden(fixture *f, mxq_workspace **ws)
{
    size_t T = f->n * f->S;
    float *x = malloc(T * (size_t)f->cfg.hidden * sizeof(float));
    assert_int_equal(mxq_workspace_create(f->ctx, &f->cfg, (int)f->n, (int)f->S, ws), MXQ_OK);
    assert_int_equal(mxq_model_embed(f->ctx, f->model, f->tokens, (int)f->n, (int)f->S, x), MXQ_OK);
    assert_int_equal(mxq_model_run_layers(f->ctx, f->model, 0, f->cfg.n_layers, x, (int)f->n, (int)f->S, NULL, *ws),
                     MXQ_OK);
    return x;
}

static void test_logits_match_transformers(void **state)
{
    fixture *f = *state;
    mxq_workspace *ws;
    float *x = forward_hidden(f, &ws);
    size_t T = f->n * f->S;
    float *logits = malloc(T * f->V * sizeof(float));
    assert_int_equal(mxq_model_logits(f->ctx, f->model, x, (int)f->n, (int)f->S, logits, ws), MXQ_OK);
    double max_diff = 0.0;
    for (size_t i = 0; i < T * f->V; i++) {
        double diff = fabs((double)logits[i] - (double)f->ref_logits[i]);
        if (!(diff <= max_diff))
            max_diff = diff; /* also catches NaN */
    }
    print_message("# max |logit - transformers| = %.3g over %zu logits\n", max_diff, T * f->V);
    assert_true(max_diff <= 1e-3);
    free(logits);
    free(x);
    mxq_workspace_free(ws);
}

static void test_nll_matches_reference_logits(void **state)
{
    fixture *f = *state;
    mxq_workspace *ws;
    float *x = forward_hidden(f, &ws);
    double *nll = malloc(f->n * sizeof(double));
    assert_int_equal(mxq_model_sequence_nll(f->ctx, f->model, x, f->tokens, (int)f->n, (int)f->S, nll, ws), MXQ_OK);
    for (size_t s = 0; s < f->n; s++) {
        double expected = 0.0;
        for (size_t t = 0; t + 1 < f->S; t++) {
            const float *row = f->ref_logits + (s * f->S + t) * f->V;
            double mx = row[0], sum = 0.0;
            for (size_t j = 1; j < f->V; j++)
                mx = row[j] > mx ? row[j] : mx;
            for (size_t j = 0; j < f->V; j++)
                sum += exp(row[j] - mx);
            expected += mx + log(sum) - row[f->tokens[s * f->S + t + 1]];
        }
        assert_true(fabs(nll[s] - expected) <= 1e-4 * fabs(expected));
    }
    free(nll);
    free(x);
    mxq_workspace_free(ws);
}

/* Two model parts loaded apart, as two pipeline ranks hold them (layers
 * [0, 2) with the embedding, [2, L) with the head), with workspaces of
 * their own, give the same bits as the whole model. (The micro-batch size
 * must match: OpenBLAS blocks sgemm's rows by it, and the last bits of
 * some activations differ between batches of 1 and 4 sequences.) */
static void test_split_layers_same_bits(void **state)
{
    fixture *f = *state;
    mxq_workspace *ws, *ws_a, *ws_b;
    float *whole = forward_hidden(f, &ws);
    size_t T = f->n * f->S, d = (size_t)f->cfg.hidden;
    mxq_model_part part_a = {0, 2, 1, 0}, part_b = {2, f->cfg.n_layers, 0, 1};
    mxq_model *a, *b;
    assert_int_equal(mxq_model_load(f->ctx, tu_data_path("stories260K"), &f->cfg, &part_a, &a), MXQ_OK);
    assert_int_equal(mxq_model_load(f->ctx, tu_data_path("stories260K"), &f->cfg, &part_b, &b), MXQ_OK);
    assert_int_equal(mxq_workspace_create(f->ctx, &f->cfg, (int)f->n, (int)f->S, &ws_a), MXQ_OK);
    assert_int_equal(mxq_workspace_create(f->ctx, &f->cfg, (int)f->n, (int)f->S, &ws_b), MXQ_OK);
    float *split = malloc(T * d * sizeof(float));
    assert_int_equal(mxq_model_embed(f->ctx, a, f->tokens, (int)f->n, (int)f->S, split), MXQ_OK);
    assert_int_equal(mxq_model_run_layers(f->ctx, a, 0, 2, split, (int)f->n, (int)f->S, NULL, ws_a), MXQ_OK);
    assert_int_equal(mxq_model_run_layers(f->ctx, b, 2, f->cfg.n_layers, split, (int)f->n, (int)f->S, NULL, ws_b),
                     MXQ_OK);
    assert_memory_equal(whole, split, T * d * sizeof(float));
    free(split);
    free(whole);
    mxq_model_free(a);
    mxq_model_free(b);
    mxq_workspace_free(ws);
    mxq_workspace_free(ws_a);
    mxq_workspace_free(ws_b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_logits_match_transformers),
        cmocka_unit_test(test_nll_matches_reference_logits),
        cmocka_unit_test(test_split_layers_same_bits),
    };
    return cmocka_run_group_tests_name("model_reference", tests, setup, teardown);
}
