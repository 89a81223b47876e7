/* The scalar reference kernel: the specification of MX quantization in mxq.
 *
 * It is written for clarity, straight from docs/design.md section 2, in double
 * precision where every step is exact (float -> double, scaling by powers of
 * two, rounding an exactly-known value to an integer). The fast kernels are
 * tested to produce the same bytes.
 *
 * Rounding: rint() rounds ties to even under the default FE_TONEAREST mode,
 * which mxq never changes; round() rounds ties away from zero.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "formats/mx_kernels.h"
#include "mxq/mx.h"

/* floor(log2(a)) for finite a > 0, exactly (frexp never rounds). */
static int floor_log2(double a)
{
    int exponent;
    frexp(a, &exponent); /* a = f * 2^exponent, f in [0.5, 1) */
    return exponent - 1;
}

int mxq_mx_shared_exponent(const mxq_format *format, const float *values, size_t n, size_t stride)
{
    double amax = 0.0;
    for (size_t i = 0; i < n; i++) {
        float x = values[i * stride];
        if (!isfinite(x))
            return MXQ_SE_NAN;
        double a = fabs((double)x);
        if (a > amax)
            amax = a;
    }
    /* All-zero block: floor(log2(FLT_MIN)) = -126, as the MX reference does. */
    int e = amax == 0.0 ? -126 : floor_log2(amax);
    int se = e - format->emax;
    if (se > 127)
        return MXQ_SE_NAN;
    if (se < -127)
        se = -127;
    return se;
}

uint8_t mxq_mx_encode(const mxq_format *format, mxq_rounding rounding, float x, int se)
{
    const int m = format->mbits;
    double v = ldexp((double)x, -se); /* exact: a power-of-two scaling in double */
    int negative = signbit(v) != 0;
    double a = fabs(v);

    /* Exponent of the grid around a: integers have one fixed grid; floats
     * have one per binade, down to the subnormal grid of the smallest. */
    int p = 0;
    if (!format->is_int) {
        p = a == 0.0 ? format->emin : floor_log2(a);
        if (p < format->emin)
            p = format->emin;
    }
    double t = ldexp(a, m - p); /* a in units of the grid step */
    double r = rounding == MXQ_ROUND_EVEN ? rint(t) : round(t);
    double q = ldexp(r, p - m);
    if (q > (double)format->max)
        q = (double)format->max; /* saturate, never Inf */

    unsigned magnitude;
    if (format->is_int) {
        magnitude = (unsigned)ldexp(q, m);
    } else if (q < ldexp(1.0, format->emin)) {
        magnitude = (unsigned)ldexp(q, m - format->emin); /* subnormal: exponent field 0 */
    } else {
        int e = floor_log2(q);
        unsigned exponent_field = (unsigned)(e - format->emin + 1);
        unsigned mantissa = (unsigned)(ldexp(q, m - e) - ldexp(1.0, m));
        magnitude = (exponent_field << m) | mantissa;
    }

    unsigned code_mask = (1u << format->bits) - 1u;
    if (format->is_int)
        return (uint8_t)((negative ? (0u - magnitude) : magnitude) & code_mask);
    return (uint8_t)((magnitude | ((unsigned)negative << (format->bits - 1))) & code_mask);
}

float mxq_mx_decode(const mxq_format *format, uint8_t code, int se)
{
    if (se == MXQ_SE_NAN)
        return NAN;
    const int m = format->mbits;
    const int bits = format->bits;
    unsigned c = code & ((1u << bits) - 1u);
    double magnitude;
    int negative;
    if (format->is_int) {
        int k = (c & (1u << (bits - 1))) ? (int)c - (1 << bits) : (int)c; /* two's complement */
        negative = k < 0;
        magnitude = ldexp((double)abs(k), -m);
    } else {
        negative = (c >> (bits - 1)) & 1u;
        unsigned mag = c & ((1u << (bits - 1)) - 1u);
        unsigned exponent_field = mag >> m;
        unsigned mantissa = mag & ((1u << m) - 1u);
        unsigned exponent_all_ones = (1u << format->ebits) - 1u;
        /* OCP special encodings, never produced by mxq but valid in files:
         * E4M3 S.1111.111 is NaN; E5M2 uses IEEE Inf/NaN. */
        if (format->id == MXQ_MXFP8_E4M3 && mag == 0x7Fu)
            return NAN;
        if (format->id == MXQ_MXFP8_E5M2 && exponent_field == exponent_all_ones)
            return mantissa ? NAN : (negative ? -INFINITY : INFINITY);
        if (exponent_field == 0)
            magnitude = ldexp((double)mantissa, format->emin - m);
        else
            magnitude = ldexp((double)((1u << m) | mantissa), (int)exponent_field - 1 + format->emin - m);
    }
    double value = ldexp(magnitude, se);
    return (float)(negative ? -value : value);
}

float mxq_mx_quantize_value(const mxq_format *format, mxq_rounding rounding, float x, int se)
{
    if (se == MXQ_SE_NAN)
        return NAN;
    return mxq_mx_decode(format, mxq_mx_encode(format, rounding, x, se), se);
}

/* Packing, the specification: a row is a little-endian bit stream in which
 * element i occupies storage_bits bits starting at bit i * storage_bits.
 * For MXINT3 (storage 4) the 3-bit code sits in the low bits of its nibble. */
void mxq_mx_pack_row(const mxq_format *format, const uint8_t *codes, size_t cols, uint8_t *packed)
{
    const unsigned w = (unsigned)format->storage_bits;
    const unsigned code_mask = (1u << format->bits) - 1u;
    size_t nbytes = mxq_mx_packed_row_bytes(format, cols);
    memset(packed, 0, nbytes);
    for (size_t i = 0; i < cols; i++) {
        size_t bit = i * w;
        unsigned value = (unsigned)(codes[i] & code_mask) << (bit % 8);
        packed[bit / 8] |= (uint8_t)value;
        if ((bit % 8) + w > 8)
            packed[bit / 8 + 1] |= (uint8_t)(value >> 8);
    }
}

void mxq_mx_unpack_row(const mxq_format *format, const uint8_t *packed, size_t cols, uint8_t *codes)
{
    const unsigned w = (unsigned)format->storage_bits;
    const unsigned code_mask = (1u << format->bits) - 1u;
    for (size_t i = 0; i < cols; i++) {
        size_t bit = i * w;
        unsigned value = packed[bit / 8];
        if ((bit % 8) + w > 8)
            value |= (unsigned)packed[bit / 8 + 1] << 8;
        codes[i] = (uint8_t)((value >> (bit % 8)) & code_mask);
    }
}

int mxq_mx_code_valid(const mxq_format *format, uint8_t code)
{
    const int sign = 1 << (format->bits - 1);
    if (code >> format->bits)
        return 0;
    if (!format->is_int) /* sign-magnitude: above max_code are Inf and NaN codes */
        return (code & (sign - 1)) <= format->max_code;
    const int k = code < sign ? code : code - 2 * sign; /* two's complement */
    return k >= -format->max_code && k <= format->max_code;
}

size_t mxq_mx_check_row(const mxq_format *format, const uint8_t *packed, size_t cols, uint8_t *codes,
                        uint8_t *repacked)
{
    mxq_mx_unpack_row(format, packed, cols, codes);
    for (size_t i = 0; i < cols; i++)
        if (!mxq_mx_code_valid(format, codes[i]))
            return i;
    /* bits no element uses (MXINT3's nibble tops, a row's last byte) are zero */
    mxq_mx_pack_row(format, codes, cols, repacked);
    return memcmp(packed, repacked, mxq_mx_packed_row_bytes(format, cols)) == 0 ? (size_t)-1 : cols;
}

void mxq_mx_quantize_rows_reference(const mxq_format *format, int block, mxq_rounding rounding,
                                    const float *in, size_t rows, size_t cols, uint8_t *packed,
                                    uint8_t *scales, float *dequant, uint8_t *codes)
{
    const size_t nblocks = mxq_mx_blocks_per_row(cols, block);
    const size_t row_bytes = mxq_mx_packed_row_bytes(format, cols);
    for (size_t r = 0; r < rows; r++) {
        const float *row = in + r * cols;
        for (size_t b = 0; b < nblocks; b++) {
            size_t c0 = b * (size_t)block;
            size_t n = cols - c0 < (size_t)block ? cols - c0 : (size_t)block;
            int se = mxq_mx_shared_exponent(format, row + c0, n, 1);
            if (scales)
                scales[r * nblocks + b] = se == MXQ_SE_NAN ? MXQ_E8M0_NAN : (uint8_t)(se + 127);
            for (size_t i = 0; i < n; i++) {
                /* A NaN block keeps zero element codes: the scale alone says NaN. */
                uint8_t code = se == MXQ_SE_NAN ? 0 : mxq_mx_encode(format, rounding, row[c0 + i], se);
                codes[c0 + i] = code;
                if (dequant)
                    dequant[r * cols + c0 + i] = mxq_mx_decode(format, code, se);
            }
        }
        if (packed)
            mxq_mx_pack_row(format, codes, cols, packed + r * row_bytes);
    }
}
