/* mxq eval: perplexity over an MPI pipeline.
 *
 * The pipeline itself is in src/parallel/pipeline.c. The last rank turns
 * hidden states into per-sequence negative log-likelihoods; their sum is
 * taken in sequence order, so the result is the same bits for any number of
 * ranks. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/jobs_internal.h"
#include "model/lazy.h"
#include "parallel/pipeline.h"

typedef struct {
    mxq_model *model; /* a lazy model's layers are converted as micro-batches reach them */
    const mxq_tokens *tokens;
    const mxq_fake_quant *quant;
    mxq_workspace *ws;
    double *nll; /* [n_seqs], on the last rank */
} eval_stage;

/* This rank's stage on micro-batch mb, in place on buf. */
static mxq_status run_stage(mxq_ctx *ctx, void *user, int mb, int first_seq, int n, float *buf)
{
    mxq_status status = MXQ_OK;
    eval_stage *e = user;
    mxq_model *m = e->model;
    int S = e->tokens->seq_len;
    const int32_t *ids = e->tokens->ids + (size_t)first_seq * S;
    if (m->has_embedding)
        CALL(ctx, mxq_model_embed(ctx, m, ids, n, S, buf));
    if (!m->ckpt)
        CALL(ctx, mxq_model_run_layers(ctx, m, m->first_layer, m->last_layer, buf, n, S, e->quant, e->ws));
    /* a lazy model: one layer in float32 at a time (a 7B model's 16 layers
     * on a rank are 13 GB in float32), converted again for every micro-batch */
    for (int l = m->first_layer; m->ckpt && l < m->last_layer; l++) {
        CALL(ctx, mxq_model_layer_load(ctx, m, l));
        CALL(ctx, mxq_model_run_layers(ctx, m, l, l + 1, buf, n, S, e->quant, e->ws));
        CALL(ctx, mxq_model_layer_unload(ctx, m, l));
    }
    if (m->has_head)
        CALL(ctx, mxq_model_sequence_nll(ctx, m, buf, ids, n, S, e->nll + first_seq, e->ws));
fail:
    return status;
}

/* Everything one evaluation holds. */
typedef struct {
    mxq_dist dist;
    const char *model_dir, *tokens_path;
    const mxq_eval_options *options;
    mxq_input_set inputs;
    mxq_output json_out; /* rank 0, with options->json_path */
    mxq_recipe recipe;
    int have_recipe;
    mxq_model_config cfg;
    mxq_fake_quant quant;
    int *first;
    mxq_model *model;
    mxq_tokens tokens, calib;
    mxq_layer_result *results; /* --recipe: one per local layer */
    mxq_pipeline p;
    eval_stage e;
    double mem_per_rank; /* bytes, mxq_memory_per_rank */
} eval_job;

static void eval_job_free(eval_job *j)
{
    free(j->p.buf[0]);
    free(j->p.buf[1]);
    free(j->e.nll);
    mxq_workspace_free(j->e.ws);
    mxq_tokens_free(&j->tokens);
    mxq_tokens_free(&j->calib);
    mxq_layer_results_free(j->results, j->model ? j->model->last_layer - j->model->first_layer : 0);
    mxq_model_free(j->model);
    free(j->first);
    if (j->have_recipe)
        mxq_recipe_free(&j->recipe);
    mxq_output_abort(&j->json_out);
    mxq_input_set_free(&j->inputs);
    mxq_dist_free(&j->dist);
}

/* The job's inputs, and its JSON output checked against them before any
 * work (rank 0 writes it). */
static mxq_status open_outputs(mxq_ctx *ctx, eval_job *j)
{
    mxq_status status = MXQ_OK;
    const mxq_eval_options *o = j->options;
    CALL(ctx, mxq_input_set_add_model(ctx, &j->inputs, j->model_dir));
    CALL(ctx, mxq_input_set_add(ctx, &j->inputs, j->tokens_path, "the token file"));
    CALL(ctx, mxq_input_set_add(ctx, &j->inputs, o->recipe_path, "the recipe"));
    CALL(ctx, mxq_input_set_add(ctx, &j->inputs, o->calib_path, "the calibration file"));
    if (o->json_path && j->dist.rank == 0) {
        CALL_IN(ctx,
                mxq_output_begin_ours(ctx, o->json_path, &j->inputs, mxq_json_file_is_ours, MXQ_VERSION_MARK " key",
                                      &j->json_out),
                "--json");
    }
fail:
    return status;
}

/* Activations: --acts, else what the checkpoint or the recipe says. */
static void choose_acts(eval_job *j)
{
    j->quant = j->options->quant;
    if (j->cfg.mx_acts && !j->quant.enabled_acts) {
        j->quant.enabled_acts = 1;
        j->quant.acts = j->cfg.mx_act_spec;
    }
    if (j->have_recipe && j->recipe.has_acts && !j->options->quant.enabled_acts) {
        j->quant.enabled_acts = 1;
        j->quant.acts = j->recipe.acts;
    }
}

/* --recipe: calibrate and quantize this rank's layers in memory
 * (collective). */
static mxq_status quantize_in_memory(mxq_ctx *ctx, eval_job *j)
{
    return mxq_quantize_model_in_memory(ctx, &j->dist, j->model, &j->calib, j->options->calib_path, &j->recipe,
                                        j->options->batch, 0, 0, 0, NULL, NULL, j->results);
}

static mxq_status load_model(mxq_ctx *ctx, eval_job *j)
{
    mxq_status status = MXQ_OK;
    const mxq_eval_options *o = j->options;
    const int rank = j->dist.rank, size = j->dist.size;
    if (o->recipe_path) {
        CALL(ctx, mxq_recipe_load(ctx, o->recipe_path, &j->recipe));
        j->have_recipe = 1;
    }
    CALL(ctx, mxq_job_config(ctx, j->model_dir, 0, &j->cfg));
    CHECK(ctx, !j->cfg.mx_weights || !(o->quant.enabled_weights || o->recipe_path), MXQ_ERR_ARG,
          "'%s' is already quantized (%s weights); --weights and --recipe apply to unquantized models", j->model_dir,
          j->cfg.mx_weights ? j->cfg.mx_weight_spec.format->name : "");
    choose_acts(j);
    CALL(ctx, mxq_job_partition(ctx, size, &j->cfg, &j->first));
    mxq_model_part part = {j->first[rank], j->first[rank + 1], rank == 0, rank == size - 1};
    /* Layers too big to hold in float32 (half of what a rank has) are
     * converted as each micro-batch reaches them, unless they are changed
     * first (--recipe, --weights): a few % of the forward's time. */
    const double layers_f32 =
        (double)(part.last_layer - part.first_layer) * (double)mxq_config_layer_params(&j->cfg) * sizeof(float);
    const int lazy = !o->recipe_path && !j->quant.enabled_weights && j->mem_per_rank > 0 &&
                     layers_f32 > 0.5 * j->mem_per_rank;
    mxq_log(ctx, MXQ_LOG_DEBUG, "rank %d owns layers [%d, %d)%s%s%s", rank, part.first_layer, part.last_layer,
            part.embedding ? " + embedding" : "", part.head ? " + norm/lm_head" : "",
            lazy ? ", converted as they run" : "");
    if (lazy)
        CALL(ctx, mxq_model_load_lazy(ctx, j->model_dir, &j->cfg, &part, 1, 0, &j->model));
    else
        CALL(ctx, mxq_model_load(ctx, j->model_dir, &j->cfg, &part, &j->model));
    if (j->quant.enabled_weights)
        CALL(ctx, mxq_model_fake_quantize_weights(ctx, j->model, &j->quant.weights));
    if (j->have_recipe) {
        CALL(ctx, mxq_calibration_tokens(ctx, o->calib_path, &j->recipe, o->recipe_path, &j->cfg, &j->calib));
        j->results = calloc((size_t)(part.last_layer - part.first_layer) + 1, sizeof(*j->results));
        CHECK_ALLOC(ctx, j->results, sizeof(*j->results), "the layer results");
    }
fail:
    return status;
}

static mxq_status read_tokens(mxq_ctx *ctx, eval_job *j)
{
    mxq_status status = MXQ_OK;
    const mxq_eval_options *o = j->options;
    CALL(ctx, mxq_tokens_read(ctx, j->tokens_path, "token file", o->limit, j->cfg.vocab, j->cfg.max_positions,
                              &j->tokens));
    if (o->limit > j->tokens.total_seqs && j->dist.rank == 0) /* every rank reads the same file */
        mxq_log(ctx, MXQ_LOG_WARN, "--limit %d exceeds the %d sequences in '%s'; evaluating all of them", o->limit,
                j->tokens.total_seqs, j->tokens_path);
fail:
    return status;
}

/* The pipeline's buffers on this rank (agreed by the caller). */
static mxq_status pipeline_setup(mxq_ctx *ctx, eval_job *j)
{
    mxq_status status = MXQ_OK;
    int batch = j->options->batch > 0 ? j->options->batch : 8;
    batch = batch > j->tokens.n_seqs ? j->tokens.n_seqs : batch;
    j->e = (eval_stage){j->model, &j->tokens, &j->quant, NULL, NULL};
    j->p = (mxq_pipeline){&j->dist, j->tokens.n_seqs, j->tokens.seq_len, j->cfg.hidden, batch,
                          (j->tokens.n_seqs + batch - 1) / batch, "eval", "eval.pipeline.midway", run_stage, &j->e,
                          {NULL, NULL}};
    size_t buf_floats = (size_t)batch * j->tokens.seq_len * j->cfg.hidden;
    CALL(ctx, mxq_workspace_create(ctx, &j->cfg, batch, j->tokens.seq_len, &j->e.ws));
    j->p.buf[0] = malloc(buf_floats * sizeof(float));
    j->p.buf[1] = malloc(buf_floats * sizeof(float));
    j->e.nll = calloc((size_t)j->tokens.n_seqs, sizeof(double));
    CHECK_ALLOC(ctx, j->p.buf[0] && j->p.buf[1] && j->e.nll, 2 * buf_floats * sizeof(float), "the pipeline buffers");
fail:
    return status;
}

/* Everything before the first collective, local to this rank: outputs,
 * recipe, config against checkpoint, weights, tokens, buffers. */
static mxq_status setup(mxq_ctx *ctx, eval_job *j)
{
    mxq_status status = MXQ_OK;
    CALL(ctx, open_outputs(ctx, j));
    CALL(ctx, load_model(ctx, j));
    CALL(ctx, read_tokens(ctx, j));
    CALL(ctx, pipeline_setup(ctx, j));
fail:
    return status;
}

/* Sum of the NLLs in sequence order on the last rank, shared with every
 * rank with the first sequence whose NLL is not finite (-1 if none). */
static mxq_status gather_result(mxq_ctx *ctx, eval_job *j, double seconds, mxq_eval_result *r)
{
    mxq_status status = MXQ_OK;
    const int size = j->dist.size;
    double totals[3] = {0, 0, -1}; /* NLL sum, tokens scored, first bad sequence */
    for (int s = 0; j->dist.rank == size - 1 && s < j->tokens.n_seqs; s++) {
        totals[0] += j->e.nll[s];
        if (!isfinite(j->e.nll[s]) && totals[2] < 0)
            totals[2] = s;
    }
    totals[1] = (double)j->tokens.n_seqs * (j->tokens.seq_len - 1);
    CALL_MPI(ctx, j->dist.comm, MPI_Bcast(totals, 3, MPI_DOUBLE, size - 1, j->dist.comm));
    CHECK_AGREED(ctx, &j->dist, "eval.result", totals[2] < 0, MXQ_ERR_FORMAT,
                 "sequence %.0f of '%s' gives a non-finite negative log-likelihood: the model's activations overflow "
                 "float32 (perplexity undefined)",
                 totals[2], j->tokens_path);
    r->tokens_scored = (size_t)totals[1];
    r->mean_nll = totals[0] / totals[1];
    r->ppl = exp(r->mean_nll);
    r->sequences = j->tokens.n_seqs;
    r->seq_len = j->tokens.seq_len;
    r->seconds = seconds;
    r->tokens_per_s = (double)j->tokens.n_seqs * j->tokens.seq_len / seconds;
    r->ranks = size;
    r->acts_quantized = j->quant.enabled_acts;
    if (j->quant.enabled_acts)
        r->acts = j->quant.acts;
fail:
    return status;
}

static json_t *result_json(const eval_job *j, const mxq_eval_result *r, int *ok)
{
    const mxq_eval_options *o = j->options;
    json_t *root = json_pack("{s:s, s:f, s:f, s:I, s:f, s:f, s:f, s:i, s:i, s:i, s:s, s:s}", MXQ_VERSION_MARK,
                             MXQ_VERSION, "ppl", r->ppl, "mean_nll",
                             r->mean_nll, "tokens_scored", (json_int_t)r->tokens_scored, "seconds", r->seconds,
                             "tokens_per_s", r->tokens_per_s, "load_seconds", r->load_seconds, "sequences",
                             r->sequences, "seq_len", r->seq_len, "ranks", r->ranks, "model", j->model_dir, "tokens",
                             j->tokens_path);
    *ok = root != NULL;
    if (!root || !(o->quant.enabled_weights || r->acts_quantized || o->recipe_path))
        return root;
    json_t *q = json_object();
    if (o->quant.enabled_weights)
        mxq_json_put(q, "weights", json_string(o->quant.weights.format->name), ok);
    if (r->acts_quantized)
        mxq_json_put(q, "activations", json_string(r->acts.format->name), ok);
    const mxq_mx_spec *spec = o->quant.enabled_weights ? &o->quant.weights : &r->acts;
    if (o->quant.enabled_weights || r->acts_quantized) {
        mxq_json_put(q, "block", json_integer(spec->block), ok);
        mxq_json_put(q, "rounding", json_string(mxq_rounding_name(spec->rounding)), ok);
    }
    if (o->recipe_path) {
        mxq_json_put(q, "recipe", json_string(o->recipe_path), ok);
        mxq_json_put(q, "calibration", json_string(o->calib_path), ok);
    }
    mxq_json_put(root, "fake_quant", q, ok);
    return root;
}

static mxq_status write_json(mxq_ctx *ctx, eval_job *j, const mxq_eval_result *r)
{
    mxq_status status = MXQ_OK;
    char *text = NULL;
    int ok = 1;
    json_t *root = result_json(j, r, &ok);
    CHECK(ctx, ok, MXQ_ERR_NOMEM, "out of memory building the JSON report");
    text = json_dumps(root, JSON_INDENT(2) | JSON_REAL_PRECISION(17));
    CHECK_ALLOC(ctx, text, 1, "the JSON report");
    CALL(ctx, mxq_output_write(ctx, &j->json_out, text, strlen(text)));
fail:
    free(text);
    json_decref(root);
    return status;
}

mxq_status mxq_eval_perplexity(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *tokens_path,
                               const mxq_eval_options *options, mxq_eval_result *result)
{
    mxq_status status = MXQ_OK;
    eval_job j = {.dist = {.comm = MPI_COMM_NULL}, .json_out = {.fd = -1}};
    j.model_dir = model_dir;
    j.tokens_path = tokens_path;
    j.options = options;
    memset(result, 0, sizeof(*result));
    CALL(ctx, mxq_dist_create(ctx, comm, &j.dist));
    CALL(ctx, mxq_memory_per_rank(ctx, &j.dist, &j.mem_per_rank));
    double t_load = mxq_time_now();
    AGREE(ctx, &j.dist, "eval.setup", setup(ctx, &j));
    if (j.have_recipe)
        CALL(ctx, quantize_in_memory(ctx, &j));
    result->load_seconds = mxq_time_now() - t_load;
    if (j.dist.rank == 0) /* also when every rank logs its layers (--recipe) */
        mxq_log(ctx, MXQ_LOG_INFO,
                "eval: %s (%s, %d layers, d=%d) on %d rank%s; %d sequences of %d tokens, micro-batch %d", model_dir,
                mxq_arch_name(j.cfg.arch), j.cfg.n_layers, j.cfg.hidden, j.dist.size, j.dist.size == 1 ? "" : "s",
                j.tokens.n_seqs, j.tokens.seq_len, j.p.batch);
    double t0 = mxq_time_now();
    AGREE(ctx, &j.dist, "eval.pipeline", mxq_pipeline_run(ctx, &j.p));
    CALL(ctx, gather_result(ctx, &j, mxq_time_now() - t0, result));
    if (options->json_path) {
        AGREE(ctx, &j.dist, "eval.json", j.dist.rank == 0 ? write_json(ctx, &j, result) : MXQ_OK);
        /* the commit point: nothing is left that could fail elsewhere */
        AGREE(ctx, &j.dist, NULL, j.dist.rank == 0 ? mxq_output_commit(ctx, &j.json_out) : MXQ_OK);
    }
fail:
    eval_job_free(&j);
    return status;
}
