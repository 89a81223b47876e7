/* The text form of an MX spec. Internal. */
#ifndef MXQ_MX_SPEC_H
#define MXQ_MX_SPEC_H

#include "mxq/mx.h"

/* The text form of a spec, one serializer for every place a spec is read
 * or written (recipes, config.json's quantization_config): its fields are
 * format, block (an integer) and rounding, in that order. */
#define MXQ_MX_SPEC_FIELDS 3
const char *mxq_mx_spec_field_key(int i);
int mxq_mx_spec_field_is_int(int i);
/* format none, block 32, rounding even, kernel auto */
void mxq_mx_spec_default(mxq_mx_spec *spec);
/* Set field `key` from its text ("none" leaves the format NULL). Errors read
 * "<where>: unknown key 'x' in <what> (valid: format block rounding)". */
mxq_status mxq_mx_spec_set_field(mxq_ctx *ctx, mxq_mx_spec *spec, const char *key, const char *text, const char *where,
                                 const char *what);
/* Field i as text (the block as a decimal integer). */
void mxq_mx_spec_field_text(const mxq_mx_spec *spec, int i, char *buf, size_t size);

#endif
