/* AVX-512 MX kernel. Compiled with AVX-512 flags (see meson.build) and only
 * called after mxq_cpu_has_avx512() said yes.
 *
 * Same arithmetic as the reference, in float32, with every step exact:
 *  - amax is the unsigned-integer max of |x| bit patterns (for non-negative
 *    floats integer order is float order, and Inf/NaN compare above all
 *    finite values, so one compare detects a NaN block);
 *  - floor(log2 amax) comes from the exponent bits (count leading zeros for
 *    FP32 subnormals), never from log2f;
 *  - x / 2^se, the per-binade grid step and the dequantized value are
 *    power-of-two products, exact in float32. The one inexact case, x / 2^se
 *    falling in the FP32 subnormal range, is far below half the smallest grid
 *    step of every format, so it rounds to 0 in both kernels;
 *  - ties-away rounding is trunc(t) + (t - trunc(t) >= 0.5), exact, unlike
 *    floor(t + 0.5) which misrounds t = 0.5 - 2^-25.
 * A float element's magnitude code is (p - emin) * 2^m + round(t) where p is
 * the grid exponent: this single formula covers subnormals and the carry of
 * round(t) = 2^(m+1) into the next binade.
 */
#include <immintrin.h>
#include <string.h>

#include "formats/mx_kernels.h"

static inline uint32_t pow2_bits(int k)
{
    /* 2^k as float32 bits, k in [-149, 127] */
    return k >= -126 ? (uint32_t)(k + 127) << 23 : 1u << (k + 149);
}

static inline int shared_exponent_from_amax_bits(uint32_t amax_bits, int emax)
{
    if (amax_bits >= 0x7f800000u)
        return MXQ_SE_NAN;
    int e;
    if (amax_bits == 0)
        e = -126;
    else if (amax_bits < 0x00800000u)
        e = (31 - __builtin_clz(amax_bits)) - 149;
    else
        e = (int)(amax_bits >> 23) - 127;
    int se = e - emax;
    return se < -127 ? -127 : se;
}

static inline __mmask16 tail_mask(size_t remaining)
{
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u);
}

/* Quantize one block that is known to be finite, given its shared exponent. */
static inline void quantize_block(const mxq_format *format, mxq_rounding rounding, const float *in,
                                  size_t n, int se, uint8_t *codes, float *dequant)
{
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i sign_bit = _mm512_set1_epi32((int)0x80000000u);
    const __m512 scale_in = _mm512_castsi512_ps(_mm512_set1_epi32((int)pow2_bits(-se)));
    const __m512 scale_out = _mm512_castsi512_ps(_mm512_set1_epi32((int)pow2_bits(se)));
    const int m = format->mbits;
    const __m512i max_code = _mm512_set1_epi32(format->max_code);
    const __m512 max_value = _mm512_set1_ps(format->max);
    const __m512i code_mask = _mm512_set1_epi32((1 << format->bits) - 1);
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i emin = _mm512_set1_epi32(format->emin);
    const __m512i bias_plus_m = _mm512_set1_epi32(127 + m);
    const __m512i bias_minus_m = _mm512_set1_epi32(127 - m);
    const __m512i exp_bias = _mm512_set1_epi32(127);
    const __m512 int_inv_step = _mm512_castsi512_ps(_mm512_set1_epi32((int)pow2_bits(m)));
    const __m512 int_step = _mm512_castsi512_ps(_mm512_set1_epi32((int)pow2_bits(-m)));
    const int is_int = format->is_int;
    const int sign_shift = 32 - format->bits;

    for (size_t j = 0; j < n; j += 16) {
        __mmask16 k = tail_mask(n - j);
        __m512i x = _mm512_maskz_loadu_epi32(k, in + j);
        __m512i sign = _mm512_and_si512(x, sign_bit);
        __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(x, abs_mask)), scale_in);

        __m512 t, step;
        __m512i magnitude_offset;
        if (is_int) {
            t = _mm512_mul_ps(v, int_inv_step);
            step = int_step;
            magnitude_offset = _mm512_setzero_si512();
        } else {
            __m512i p = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(v), 23), exp_bias);
            p = _mm512_max_epi32(p, emin);
            __m512 inv_step = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(bias_plus_m, p), 23));
            step = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(bias_minus_m, p), 23));
            t = _mm512_mul_ps(v, inv_step);
            magnitude_offset = _mm512_slli_epi32(_mm512_sub_epi32(p, emin), (unsigned)m);
        }

        __m512 r;
        if (rounding == MXQ_ROUND_EVEN) {
            r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        } else {
            __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(t, whole), half, _CMP_GE_OQ);
            r = _mm512_mask_add_ps(whole, up, whole, one);
        }

        __m512i magnitude = _mm512_add_epi32(magnitude_offset, _mm512_cvttps_epi32(r));
        magnitude = _mm512_min_epi32(magnitude, max_code);

        __m512i code;
        __mmask16 negative = _mm512_test_epi32_mask(x, sign_bit);
        if (is_int)
            code = _mm512_and_si512(_mm512_mask_sub_epi32(magnitude, negative, _mm512_setzero_si512(), magnitude),
                                    code_mask);
        else
            code = _mm512_or_si512(magnitude, _mm512_srli_epi32(sign, (unsigned)sign_shift));
        _mm512_mask_cvtepi32_storeu_epi8(codes + j, k, code);

        if (dequant) {
            __m512 q = _mm512_min_ps(_mm512_mul_ps(r, step), max_value);
            __m512 out = _mm512_mul_ps(q, scale_out);
            /* Integer codes have no negative zero; float codes keep the sign. */
            __m512i out_sign = is_int ? _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(magnitude, magnitude), sign)
                                      : sign;
            out = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(out), out_sign));
            _mm512_mask_storeu_ps(dequant + j, k, out);
        }
    }
}

static void quantize_row(const mxq_format *format, int block, mxq_rounding rounding, const float *in,
                         size_t cols, uint8_t *scales, float *dequant, uint8_t *codes)
{
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const size_t nblocks = mxq_mx_blocks_per_row(cols, block);
    for (size_t b = 0; b < nblocks; b++) {
        size_t c0 = b * (size_t)block;
        size_t n = cols - c0 < (size_t)block ? cols - c0 : (size_t)block;
        __m512i vmax = _mm512_setzero_si512();
        for (size_t j = 0; j < n; j += 16) {
            __m512i x = _mm512_maskz_loadu_epi32(tail_mask(n - j), in + c0 + j);
            vmax = _mm512_max_epu32(vmax, _mm512_and_si512(x, abs_mask));
        }
        int se = shared_exponent_from_amax_bits(_mm512_reduce_max_epu32(vmax), format->emax);
        if (scales)
            scales[b] = se == MXQ_SE_NAN ? MXQ_E8M0_NAN : (uint8_t)(se + 127);
        if (se == MXQ_SE_NAN) {
            memset(codes + c0, 0, n);
            if (dequant) {
                const __m512 nan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000));
                for (size_t j = 0; j < n; j += 16)
                    _mm512_mask_storeu_ps(dequant + c0 + j, tail_mask(n - j), nan);
            }
            continue;
        }
        quantize_block(format, rounding, in + c0, n, se, codes + c0, dequant ? dequant + c0 : NULL);
    }
}

/* 4-bit storage: byte i = code[2i] | code[2i+1] << 4. */
static void pack_row_4bit(const uint8_t *codes, size_t cols, uint8_t *packed)
{
    const __m512i lo_nibble = _mm512_set1_epi16(0x000F);
    const __m512i hi_nibble = _mm512_set1_epi16(0x00F0);
    for (size_t i = 0; i < cols; i += 64) {
        size_t n = cols - i < 64 ? cols - i : 64;
        __mmask64 load_mask = n == 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
        __m512i c = _mm512_maskz_loadu_epi8(load_mask, codes + i);
        /* 16-bit lane = code[2i] | code[2i+1] << 8 */
        __m512i lanes = _mm512_or_si512(_mm512_and_si512(c, lo_nibble),
                                        _mm512_and_si512(_mm512_srli_epi16(c, 4), hi_nibble));
        __m256i bytes = _mm512_cvtepi16_epi8(lanes);
        size_t nbytes = (n + 1) / 2;
        __mmask32 store_mask = nbytes == 32 ? ~(__mmask32)0 : (((__mmask32)1 << nbytes) - 1);
        _mm256_mask_storeu_epi8(packed + i / 2, store_mask, bytes);
    }
}

/* 2-bit storage: byte i = code[4i] | code[4i+1] << 2 | code[4i+2] << 4 | code[4i+3] << 6. */
static void pack_row_2bit(const uint8_t *codes, size_t cols, uint8_t *packed)
{
    const __m512i m0 = _mm512_set1_epi32(0x03), m1 = _mm512_set1_epi32(0x0C);
    const __m512i m2 = _mm512_set1_epi32(0x30), m3 = _mm512_set1_epi32(0xC0);
    for (size_t i = 0; i < cols; i += 64) {
        size_t n = cols - i < 64 ? cols - i : 64;
        __mmask64 load_mask = n == 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
        __m512i c = _mm512_maskz_loadu_epi8(load_mask, codes + i);
        __m512i lanes = _mm512_or_si512(
            _mm512_or_si512(_mm512_and_si512(c, m0), _mm512_and_si512(_mm512_srli_epi32(c, 6), m1)),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(c, 12), m2),
                            _mm512_and_si512(_mm512_srli_epi32(c, 18), m3)));
        __m128i bytes = _mm512_cvtepi32_epi8(lanes);
        size_t nbytes = (n + 3) / 4;
        __mmask16 store_mask = nbytes == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nbytes) - 1u);
        _mm_mask_storeu_epi8(packed + i / 4, store_mask, bytes);
    }
}

void mxq_mx_quantize_rows_avx512(const mxq_format *format, int block, mxq_rounding rounding,
                                 const float *in, size_t rows, size_t cols, uint8_t *packed,
                                 uint8_t *scales, float *dequant, uint8_t *codes)
{
    const size_t nblocks = mxq_mx_blocks_per_row(cols, block);
    const size_t row_bytes = mxq_mx_packed_row_bytes(format, cols);
    for (size_t r = 0; r < rows; r++) {
        uint8_t *row_packed = packed ? packed + r * row_bytes : NULL;
        /* 8-bit storage is the code itself: write it straight into place. */
        uint8_t *row_codes = (row_packed && format->storage_bits == 8) ? row_packed : codes;
        quantize_row(format, block, rounding, in + r * cols, cols, scales ? scales + r * nblocks : NULL,
                     dequant ? dequant + r * cols : NULL, row_codes);
        if (!row_packed || format->storage_bits == 8)
            continue;
        if (format->storage_bits == 4)
            pack_row_4bit(row_codes, cols, row_packed);
        else if (format->storage_bits == 2)
            pack_row_2bit(row_codes, cols, row_packed);
        else
            mxq_mx_pack_row(format, row_codes, cols, row_packed);
    }
}
