/* Internal interface between the MX dispatcher and its kernels. */
#ifndef MXQ_MX_KERNELS_H
#define MXQ_MX_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/mx.h"

int mxq_cpu_has_avx512(void);

/* Both kernels share this signature and contract (see mxq_mx_quantize_rows);
 * `codes` is scratch for one row of element codes, `cols` bytes. */
typedef void (*mxq_mx_rows_kernel)(const mxq_format *format, int block, mxq_rounding rounding,
                                    const float *in, size_t rows, size_t cols, uint8_t *packed,
                                    uint8_t *scales, float *dequant, uint8_t *codes);

void mxq_mx_quantize_rows_reference(const mxq_format *format, int block, mxq_rounding rounding,
                                    const float *in, size_t rows, size_t cols, uint8_t *packed,
                                    uint8_t *scales, float *dequant, uint8_t *codes);

void mxq_mx_quantize_rows_avx512(const mxq_format *format, int block, mxq_rounding rounding,
                                 const float *in, size_t rows, size_t cols, uint8_t *packed,
                                 uint8_t *scales, float *dequant, uint8_t *codes);

#endif
