/* Rotary frequencies: transformers' for the forward pass, llama.cpp's
 * converter's rope_freqs divisors for the GGUF export (model/rope.h). */
#include <math.h>

#include "model/rope.h"

/* theta^(-2i/head_dim) in float32, as transformers computes inv_freq */
static double base_frequency(const mxq_model_config *cfg, int i)
{
    float exponent = (float)(2 * i) / (float)cfg->head_dim;
    return (float)(1.0 / pow(cfg->rope_theta, (double)exponent));
}

/* Where a wavelength falls in Llama-3 scaling: -1 below high_freq's
 * wavelength (kept), 1 above low_freq's (divided by the factor), 0 between
 * (smoothed, with *smooth). */
static int llama3_band(const mxq_model_config *cfg, double freq, double *smooth)
{
    const double old_len = cfg->rope_original_max_positions, wavelen = 2.0 * M_PI / freq;
    if (wavelen < old_len / cfg->rope_high_freq_factor)
        return -1;
    if (wavelen > old_len / cfg->rope_low_freq_factor)
        return 1;
    *smooth = (old_len / wavelen - cfg->rope_low_freq_factor) / (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
    return 0;
}

void mxq_rope_frequencies(const mxq_model_config *cfg, double *inv_freq)
{
    for (int i = 0; i < cfg->head_dim / 2; i++) {
        double freq = base_frequency(cfg, i), smooth = 0;
        if (cfg->rope_factor > 0) {
            const int band = llama3_band(cfg, freq, &smooth);
            if (band > 0)
                freq = freq / cfg->rope_factor;
            else if (band == 0) /* transformers' expression, for its rounding */
                freq = (1.0 - smooth) * freq / cfg->rope_factor + smooth * freq;
            freq = (float)freq;
        }
        inv_freq[i] = freq;
    }
}

void mxq_rope_llama3_divisors(const mxq_model_config *cfg, float *divisors)
{
    for (int i = 0; i < cfg->head_dim / 2; i++) {
        double smooth = 0;
        const int band = cfg->rope_factor > 0 ? llama3_band(cfg, base_frequency(cfg, i), &smooth) : -1;
        divisors[i] = band < 0 ? 1.0f : band > 0 ? (float)cfg->rope_factor
                                                 : (float)(1.0 / ((1.0 - smooth) / cfg->rope_factor + smooth));
    }
}
