/* The jobs of the mxq tool, as library calls: evaluation and quantization of
 * a whole model over MPI ranks, and the single-process research verbs cast
 * and quantize-linear. Each checks its inputs and outputs before any work,
 * writes outputs under temporary names renamed into place when complete,
 * and never replaces an input, a device or a file it did not write. */
#ifndef MXQ_JOBS_H
#define MXQ_JOBS_H

#include <mpi.h>
#include <stddef.h>

#include "mxq/core.h"
#include "mxq/model.h"
#include "mxq/mx.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- mxq eval ------------------------------------------------------------ */

typedef struct {
    int batch;            /* sequences per micro-batch (default 8) */
    int limit;            /* evaluate the first `limit` sequences; 0 = all */
    mxq_fake_quant quant; /* optional fake quantization */
    /* Optional: quantize in memory with this recipe, calibrated on
     * calib_path, before evaluating (what mxq quantize would write). */
    const char *recipe_path;
    const char *calib_path;
    /* Optional: a JSON report (ppl, mean_nll, ...), written by rank 0 and
     * checked before any work. */
    const char *json_path;
} mxq_eval_options;

typedef struct {
    double mean_nll;
    double ppl;
    size_t tokens_scored;
    int sequences;
    int seq_len;
    double seconds;      /* pipeline wall time (after loading) */
    double load_seconds; /* config, weights and tokens */
    double tokens_per_s; /* tokens pushed through the model per second */
    int ranks;
    int acts_quantized; /* activations were MX-quantized (flag, recipe or checkpoint) */
    mxq_mx_spec acts;
} mxq_eval_result;

/* Perplexity of the model in model_dir on tokens_path: exp of the mean NLL of
 * token t+1 given 0..t over every position of every sequence. Collective
 * over `comm`; every rank returns the same result. A non-finite NLL is an
 * error naming the first sequence that produced one. */
mxq_status mxq_eval_perplexity(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *tokens_path,
                               const mxq_eval_options *options, mxq_eval_result *result);

/* ---- mxq quantize -------------------------------------------------------- */

typedef struct {
    int batch;        /* calibration sequences per micro-batch (default 8) */
    int force;        /* replace an earlier mxq run's files in out_dir */
    int dry_run;      /* print the plan only; writes nothing */
    int stats_layers; /* pipeline, fp mode: at most this many layers' statistics per rank at once (0 = all) */
    int group_size;   /* 1: ranks form a pipeline of layer ranges; the rank count (> 1): one
                         data-parallel group; 0: the pipeline if its plan stays under 90% of
                         the memory a rank has, else one data-parallel group (also of a single rank) */
    double mem_per_rank;   /* bytes a rank may use; 0: the node's memory (or cgroup limit) over its ranks */
    int grid_min_inputs;   /* group size > 1, fp mode: GPTQ of a linear with at least this many inputs (and a
                              whole number of lazy batches) runs on a ScaLAPACK grid of all the group's
                              ranks; 0: automatic, the linears whose GPTQ on one rank would take more
                              than a quarter of a rank's memory; < 0: never */
    const char *plan_json; /* with dry_run: also write the plan here as JSON (NULL: no) */
    const char *store_activations; /* every layer's calibration inputs to this parallel-HDF5 file,
                                      written by a data-parallel group (implied; NULL: no store) */
    int resume; /* continue the unfinished run in out_dir (fp calibration): its recorded layers are taken
                   as they are, the others quantized; the same bytes as an uninterrupted run */
} mxq_quantize_options;

/* Read model_dir, calibrate on calib_path, apply the recipe, write the MX
 * checkpoint to out_dir. Collective over comm. */
mxq_status mxq_quantize(mxq_ctx *ctx, MPI_Comm comm, const char *model_dir, const char *calib_path,
                        const char *recipe_path, const char *out_dir, const mxq_quantize_options *options);

/* ---- mxq cast -------------------------------------------------------------- */

/* MX-quantize the 2-D float32 dataset `in_dataset` of in_path row by row and
 * write out_path: /output (dequantized float32), /scale_e8m0 (uint8),
 * /packed (uint8) and the attributes format, block, rounding, source. */
mxq_status mxq_cast_file(mxq_ctx *ctx, const mxq_mx_spec *spec, const char *in_path, const char *in_dataset,
                         const char *out_path);

/* ---- mxq quantize-linear ------------------------------------------------- */

/* One linear through a recipe's weight algorithms, by the code a decoder
 * layer uses for a linear of that role (an mxq_linear_id, or -1 for none:
 * every step applies): in_path holds /W float32 [out, in] and /X float32
 * [tokens, in] (its calibration inputs) or /H float64 [in, in] (their Gram
 * matrix); out_path receives /Q float32 [out, in] and the attributes
 * loss_rtn, loss, format, block, rounding, algorithms. Non-finite inputs are
 * refused, naming the dataset and index. */
mxq_status mxq_quantize_linear_file(mxq_ctx *ctx, const char *recipe_path, int role, const char *in_path,
                                    const char *out_path);

/* ---- mxq verify ---------------------------------------------------------- */

typedef struct {
    int shards;      /* shard files found */
    int checksummed; /* of which the index records size and SHA-256 (mxq's checkpoints: all) */
    uint64_t bytes;  /* their size */
    int layers;      /* decoder layers loaded and checked */
    int mx;          /* an mxq MX checkpoint (quantization_config) */
} mxq_verify_result;

/* Whether the checkpoint in `dir` is whole and valid: every shard the index
 * names exists with the size and SHA-256 the index records (mxq's
 * checkpoints record them), config.json is readable (known format_version
 * and formats) and matches the tensors' headers, and every tensor loads as
 * mxq eval loads it: shapes, valid element codes, scale bytes mxq writes,
 * finite values. Fails naming the first problem. Local (one process). */
mxq_status mxq_verify(mxq_ctx *ctx, const char *dir, mxq_verify_result *result);

/* ---- mxq inspect ---------------------------------------------------------- */

/* A checkpoint described for a person, printed to the context's output
 * stream: the model; the recipe (formats, algorithms, calibration); size on
 * disk against the FP model and bits per weight; and, from mxq_report.json,
 * the run's ranks, times and memory and each layer's losses. Reads
 * config.json, mxq_report.json and the tensors' headers only. Local. */
mxq_status mxq_inspect(mxq_ctx *ctx, const char *dir);

/* ---- mxq export --to gguf ------------------------------------------------ */

typedef struct {
    const char *tokenizer;  /* llama2.c tokenizer.bin; NULL: beside the checkpoint or its source model */
    const char *vocab_from; /* a GGUF of the same model whose tokenizer.* keys are copied (instead) */
} mxq_export_options;

typedef struct {
    int tensors;             /* written */
    int quantized;           /* MX linears written as Q4_0, Q8_0 or MXFP4 */
    int mx_bf16;             /* MX linears written as BF16 (MXFP6/MXFP8, and the fallbacks) */
    int bf16_fallbacks;      /* of which no block type could hold them exactly */
    int activations_dropped; /* the checkpoint quantizes activations, which GGUF does not carry */
    uint64_t bytes;          /* of the file */
} mxq_export_result;

/* The checkpoint in `dir` (an mxq MX checkpoint, or an FP Hugging Face one
 * of the llama architecture) as a GGUF v3 file at `out_path` that
 * llama.cpp loads, every weight value unchanged. Local (one process). */
mxq_status mxq_export_gguf(mxq_ctx *ctx, const char *dir, const char *out_path, const mxq_export_options *opt,
                           mxq_export_result *res);

#ifdef __cplusplus
}
#endif

#endif
