/* Pieces shared by the jobs (src/jobs/). Internal. */
#ifndef MXQ_JOBS_INTERNAL_H
#define MXQ_JOBS_INTERNAL_H

#include "io/fsutil.h"
#include "io/tokens.h"
#include "jobs/quantize_report.h"
#include "mxq/jobs.h"
#include "mxq/quantize.h"
#include "parallel/act_store.h"
#include "parallel/parallel.h"

/* Set-up steps local to a rank (the job agrees on them before its first
 * collective). */

/* config.json of model_dir, checked against the checkpoint's headers (unless
 * `weights_optional` and the directory holds no weights, as for a dry run
 * from a config alone). */
mxq_status mxq_job_config(mxq_ctx *ctx, const char *model_dir, int weights_optional, mxq_model_config *cfg);

/* The layer partition over `size` ranks: first[size + 1] (free() it). */
mxq_status mxq_job_partition(mxq_ctx *ctx, int size, const mxq_model_config *cfg, int **first);

/* The first calibration.samples sequences of calib_path, checked against the
 * recipe and the model (enough sequences, not longer than the context). */
mxq_status mxq_calibration_tokens(mxq_ctx *ctx, const char *calib_path, const mxq_recipe *recipe,
                                  const char *recipe_path, const mxq_model_config *cfg, mxq_tokens *tokens);

/* What a quantize job asks of calibration besides the results: layers an
 * earlier run already quantized (--resume), which are then neither
 * calibrated nor quantized again (their inputs are still run through them
 * in fp mode), and a record of each layer as soon as its owner has
 * quantized it (resume.c writes it durably). */
typedef struct {
    const unsigned char *done; /* [n_layers], 1: quantized by an earlier run; NULL: none */
    int start; /* a group's first layer; > 0: its inputs are read from the store (an earlier run's) */
    /* on the layer's owner, once `res` is final; L: the quantized layer */
    mxq_status (*record)(mxq_ctx *ctx, void *user, int layer, const mxq_layer *L, const mxq_layer_result *res);
    void *user;
} mxq_layer_hooks;

static inline int mxq_layer_done(const mxq_layer_hooks *hooks, int layer)
{
    return hooks && hooks->done && hooks->done[layer];
}

static inline mxq_status mxq_layer_hook_record(mxq_ctx *ctx, const mxq_layer_hooks *hooks, int layer, const mxq_layer *L,
                                               const mxq_layer_result *res)
{
    return hooks && hooks->record ? hooks->record(ctx, hooks->user, layer, L, res) : MXQ_OK;
}

/* Calibrate on `calib` (calib_name for messages) and quantize the layers of
 * `model` in memory. Collective over dist. results[i] for the model's
 * layer first_layer + i.
 * - data_parallel 0: the ranks form a pipeline; `model` is this rank's range of
 *   layers, and stats_layers > 0 bounds the layers whose statistics a rank
 *   holds at once in fp mode (more calibration passes, same result); 0 =
 *   all of them in one pass.
 * - data_parallel 1 (fp mode): one data-parallel group of all ranks
 *   (calibrate_group.c), where GPTQ of linears with grid_min_inputs inputs
 *   or more (> 0) runs on a ScaLAPACK grid of all ranks;
 *   `model` is every layer, loaded lazily; a rank quantizes the layers
 *   l % size == rank, and the other results keep layer = -1.
 * - data_parallel 1 (sequential mode): the same group, layer by layer, each
 *   layer's inputs spread over the ranks (calibrate_group_seq.c); a rank
 *   writes the layers l % size == rank, the other results keep layer = -1.
 * A group writes every layer's inputs to `store` (NULL: none; collective).
 * `hooks` (NULL: none): layers done before, and the record of each layer;
 * the sequential pipeline takes no done layers, the sequential group only
 * the layers before hooks->start. */
mxq_status mxq_quantize_model_in_memory(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *calib,
                                        const char *calib_name, const mxq_recipe *recipe, int batch, int data_parallel,
                                        int stats_layers, int grid_min_inputs, mxq_act_store *store,
                                        const mxq_layer_hooks *hooks, mxq_layer_result *results);

/* calibrate_group.c: fp calibration and quantization by one data-parallel
 * group of all ranks (see mxq_quantize_model_in_memory). */
mxq_status mxq_calibrate_group(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                               const mxq_recipe *recipe, int batch, int grid_min_inputs, mxq_act_store *store,
                               const mxq_layer_hooks *hooks, mxq_layer_result *results);

/* calibrate_group_spread.c: the fp group with every Hessian spread over the
 * ranks in block rows and every GPTQ on their grid, one layer at a time;
 * mxq_calibrate_group runs it when mxq_group_spread_applies: 2 ranks or
 * more, act_order off, every linear input whole lazy batches, and every
 * quantized linear's GPTQ on the grid (grid_min_inputs). */
int mxq_group_spread_applies(const mxq_recipe *recipe, const mxq_model_config *cfg, int size, int grid_min_inputs);
/* Rank 0 logs why a group whose every GPTQ goes to the grid keeps its
 * statistics whole (act_order, or an input not whole lazy batches). */
void mxq_group_log_why_whole(mxq_ctx *ctx, const mxq_dist *dist, const mxq_recipe *recipe,
                             const mxq_model_config *cfg, int grid_min_inputs);
mxq_status mxq_calibrate_group_spread(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                                      const mxq_recipe *recipe, int batch, mxq_act_store *store,
                                      const mxq_layer_hooks *hooks, mxq_layer_result *results);

/* group_common.c: a rank's share of the calibration sequences in a
 * data-parallel group, sequences [first, first + n) of the set, and their
 * activations at the current layer. */
typedef struct {
    int first, n;
    int batch, seq_len, hidden;
    float *acts; /* [n, seq_len, hidden] */
} mxq_calib_share;

/* This rank's share, embedded (the embedding is given back after), or with
 * `embed` 0 only allocated, for the store to fill. Local. */
mxq_status mxq_calib_share_create(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model, const mxq_tokens *tokens,
                                  int batch, int embed, mxq_calib_share *share);
/* The first layer a group runs (hooks->start; 0 without hooks). */
int mxq_group_first_layer(const mxq_layer_hooks *hooks);
/* The share's inputs of that layer, read from the store when it is past
 * the first. Collective. */
mxq_status mxq_calib_share_restart(mxq_ctx *ctx, const mxq_dist *dist, const mxq_layer_hooks *hooks,
                                   mxq_act_store *store, mxq_calib_share *share);
int mxq_calib_share_batches(const mxq_calib_share *share);
/* Micro-batch mb: its activations, and its n sequences. */
float *mxq_calib_share_batch(const mxq_calib_share *share, int mb, int *n);
void mxq_calib_share_free(mxq_calib_share *share);
/* Layer `layer` of a lazy model run on the share without statistics (a
 * layer done before: its FP outputs are the next one's inputs), then given
 * back; in workspace ws (NULL: one made for it). Local. */
mxq_status mxq_calib_share_skip_layer(mxq_ctx *ctx, mxq_model *model, mxq_calib_share *share, int layer,
                                      mxq_workspace *ws);

/* The progress lines of the layers just quantized (this rank's `layer`,
 * or -1), printed by rank 0; records: [size] on rank 0. Collective. */
mxq_status mxq_group_log_layers(mxq_ctx *ctx, const mxq_dist *dist, const mxq_model *model,
                                const mxq_layer_result *results, int layer, mxq_layer_record *records);

/* calibrate_group_seq.c: sequential calibration by one data-parallel group
 * of all ranks: every rank runs its share through each layer, the layer's
 * inputs are spread over the ranks for quantization (each input's
 * statistics summed onto the rank that searches its scales and quantizes
 * its linears; the scales go to every rank, which all fold them), the
 * quantized linears are broadcast, and every rank runs its share through
 * the quantized layer. Layer l is written by rank l % size. */
mxq_status mxq_calibrate_group_sequential(mxq_ctx *ctx, const mxq_dist *dist, mxq_model *model,
                                          const mxq_tokens *tokens, const mxq_recipe *recipe, int batch,
                                          mxq_act_store *store, const mxq_layer_hooks *hooks,
                                          mxq_layer_result *results);

/* A lazy model, after layer `layer` is quantized (res): of its float32
 * tensors only those the shard writes from the model stay (norms, biases
 * and unquantized weights that folded scales changed; the rest is packed in
 * the result or copied from the checkpoint), and its checkpoint pages are
 * given back. Nothing for an eager model. */
mxq_status mxq_layer_keep_written(mxq_ctx *ctx, mxq_model *model, int layer, const mxq_layer_result *res);
/* Free the n results of mxq_quantize_model_in_memory and the array itself. */
void mxq_layer_results_free(mxq_layer_result *results, int n);

#endif
