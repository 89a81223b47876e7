/* Quantization recipes (YAML). The schema is fixed because users and scripts
 * write it:
 *
 *   weights:     {format: mxint4, block: 128, rounding: even}   # or none
 *   activations: {format: mxint8, block: 128}                   # or none
 *   algorithms:                                                 # in order; [] = round-to-nearest
 *     - smoothquant: {alpha: 0.5}
 *     - awq:  {grid: 20, clip: true, clip_grid: 20, max_shrink: 0.5, sample_rows: 128}
 *     - gptq: {block: 128, microblock: 128, damp: 0.01, act_order: false}
 *   calibration: {samples: 128, mode: fp}                       # fp | sequential
 *   exclude: []                                                 # tensor-name patterns
 *
 * activations, calibration, exclude and every key of an algorithm may be
 * left out. Errors give the file and line. */
#ifndef MXQ_RECIPE_H
#define MXQ_RECIPE_H

#include "mxq/core.h"
#include "mxq/gptq.h"
#include "mxq/mx.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MXQ_ALGO_SMOOTHQUANT = 0, MXQ_ALGO_AWQ, MXQ_ALGO_GPTQ } mxq_algo_kind;

typedef struct {
    double alpha; /* migration strength, default 0.5 */
} mxq_smoothquant_options;

typedef struct {
    int grid;          /* alpha grid points over [0, 1), default 20 */
    int clip;          /* clipping search, default true */
    int clip_grid;     /* shrink steps, default 20 */
    double max_shrink; /* largest shrink of the block max, default 0.5 */
    int sample_rows;   /* the scale search evaluates every (out / sample_rows)-th row of
                          a linear with at least 2 * sample_rows rows; 0: every row.
                          Default 128 */
} mxq_awq_options;

typedef struct {
    mxq_algo_kind kind;
    mxq_smoothquant_options smoothquant;
    mxq_awq_options awq;
    mxq_gptq_options gptq;
} mxq_algo_step;

typedef enum { MXQ_CALIB_FP = 0, MXQ_CALIB_SEQUENTIAL } mxq_calib_mode;

#define MXQ_RECIPE_MAX_STEPS 3
#define MXQ_RECIPE_MAX_EXCLUDE 64

typedef struct mxq_recipe_s {
    int has_weights;
    mxq_mx_spec weights;
    int has_acts;
    mxq_mx_spec acts;
    int n_steps;
    mxq_algo_step steps[MXQ_RECIPE_MAX_STEPS];
    int calib_samples;
    mxq_calib_mode calib_mode;
    int n_exclude;
    char *exclude[MXQ_RECIPE_MAX_EXCLUDE]; /* fnmatch(3) patterns */
} mxq_recipe;

const char *mxq_algo_name(mxq_algo_kind kind);

mxq_status mxq_recipe_load(mxq_ctx *ctx, const char *path, mxq_recipe *recipe);
mxq_status mxq_recipe_parse_string(mxq_ctx *ctx, const char *text, const char *name_for_messages, mxq_recipe *recipe);
void mxq_recipe_free(mxq_recipe *recipe);

/* 1 if `tensor_name` matches an exclude pattern. */
int mxq_recipe_excludes(const mxq_recipe *recipe, const char *tensor_name);

#ifdef __cplusplus
}
#endif

#endif
