/* Parts of the calibration statistics for jobs that gather the Hessian
 * elsewhere (spread over ranks). Internal. */
#ifndef MXQ_ALGO_CALIB_STATS_H
#define MXQ_ALGO_CALIB_STATS_H

#include "mxq/quantize.h"

/* max|x|, sum|x| and the token count of x [tokens, features] only (s may
 * have no hessian). */
void mxq_input_stats_add_abs(mxq_input_stats *s, const float *x, size_t tokens);

#endif
