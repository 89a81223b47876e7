/* The MX element format table: the one place formats are defined. Every
 * other piece of mxq (kernels, packing, CLI, recipes, checkpoint metadata)
 * reads these rows. tests/unit/test_mx_format.c re-derives the dependent
 * columns (emin, max, max_code) from ebits/mbits and checks them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "formats/mx_spec.h"
#include "formats/mx_kernels.h"
#include "mxq/mx.h"

/*  id               name          bits stor int eb mb emax emin  max          max_code */
static const mxq_format format_table[MXQ_FORMAT_COUNT] = {
    {MXQ_MXINT8,     "mxint8",     8,   8,   1,  0, 6, 0,   0,    127.0f / 64, 127},
    {MXQ_MXINT4,     "mxint4",     4,   4,   1,  0, 2, 0,   0,    1.75f,       7},
    {MXQ_MXINT3,     "mxint3",     3,   4,   1,  0, 1, 0,   0,    1.5f,        3},
    {MXQ_MXINT2,     "mxint2",     2,   2,   1,  0, 0, 0,   0,    1.0f,        1},
    {MXQ_MXFP8_E4M3, "mxfp8_e4m3", 8,   8,   0,  4, 3, 8,   -6,   448.0f,      0x7E},
    {MXQ_MXFP8_E5M2, "mxfp8_e5m2", 8,   8,   0,  5, 2, 15,  -14,  57344.0f,    0x7B},
    {MXQ_MXFP6_E3M2, "mxfp6_e3m2", 6,   6,   0,  3, 2, 4,   -2,   28.0f,       0x1F},
    {MXQ_MXFP6_E2M3, "mxfp6_e2m3", 6,   6,   0,  2, 3, 2,   0,    7.5f,        0x1F},
    {MXQ_MXFP4_E2M1, "mxfp4_e2m1", 4,   4,   0,  2, 1, 2,   0,    6.0f,        0x7},
};

const mxq_format *mxq_format_get(mxq_format_id id)
{
    if ((int)id < 0 || id >= MXQ_FORMAT_COUNT)
        return NULL;
    return &format_table[id];
}

const mxq_format *mxq_format_by_name(const char *name)
{
    if (!name)
        return NULL;
    for (int i = 0; i < MXQ_FORMAT_COUNT; i++)
        if (strcmp(format_table[i].name, name) == 0)
            return &format_table[i];
    return NULL;
}

const char *mxq_format_names(void)
{
    return "mxint8 mxint4 mxint3 mxint2 mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1";
}

const char *mxq_rounding_name(mxq_rounding rounding)
{
    return rounding == MXQ_ROUND_NEAREST ? "nearest" : "even";
}

int mxq_rounding_by_name(const char *name, mxq_rounding *out)
{
    if (name && strcmp(name, "even") == 0) {
        *out = MXQ_ROUND_EVEN;
        return 0;
    }
    if (name && strcmp(name, "nearest") == 0) {
        *out = MXQ_ROUND_NEAREST;
        return 0;
    }
    return -1;
}

const char *mxq_kernel_name(mxq_kernel kernel)
{
    switch (kernel) {
    case MXQ_KERNEL_AUTO: return "auto";
    case MXQ_KERNEL_REFERENCE: return "reference";
    case MXQ_KERNEL_AVX512: return "avx512";
    }
    return "unknown";
}

int mxq_kernel_available(mxq_kernel kernel)
{
    switch (kernel) {
    case MXQ_KERNEL_AUTO:
    case MXQ_KERNEL_REFERENCE: return 1;
    case MXQ_KERNEL_AVX512: return mxq_cpu_has_avx512();
    }
    return 0;
}

mxq_kernel mxq_kernel_resolve(mxq_kernel kernel)
{
    if (kernel != MXQ_KERNEL_AUTO)
        return kernel;
    return mxq_cpu_has_avx512() ? MXQ_KERNEL_AVX512 : MXQ_KERNEL_REFERENCE;
}

mxq_status mxq_mx_spec_check(mxq_ctx *ctx, const mxq_mx_spec *spec)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, spec && spec->format, MXQ_ERR_ARG, "MX spec has no element format (valid: %s)",
          mxq_format_names());
    CHECK(ctx, mxq_format_get(spec->format->id) == spec->format, MXQ_ERR_ARG,
          "MX spec format does not come from the format table");
    CHECK(ctx, spec->block >= 1 && spec->block <= MXQ_MX_BLOCK_MAX, MXQ_ERR_ARG,
          "MX block size %d is out of range (expected 1..%d)", spec->block, MXQ_MX_BLOCK_MAX);
    CHECK(ctx, spec->rounding == MXQ_ROUND_EVEN || spec->rounding == MXQ_ROUND_NEAREST, MXQ_ERR_ARG,
          "unknown MX rounding mode %d (valid: even nearest)", (int)spec->rounding);
    CHECK(ctx, mxq_kernel_available(spec->kernel), MXQ_ERR_ARG,
          "MX kernel '%s' is not supported by this CPU", mxq_kernel_name(spec->kernel));
fail:
    return status;
}

/* ---- the text form of a spec: one serializer for recipes (YAML), checkpoint
 * configs (JSON in) and quantization_config (JSON out) ------------------- */

static const struct {
    const char *key;
    int is_int;
} spec_fields[MXQ_MX_SPEC_FIELDS] = {{"format", 0}, {"block", 1}, {"rounding", 0}};

const char *mxq_mx_spec_field_key(int i) { return i >= 0 && i < MXQ_MX_SPEC_FIELDS ? spec_fields[i].key : NULL; }
int mxq_mx_spec_field_is_int(int i) { return i >= 0 && i < MXQ_MX_SPEC_FIELDS && spec_fields[i].is_int; }

void mxq_mx_spec_default(mxq_mx_spec *spec)
{
    spec->format = NULL;
    spec->block = 32;
    spec->rounding = MXQ_ROUND_EVEN;
    spec->kernel = MXQ_KERNEL_AUTO;
}

static mxq_status set_block(mxq_ctx *ctx, mxq_mx_spec *spec, const char *text, const char *where)
{
    mxq_status status = MXQ_OK;
    char *end = NULL;
    long v = text ? strtol(text, &end, 10) : 0;
    CHECK(ctx, text && *text && !*end && v >= 1 && v <= MXQ_MX_BLOCK_MAX, MXQ_ERR_FORMAT,
          "%s: 'block' must be an integer in 1..%d, got '%s'", where, MXQ_MX_BLOCK_MAX, text ? text : "(not a scalar)");
    spec->block = (int)v;
fail:
    return status;
}

mxq_status mxq_mx_spec_set_field(mxq_ctx *ctx, mxq_mx_spec *spec, const char *key, const char *text, const char *where,
                                 const char *what)
{
    mxq_status status = MXQ_OK;
    if (key && strcmp(key, "format") == 0) {
        spec->format = text ? mxq_format_by_name(text) : NULL;
        CHECK(ctx, spec->format || (text && strcmp(text, "none") == 0), MXQ_ERR_FORMAT,
              "%s: unknown format '%s' in %s (valid: none %s)", where, text ? text : "?", what, mxq_format_names());
    } else if (key && strcmp(key, "block") == 0) {
        CALL(ctx, set_block(ctx, spec, text, where));
    } else if (key && strcmp(key, "rounding") == 0) {
        CHECK(ctx, text && mxq_rounding_by_name(text, &spec->rounding) == 0, MXQ_ERR_FORMAT,
              "%s: unknown rounding '%s' in %s (valid: even nearest)", where, text ? text : "?", what);
    } else {
        char valid[64] = "";
        for (int i = 0; i < MXQ_MX_SPEC_FIELDS; i++)
            snprintf(valid + strlen(valid), sizeof(valid) - strlen(valid), "%s%s", i ? " " : "", spec_fields[i].key);
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: unknown key '%s' in %s (valid: %s)", where, key ? key : "?", what, valid);
    }
fail:
    return status;
}

void mxq_mx_spec_field_text(const mxq_mx_spec *spec, int i, char *buf, size_t size)
{
    switch (i) {
    case 0: snprintf(buf, size, "%s", spec->format ? spec->format->name : "none"); break;
    case 1: snprintf(buf, size, "%d", spec->block); break;
    case 2: snprintf(buf, size, "%s", mxq_rounding_name(spec->rounding)); break;
    default: snprintf(buf, size, "?"); break;
    }
}
