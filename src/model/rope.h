/* Rotary frequencies of a config. Internal (the model's forward, the GGUF
 * export). */
#ifndef MXQ_MODEL_ROPE_H
#define MXQ_MODEL_ROPE_H

#include "mxq/model.h"

/* The rotary inverse frequencies [head_dim / 2], Llama-3-scaled when the
 * config says so, as transformers computes them. */
void mxq_rope_frequencies(const mxq_model_config *cfg, double *inv_freq);

/* Llama-3 scaling as llama.cpp's converter writes it (rope_freqs): per
 * frequency [head_dim / 2] the divisor 1 (short wavelengths), the factor
 * (long ones) or 1 / ((1 - smooth) / factor + smooth) between. */
void mxq_rope_llama3_divisors(const mxq_model_config *cfg, float *divisors);

#endif
