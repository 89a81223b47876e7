/* What mxq quantize reports: per-layer figures gathered on rank 0, the
 * summary table, mxq_report.json, config.json with its quantization_config,
 * the index, and the --dry-run plan. Internal. */
#ifndef MXQ_QUANTIZE_REPORT_H
#define MXQ_QUANTIZE_REPORT_H

#include <jansson.h>
#include <stdint.h>

#include "io/fsutil.h"
#include "mxq/quantize.h"
#include "parallel/parallel.h"

/* The phases of a layer's quantization, as the report times them. */
enum { MXQ_PHASE_SCALES, MXQ_PHASE_CLIP, MXQ_PHASE_GPTQ, MXQ_PHASE_PACK, MXQ_PHASE_LOSS, MXQ_PHASE_COUNT };

/* One layer's figures, as they travel to rank 0 (plain data). */
typedef struct {
    int layer, rank;
    double seconds_calib, seconds, peak_rss;
    double seconds_phase[MXQ_PHASE_COUNT]; /* of `seconds` */
    double awq_alpha[MXQ_INPUT_COUNT];    /* -1: none */
    double smooth_alpha[MXQ_INPUT_COUNT]; /* -1: none */
    struct {
        int quantized, dead_channels;
        double loss_rtn, loss, seconds;
    } linear[MXQ_LIN_COUNT];
} mxq_layer_record;

typedef struct {
    int size;                  /* ranks */
    char *gathered;            /* every rank's packed part, in rank order */
    size_t *lens;              /* [size] bytes of each part */
    mxq_layer_record *records; /* [n_records], in layer order */
    int n_records, capacity;
    double *peak_rss;          /* [size] bytes */
    double *predicted_rss;     /* [size] bytes, the --dry-run plan's (NULL: not known) */
    int group_size;            /* 1: a pipeline; else the data-parallel group's ranks (the bytes depend on it) */
    int grid_min_inputs;       /* group: GPTQ of linears of this many inputs or more on the grid; 0: none */
    json_t *weight_map;        /* tensor -> shard */
    json_t *shards;            /* shard -> {"sha256", "bytes"}, for the index */
    json_t *inputs;            /* borrowed: the job's inputs as --resume records them (job.json), for the report */
    uint64_t total_bytes;      /* tensor data of all shards */
    json_t *config, *report;
    mxq_output report_out, config_out, index; /* written, not yet renamed into place */
} mxq_quantize_report;

/* One layer's figures as recorded; its loss sums over the quantized
 * linears; its AWQ / SmoothQuant alphas as "awq[attn_in]=0.50 ..." ("" if none). */
void mxq_layer_record_of(const mxq_layer_result *result, int rank, mxq_layer_record *rec);
/* The figures of a record back into a result (no tensors: those stay in the
 * record a resumed run takes them from). */
void mxq_layer_result_of_record(const mxq_layer_record *rec, mxq_layer_result *result);
void mxq_layer_record_losses(const mxq_layer_record *rec, double *rtn, double *loss);
void mxq_layer_record_alphas(const mxq_layer_record *rec, char *text, size_t size);
/* The layer's progress line (rank 0 prints). */
void mxq_layer_record_log(mxq_ctx *ctx, int n_layers, const mxq_layer_record *rec);

/* A shard as the index records it. */
typedef struct {
    uint64_t data_bytes, file_bytes;
    char sha256[65];
} mxq_shard_digest;

/* This rank's layer figures (results with layer -1 are skipped), tensor
 * names and shard's sizes and checksum as plain bytes (free() *out). Local. */
mxq_status mxq_quantize_report_pack(mxq_ctx *ctx, int rank, const mxq_layer_result *results, int n_local,
                                    char *const *names, size_t n_names, const mxq_shard_digest *shard, char **out,
                                    size_t *len);

/* Collective: every rank's packed part to rank 0 (into `report`). */
mxq_status mxq_quantize_report_gather(mxq_ctx *ctx, const mxq_dist *dist, mxq_quantize_report *report,
                                      const char *packed, size_t len);

/* Rank 0, local: the gathered parts unpacked, config.json (the input's +
 * quantization_config), the report, and the summary table (mxq_print).
 * seconds: quantize, write, total. */
mxq_status mxq_quantize_report_build(mxq_ctx *ctx, mxq_quantize_report *report, const mxq_recipe *recipe,
                                     const mxq_model_config *cfg, const char *model_dir, const char *calib_path,
                                     const char *recipe_path, const double *seconds);

/* Rank 0, before the commit: the report, config.json and the index under
 * their temporary names, so that the commit itself only renames. */
mxq_status mxq_quantize_report_stage(mxq_ctx *ctx, mxq_quantize_report *report, const char *out_dir,
                                     const mxq_input_set *inputs);
/* Rank 0, in the commit after the shards: the report and config.json into
 * place (the index the caller renames last: report->index). */
mxq_status mxq_quantize_report_commit(mxq_ctx *ctx, mxq_quantize_report *report);
/* Removes whatever is still staged. */
void mxq_quantize_report_abort(mxq_quantize_report *report);

void mxq_quantize_report_free(mxq_quantize_report *report);

/* The memory plan of one rank, in bytes (double: plans of any size). */
typedef struct {
    double weights, stats, work, quant, base;
    double load;  /* what loading (or embedding) alone holds */
    double total; /* the predicted peak RSS */
} mxq_rank_plan;

/* What the process holds besides the plan's arrays: MPI, OpenBLAS and the
 * other libraries (the whole bundled-model run peaks at 34 MB a rank). */
#define MXQ_PLAN_BASE_BYTES (32.0 * 1048576.0)

/* What a plan is made from. */
typedef struct {
    const mxq_model_config *cfg;
    const mxq_recipe *recipe;
    const int *first; /* [size + 1]: the pipeline's layer ranges */
    int size;         /* ranks */
    int data_parallel; /* 0: a pipeline; 1: one data-parallel group of all ranks */
    int batch, seq_len, samples, stats_layers;
    int grid_min_inputs; /* group: GPTQ of linears with this many inputs or more on the grid (0: never) */
} mxq_plan_input;

void mxq_quantize_plan_rank(const mxq_plan_input *in, int rank, mxq_rank_plan *plan);

/* --dry-run: who owns which layers and the predicted memory per rank, next
 * to the memory a rank has (budget, bytes; 0 = unknown). */
void mxq_quantize_print_plan(mxq_ctx *ctx, const mxq_plan_input *in, double budget);
/* The same plan for scripts: {"layout", "mem_per_rank_bytes", "ranks": [{"rank",
 * "group", "layers": [first, end], "peak_bytes"}]}. NULL when out of memory. */
json_t *mxq_quantize_plan_json(const mxq_plan_input *in, double budget);

#endif
