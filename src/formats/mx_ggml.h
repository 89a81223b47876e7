/* MX rows as ggml's blocks of 32, exactly. Internal.
 *
 * A block of an MX row (block 32, or 64, 128, ... cut into pieces of 32 that
 * repeat its scale) maps onto one ggml block:
 *   MXINT4/3/2 -> Q4_0: f16 d = 2^(se - mbits), nibbles q = k + 8 (element j
 *                 in the low nibble of byte j, element j + 16 in the high one);
 *   MXINT8     -> Q8_0: f16 d = 2^(se - 6), int8 q = k;
 *   MXFP4      -> MXFP4: the same E8M0 byte, the same E2M1 codes, Q4_0's
 *                 nibble order;
 *   any format -> BF16: every MX value is a BF16 value.
 * Codes are the unpacked element codes of a row (mxq_mx_unpack_row), scales
 * its E8M0 bytes. The Q4_0 and Q8_0 converters return 0 when a block's d is
 * outside f16 (normal or subnormal) or its scale is NaN, which the caller
 * answers with BF16 (which keeps NaN). */
#ifndef MXQ_MX_GGML_H
#define MXQ_MX_GGML_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/mx.h"

#define MXQ_GGML_BLOCK 32

/* The ggml tensor types mxq writes (their numbers are GGUF's). */
typedef enum {
    MXQ_GGML_F32 = 0,
    MXQ_GGML_F16 = 1,
    MXQ_GGML_Q4_0 = 2,
    MXQ_GGML_Q8_0 = 8,
    MXQ_GGML_BF16 = 30,
    MXQ_GGML_MXFP4 = 39,
} mxq_ggml_type;

/* Bytes of one row of `n` elements of a ggml type (n a multiple of the
 * type's block of 32 for the block types), or 0 if it is not. */
size_t mxq_ggml_row_bytes(mxq_ggml_type type, int64_t n);
const char *mxq_ggml_type_name(mxq_ggml_type type);

/* 1 if the 32 codes of a block with shared exponent `se` can be a ggml
 * block: its scale is not NaN (E8M0 0xFF, se 128), and for Q4_0/Q8_0 its
 * d = 2^(se - mbits) is an f16 value or every code is 0 (then any d is
 * exact; MX gives an all-zero block the smallest scale). */
int mxq_mx_ggml_block_fits(const mxq_format *format, const uint8_t *codes, int se);

/* 1 if rows of `cols` in MX blocks of `block` map onto ggml blocks of 32. */
int mxq_mx_ggml_blocks_fit(size_t cols, int block);

/* out: cols / 32 blocks, mxq_ggml_row_bytes(type, cols) bytes. */
int mxq_mx_row_to_q4_0(const mxq_format *format, const uint8_t *codes, const uint8_t *scales, size_t cols, int block,
                       uint8_t *out);
int mxq_mx_row_to_q8_0(const mxq_format *format, const uint8_t *codes, const uint8_t *scales, size_t cols, int block,
                       uint8_t *out);
/* 0 if a block's scale is NaN (ggml would read E8M0 0xFF as infinity) */
int mxq_mx_row_to_mxfp4(const uint8_t *codes, const uint8_t *scales, size_t cols, int block, uint8_t *out);
/* out: cols BF16 values; returns 0 if one is not exact (an FP8 value at a
 * scale near 2^-127 can be below BF16's smallest subnormal). */
int mxq_mx_row_to_bf16(const mxq_format *format, const uint8_t *codes, const uint8_t *scales, size_t cols, int block,
                        uint16_t *out);

#endif
