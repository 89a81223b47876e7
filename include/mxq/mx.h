/* Microscaling (MX) formats: OCP MX v1.0 element formats with an E8M0 scale
 * shared by each block of `block` consecutive elements along a row.
 *
 * A row of `cols` values is cut into ceil(cols / block) blocks; the last one
 * may be partial. Each block gets a shared exponent
 *     se = floor(log2(max |v|)) - emax          (all-zero block: -126 - emax)
 * clamped below at -127, stored as the byte se + 127 (0xFF = NaN block, which
 * any NaN or Inf inside the block produces). Each element v / 2^se is rounded
 * to the element grid (ties to even, or ties away from zero) and saturated to
 * +-max. See docs/design.md, section 2.
 */
#ifndef MXQ_MX_H
#define MXQ_MX_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MXQ_MXINT8 = 0,
    MXQ_MXINT4,
    MXQ_MXINT3,
    MXQ_MXINT2,
    MXQ_MXFP8_E4M3,
    MXQ_MXFP8_E5M2,
    MXQ_MXFP6_E3M2,
    MXQ_MXFP6_E2M3,
    MXQ_MXFP4_E2M1,
    MXQ_FORMAT_COUNT
} mxq_format_id;

/* One row of the format table (src/formats/mx_format.c), the single place
 * where formats are defined.
 *
 * Integer elements are k / 2^mbits with |k| <= max_code (symmetric, stored as
 * two's-complement k). Float elements have ebits exponent bits, mbits mantissa
 * bits, bias 2^(ebits-1)-1, subnormals, no Inf/NaN encodings used (values
 * saturate), stored as sign | exponent | mantissa.
 */
typedef struct {
    mxq_format_id id;
    const char *name;  /* CLI / recipe name, e.g. "mxint4" */
    int bits;          /* element width including sign */
    int storage_bits;  /* bits an element takes in a packed row: 8, 6, 4 or 2 */
    int is_int;
    int ebits;         /* exponent bits (0 for integers) */
    int mbits;         /* mantissa bits (floats) or fraction bits (integers) */
    int emax;          /* exponent of the largest normal; se = floor(log2 amax) - emax */
    int emin;          /* smallest normal exponent, 1 - bias (0 for integers) */
    float max;         /* largest magnitude; larger values saturate to it */
    int max_code;      /* magnitude code (element bits without sign) of max */
} mxq_format;

typedef enum {
    MXQ_ROUND_EVEN = 0,  /* ties to even: OCP's required mode, the default */
    MXQ_ROUND_NEAREST,   /* ties away from zero: microxcaling's default */
} mxq_rounding;

/* Which implementation runs. The reference kernel is the specification; the
 * fast kernel must produce identical bytes (tested). AUTO picks the fastest
 * one this CPU supports. */
typedef enum {
    MXQ_KERNEL_AUTO = 0,
    MXQ_KERNEL_REFERENCE,
    MXQ_KERNEL_AVX512,
} mxq_kernel;

#define MXQ_MX_BLOCK_MAX 4096
#define MXQ_E8M0_NAN 0xFFu

typedef struct {
    const mxq_format *format;
    int block;              /* 1 .. MXQ_MX_BLOCK_MAX */
    mxq_rounding rounding;
    mxq_kernel kernel;
} mxq_mx_spec;

/* Format table access. */
const mxq_format *mxq_format_get(mxq_format_id id);
/* NULL if unknown. Names: mxint8 mxint4 mxint3 mxint2 mxfp8_e4m3 mxfp8_e5m2
 * mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1. */
const mxq_format *mxq_format_by_name(const char *name);
/* Space-separated list of every format name, for error messages and --help. */
const char *mxq_format_names(void);
const char *mxq_rounding_name(mxq_rounding rounding);
/* Returns 0 and sets *out on success, -1 if unknown ("even" | "nearest"). */
int mxq_rounding_by_name(const char *name, mxq_rounding *out);
const char *mxq_kernel_name(mxq_kernel kernel);
/* Whether this CPU can run the kernel (REFERENCE and AUTO always can). */
int mxq_kernel_available(mxq_kernel kernel);
/* The kernel AUTO resolves to on this CPU. */
mxq_kernel mxq_kernel_resolve(mxq_kernel kernel);

/* Validates format, block range, rounding and kernel availability. */
mxq_status mxq_mx_spec_check(mxq_ctx *ctx, const mxq_mx_spec *spec);

static inline size_t mxq_mx_blocks_per_row(size_t cols, int block)
{
    return (cols + (size_t)block - 1) / (size_t)block;
}

/* Bytes of one packed row; every row starts on a byte boundary. */
static inline size_t mxq_mx_packed_row_bytes(const mxq_format *format, size_t cols)
{
    return (cols * (size_t)format->storage_bits + 7) / 8;
}

/* Quantize `rows` rows of `cols` floats.
 *   in       [rows, cols]
 *   packed   [rows, mxq_mx_packed_row_bytes(format, cols)]  (may be NULL)
 *   scales   [rows, mxq_mx_blocks_per_row(cols, block)]     E8M0 bytes (may be NULL)
 *   dequant  [rows, cols]  the values the packed elements represent (may be NULL)
 * The outputs must not overlap `in`, except that dequant may equal in
 * (in-place fake quantization). */
mxq_status mxq_mx_quantize_rows(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *in, size_t rows,
                                size_t cols, uint8_t *packed, uint8_t *scales, float *dequant);

/* Inverse of packing + scaling: out [rows, cols] = element value * 2^(scale-127),
 * NaN for every element of a block whose scale is 0xFF. */
mxq_status mxq_mx_dequantize_rows(mxq_ctx *ctx, const mxq_mx_spec *spec, const uint8_t *packed,
                                  const uint8_t *scales, size_t rows, size_t cols, float *out);

/* Element codes and packing of weights that already lie on the MX grid of
 * the given E8M0 scales (GPTQ's output); fails if an element is off-grid.
 *   weight [rows, cols], scales [rows, blocks], packed [rows, packed row bytes] */
mxq_status mxq_mx_pack_with_scales(mxq_ctx *ctx, const mxq_mx_spec *spec, const float *weight, size_t rows,
                                   size_t cols, const uint8_t *scales, uint8_t *packed);

/* ---- Element-level helpers (scalar, the specification) ------------------
 * GPTQ chooses a block's scale when it reaches the block and then quantizes
 * error-compensated values one column at a time against that fixed scale;
 * these expose the two halves of the block rule for that use. */

/* Shared exponent of a block of n values read with `stride`. Returns
 * MXQ_SE_NAN when the block holds a NaN or Inf. Otherwise in [-127, 127]. */
#define MXQ_SE_NAN 128
int mxq_mx_shared_exponent(const mxq_format *format, const float *values, size_t n, size_t stride);

/* Signed element code (low `bits` bits significant) of x quantized against
 * shared exponent se (se != MXQ_SE_NAN). */
uint8_t mxq_mx_encode(const mxq_format *format, mxq_rounding rounding, float x, int se);
/* Value of an element code with scale 2^se (NaN if se == MXQ_SE_NAN). */
float mxq_mx_decode(const mxq_format *format, uint8_t code, int se);
/* Shorthand: decode(encode(x)). */
float mxq_mx_quantize_value(const mxq_format *format, mxq_rounding rounding, float x, int se);

/* Element codes (one per byte, low `bits` bits) <-> packed row bytes. */
void mxq_mx_pack_row(const mxq_format *format, const uint8_t *codes, size_t cols, uint8_t *packed);
void mxq_mx_unpack_row(const mxq_format *format, const uint8_t *packed, size_t cols, uint8_t *codes);

/* Whether `code` is one the format can hold and mxq writes: no bits above
 * `bits`, magnitude at most max_code (so neither the Inf/NaN codes of the
 * FP8 formats nor an integer format's two's-complement minimum, e.g.
 * MXINT4's -8). */
int mxq_mx_code_valid(const mxq_format *format, uint8_t code);
/* A packed row checked: the first element with an invalid code, `cols` if
 * every code is valid but bits no element uses are set, (size_t)-1 if the
 * row is clean. codes [cols] and repacked [packed row bytes] are scratch. */
size_t mxq_mx_check_row(const mxq_format *format, const uint8_t *packed, size_t cols, uint8_t *codes,
                        uint8_t *repacked);

#ifdef __cplusplus
}
#endif

#endif
