/* Recipe parsing with libfyaml. Every node is checked against the fixed
 * schema; errors name the file, the line and the valid choices. */
#include <errno.h>
#include <fnmatch.h>
#include <libfyaml.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/check.h"
#include "formats/mx_spec.h"
#include "io/fsutil.h"
#include "mxq/recipe.h"

const char *mxq_algo_name(mxq_algo_kind kind)
{
    switch (kind) {
    case MXQ_ALGO_SMOOTHQUANT: return "smoothquant";
    case MXQ_ALGO_AWQ: return "awq";
    case MXQ_ALGO_GPTQ: return "gptq";
    }
    return "?";
}

typedef struct {
    mxq_ctx *ctx;
    const char *file;
} reader;

/* 1-based line of a node: a scalar's own; a collection's that of its first
 * scalar (libfyaml marks only scalars); 0 for an empty collection. */
static int node_line(struct fy_node *node)
{
    void *iter = NULL;
    if (node && fy_node_is_mapping(node)) {
        struct fy_node_pair *first = fy_node_mapping_iterate(node, &iter);
        return first ? node_line(fy_node_pair_key(first)) : 0;
    }
    if (node && fy_node_is_sequence(node))
        return node_line(fy_node_sequence_iterate(node, &iter));
    struct fy_token *tok = node ? fy_node_get_scalar_token(node) : NULL;
    const struct fy_mark *mark = tok ? fy_token_start_mark(tok) : NULL;
    return mark ? mark->line + 1 : 0;
}

#define RFAIL(r, line, ...)                                                                     \
    do {                                                                                        \
        char msg_[512];                                                                         \
        snprintf(msg_, sizeof(msg_), __VA_ARGS__);                                              \
        mxq_error_set((r)->ctx, MXQ_ERR_FORMAT, __FILE__, __LINE__, "%s:%d: %s", (r)->file, (line), msg_); \
        status = MXQ_ERR_FORMAT;                                                                \
        goto fail;                                                                              \
    } while (0)

/* NUL-terminated scalar text owned by the document, or NULL for a
 * collection. */
static const char *scalar(struct fy_node *node)
{
    return node && fy_node_is_scalar(node) ? fy_node_get_scalar0(node) : NULL;
}

static mxq_status get_int(reader *r, struct fy_node *value, int key_line, const char *key, long lo, long hi, int *out)
{
    mxq_status status = MXQ_OK;
    const char *s = scalar(value);
    char *end = NULL;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || !*s || *end || v < lo || v > hi)
        RFAIL(r, value ? node_line(value) : key_line, "'%s' must be an integer in %ld..%ld, got '%s'", key, lo, hi,
              s ? s : "(not a scalar)");
    *out = (int)v;
fail:
    return status;
}

static mxq_status get_double(reader *r, struct fy_node *value, int key_line, const char *key, double lo, double hi,
                             double *out)
{
    mxq_status status = MXQ_OK;
    const char *s = scalar(value);
    char *end = NULL;
    double v = s ? strtod(s, &end) : 0;
    if (!s || !*s || *end || !isfinite(v) || v < lo || v > hi)
        RFAIL(r, value ? node_line(value) : key_line, "'%s' must be a number in [%g, %g], got '%s'", key, lo, hi,
              s ? s : "(not a scalar)");
    *out = v;
fail:
    return status;
}

static mxq_status get_bool(reader *r, struct fy_node *value, int key_line, const char *key, int *out)
{
    mxq_status status = MXQ_OK;
    const char *s = scalar(value);
    if (s && (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 || strcmp(s, "yes") == 0))
        *out = 1;
    else if (s && (strcmp(s, "false") == 0 || strcmp(s, "False") == 0 || strcmp(s, "no") == 0))
        *out = 0;
    else
        RFAIL(r, value ? node_line(value) : key_line, "'%s' must be true or false, got '%s'", key,
              s ? s : "(not a scalar)");
fail:
    return status;
}

/* A mapping whose keys must come from `valid` (space-separated). An empty
 * or null value is an empty mapping. */
static mxq_status check_mapping(reader *r, struct fy_node *node, int line, const char *what, const char *valid)
{
    mxq_status status = MXQ_OK;
    if (!node || (fy_node_is_scalar(node) && (!scalar(node) || !*scalar(node) || strcmp(scalar(node), "null") == 0 ||
                                             strcmp(scalar(node), "~") == 0)))
        return MXQ_OK;
    if (!fy_node_is_mapping(node))
        RFAIL(r, line, "'%s' must be a mapping of {%s}", what, valid);
    void *it = NULL;
    struct fy_node_pair *pair;
    while ((pair = fy_node_mapping_iterate(node, &it)) != NULL) {
        struct fy_node *key = fy_node_pair_key(pair);
        const char *k = scalar(key);
        char padded[300];
        snprintf(padded, sizeof(padded), " %s ", k ? k : "");
        char valid_padded[300];
        snprintf(valid_padded, sizeof(valid_padded), " %s ", valid);
        if (!k || !strstr(valid_padded, padded))
            RFAIL(r, node_line(key), "unknown key '%s' in %s (valid: %s)", k ? k : "?", what, valid);
    }
fail:
    return status;
}

/* Iterate the pairs of a mapping (nothing for a scalar or null). */
#define FOR_PAIRS(node, pair)                                                                       \
    for (void *iter_##pair = NULL, *once_##pair = (void *)1; once_##pair; once_##pair = NULL)       \
        for (struct fy_node_pair *pair;                                                             \
             (node) && fy_node_is_mapping(node) && (pair = fy_node_mapping_iterate((node), &iter_##pair)) != NULL;)

static mxq_status parse_format_spec(reader *r, struct fy_node *node, int line, const char *what, int *has,
                                    mxq_mx_spec *spec)
{
    mxq_status status = MXQ_OK;
    *has = 0;
    mxq_mx_spec_default(spec);
    const char *s = node ? scalar(node) : NULL;
    if (!node || (s && (strcmp(s, "none") == 0 || !*s || strcmp(s, "null") == 0)))
        return MXQ_OK; /* not quantized */
    if (!fy_node_is_mapping(node))
        RFAIL(r, line, "'%s' must be none or a mapping of {format block rounding}", what);
    int seen_format = 0;
    FOR_PAIRS(node, pair1)
    {
        struct fy_node *key = fy_node_pair_key(pair1), *value = fy_node_pair_value(pair1);
        const char *k = scalar(key);
        char where[300];
        snprintf(where, sizeof(where), "%s:%d", r->file, node_line(value) ? node_line(value) : node_line(key));
        CALL(r->ctx, mxq_mx_spec_set_field(r->ctx, spec, k, scalar(value), where, what));
        seen_format |= k && strcmp(k, "format") == 0;
    }
    if (!seen_format)
        RFAIL(r, line, "%s needs a 'format' (one of: none %s)", what, mxq_format_names());
    *has = spec->format != NULL;
fail:
    return status;
}

/* The options of an awq step (defaults first). */
static mxq_status parse_awq(reader *r, struct fy_node *value, int line, mxq_algo_step *step)
{
    mxq_status status = MXQ_OK;
    step->kind = MXQ_ALGO_AWQ;
    step->awq = (mxq_awq_options){20, 1, 20, 0.5, 128};
    CALL(r->ctx, check_mapping(r, value, line, "awq", "grid clip clip_grid max_shrink sample_rows"));
    FOR_PAIRS(value, pair3)
    {
        struct fy_node *kn = fy_node_pair_key(pair3), *v = fy_node_pair_value(pair3);
        const char *k = scalar(kn);
        if (!k)
            continue;
        if (strcmp(k, "grid") == 0)
            CALL(r->ctx, get_int(r, v, node_line(kn), "grid", 1, 1000, &step->awq.grid));
        else if (strcmp(k, "clip") == 0)
            CALL(r->ctx, get_bool(r, v, node_line(kn), "clip", &step->awq.clip));
        else if (strcmp(k, "clip_grid") == 0)
            CALL(r->ctx, get_int(r, v, node_line(kn), "clip_grid", 1, 1000, &step->awq.clip_grid));
        else if (strcmp(k, "max_shrink") == 0)
            CALL(r->ctx, get_double(r, v, node_line(kn), "max_shrink", 0.0, 0.99, &step->awq.max_shrink));
        else if (strcmp(k, "sample_rows") == 0) {
            CALL(r->ctx, get_int(r, v, node_line(kn), "sample_rows", 0, 1 << 20, &step->awq.sample_rows));
            /* a handful of rows makes the search's estimate noise (measured:
             * 1 row made AWQ 11.6% worse than no scaling) */
            if (step->awq.sample_rows > 0 && step->awq.sample_rows < 32)
                RFAIL(r, node_line(v), "'sample_rows' must be 0 (every row) or at least 32, got %d",
                      step->awq.sample_rows);
        }
    }
fail:
    return status;
}

static mxq_status parse_algorithm(reader *r, struct fy_node *item, mxq_recipe *recipe)
{
    mxq_status status = MXQ_OK;
    int line = node_line(item);
    if (!fy_node_is_mapping(item) || fy_node_mapping_item_count(item) != 1)
        RFAIL(r, line, "each entry of 'algorithms' must be one of '- smoothquant: {...}', '- awq: {...}', "
                       "'- gptq: {...}'");
    struct fy_node_pair *pair = fy_node_mapping_get_by_index(item, 0);
    struct fy_node *key = fy_node_pair_key(pair), *value = fy_node_pair_value(pair);
    const char *name = scalar(key);
    line = node_line(key);
    if (recipe->n_steps >= MXQ_RECIPE_MAX_STEPS)
        RFAIL(r, line, "too many algorithms (each of smoothquant, awq, gptq may appear once)");
    mxq_algo_step *step = &recipe->steps[recipe->n_steps];
    memset(step, 0, sizeof(*step));
    if (name && strcmp(name, "smoothquant") == 0) {
        step->kind = MXQ_ALGO_SMOOTHQUANT;
        step->smoothquant.alpha = 0.5;
        CALL(r->ctx, check_mapping(r, value, line, "smoothquant", "alpha"));
        FOR_PAIRS(value, pair2)
        {
            struct fy_node *kn = fy_node_pair_key(pair2), *v = fy_node_pair_value(pair2);
            const char *k = scalar(kn);
            if (!k)
                continue;
            if (strcmp(k, "alpha") == 0)
                CALL(r->ctx, get_double(r, v, node_line(kn), "alpha", 0.0, 1.0, &step->smoothquant.alpha));
        }
    } else if (name && strcmp(name, "awq") == 0) {
        CALL(r->ctx, parse_awq(r, value, line, step));
    } else if (name && strcmp(name, "gptq") == 0) {
        step->kind = MXQ_ALGO_GPTQ;
        mxq_gptq_defaults(&step->gptq);
        CALL(r->ctx, check_mapping(r, value, line, "gptq", "block microblock damp act_order"));
        FOR_PAIRS(value, pair4)
        {
            struct fy_node *kn = fy_node_pair_key(pair4), *v = fy_node_pair_value(pair4);
            const char *k = scalar(kn);
            if (!k)
                continue;
            if (strcmp(k, "block") == 0)
                CALL(r->ctx, get_int(r, v, node_line(kn), "block", 1, 1 << 20, &step->gptq.lazy_block));
            else if (strcmp(k, "microblock") == 0)
                CALL(r->ctx, get_int(r, v, node_line(kn), "microblock", 1, 1 << 20, &step->gptq.microblock));
            else if (strcmp(k, "damp") == 0)
                CALL(r->ctx, get_double(r, v, node_line(kn), "damp", 0.0, 1e6, &step->gptq.damp));
            else if (strcmp(k, "act_order") == 0)
                CALL(r->ctx, get_bool(r, v, node_line(kn), "act_order", &step->gptq.act_order));
        }
    } else {
        RFAIL(r, line, "unknown algorithm '%s' (valid: smoothquant awq gptq)", name ? name : "?");
    }
    for (int i = 0; i < recipe->n_steps; i++)
        if (recipe->steps[i].kind == step->kind)
            RFAIL(r, line, "algorithm '%s' appears twice", name);
    recipe->n_steps++;
fail:
    return status;
}

static int is_null_scalar(struct fy_node *value)
{
    const char *s = scalar(value);
    return !value || (s && (!*s || strcmp(s, "null") == 0 || strcmp(s, "~") == 0));
}

static mxq_status parse_algorithm_list(reader *r, struct fy_node *value, int line, mxq_recipe *recipe, int *gptq_line)
{
    mxq_status status = MXQ_OK;
    if (is_null_scalar(value))
        return MXQ_OK;
    if (!fy_node_is_sequence(value))
        RFAIL(r, line, "'algorithms' must be a list ([] for round-to-nearest)");
    void *it = NULL;
    struct fy_node *item;
    while ((item = fy_node_sequence_iterate(value, &it)) != NULL) {
        CALL(r->ctx, parse_algorithm(r, item, recipe));
        if (recipe->steps[recipe->n_steps - 1].kind == MXQ_ALGO_GPTQ)
            *gptq_line = node_line(fy_node_pair_key(fy_node_mapping_get_by_index(item, 0)));
    }
fail:
    return status;
}

static mxq_status parse_calibration(reader *r, struct fy_node *value, int line, mxq_recipe *recipe)
{
    mxq_status status = MXQ_OK;
    CALL(r->ctx, check_mapping(r, value, line, "calibration", "samples mode"));
    FOR_PAIRS(value, pair6)
    {
        struct fy_node *ckey = fy_node_pair_key(pair6), *cval = fy_node_pair_value(pair6);
        const char *ck = scalar(ckey);
        if (ck && strcmp(ck, "samples") == 0) {
            CALL(r->ctx, get_int(r, cval, node_line(ckey), "samples", 1, 1 << 24, &recipe->calib_samples));
        } else if (ck && strcmp(ck, "mode") == 0) {
            const char *m = scalar(cval);
            if (m && strcmp(m, "fp") == 0)
                recipe->calib_mode = MXQ_CALIB_FP;
            else if (m && strcmp(m, "sequential") == 0)
                recipe->calib_mode = MXQ_CALIB_SEQUENTIAL;
            else
                RFAIL(r, node_line(cval), "unknown calibration mode '%s' (valid: fp sequential)", m ? m : "?");
        }
    }
fail:
    return status;
}

static mxq_status parse_exclude(reader *r, struct fy_node *value, int line, mxq_recipe *recipe)
{
    mxq_status status = MXQ_OK;
    if (is_null_scalar(value))
        return MXQ_OK;
    if (!fy_node_is_sequence(value))
        RFAIL(r, line, "'exclude' must be a list of tensor-name patterns");
    void *it = NULL;
    struct fy_node *item;
    while ((item = fy_node_sequence_iterate(value, &it)) != NULL) {
        const char *pattern = scalar(item);
        if (!pattern || !*pattern)
            RFAIL(r, node_line(item) ? node_line(item) : line, "'exclude' entries must be name patterns");
        if (recipe->n_exclude >= MXQ_RECIPE_MAX_EXCLUDE)
            RFAIL(r, node_line(item), "too many exclude patterns (at most %d)", MXQ_RECIPE_MAX_EXCLUDE);
        recipe->exclude[recipe->n_exclude] = strdup(pattern);
        CHECK_ALLOC(r->ctx, recipe->exclude[recipe->n_exclude], strlen(pattern) + 1, "a pattern");
        recipe->n_exclude++;
    }
fail:
    return status;
}

/* What no single entry can tell: weights present, algorithm order, GPTQ's
 * block sizes against the weight format, no SmoothQuant with AWQ. */
static mxq_status check_recipe(reader *r, const mxq_recipe *recipe, int weights_seen, int weights_line, int gptq_line)
{
    mxq_status status = MXQ_OK;
    int has_sq = 0, has_awq = 0;
    if (!weights_seen)
        RFAIL(r, 1, "the recipe needs a 'weights' entry (a format, or none)");
    if (recipe->n_steps > 0 && !recipe->has_weights)
        RFAIL(r, weights_line, "algorithms need a weight format, but weights is none");
    for (int i = 0; i < recipe->n_steps; i++) {
        has_sq |= recipe->steps[i].kind == MXQ_ALGO_SMOOTHQUANT;
        has_awq |= recipe->steps[i].kind == MXQ_ALGO_AWQ;
        if (recipe->steps[i].kind != MXQ_ALGO_GPTQ)
            continue;
        if (i != recipe->n_steps - 1)
            RFAIL(r, gptq_line, "gptq must be the last algorithm (it runs on the already smoothed weights)");
        if (mxq_gptq_check(r->ctx, &recipe->steps[i].gptq, &recipe->weights) != MXQ_OK) {
            char msg[512];
            snprintf(msg, sizeof(msg), "%s", mxq_error_message(r->ctx));
            mxq_error_clear(r->ctx);
            RFAIL(r, gptq_line, "%s", msg);
        }
    }
    if (has_sq && has_awq)
        RFAIL(r, 1, "smoothquant and awq cannot be combined (both rescale the same channels); pick one");
fail:
    return status;
}

static mxq_status parse_document(reader *r, struct fy_node *root, mxq_recipe *recipe)
{
    mxq_status status = MXQ_OK;
    recipe->calib_samples = 128;
    recipe->calib_mode = MXQ_CALIB_FP;
    if (!root || !fy_node_is_mapping(root))
        RFAIL(r, 1, "a recipe is a mapping with keys weights, activations, algorithms, calibration, exclude");
    CALL(r->ctx, check_mapping(r, root, 1, "the recipe", "weights activations algorithms calibration exclude"));
    int weights_seen = 0, weights_line = 1, gptq_line = 0;
    FOR_PAIRS(root, pair5)
    {
        struct fy_node *key = fy_node_pair_key(pair5), *value = fy_node_pair_value(pair5);
        const char *k = scalar(key);
        int line = node_line(key);
        if (k && strcmp(k, "weights") == 0) {
            weights_seen = 1;
            weights_line = line;
            CALL(r->ctx, parse_format_spec(r, value, line, "weights", &recipe->has_weights, &recipe->weights));
        } else if (k && strcmp(k, "activations") == 0) {
            CALL(r->ctx, parse_format_spec(r, value, line, "activations", &recipe->has_acts, &recipe->acts));
        } else if (k && strcmp(k, "algorithms") == 0) {
            CALL(r->ctx, parse_algorithm_list(r, value, line, recipe, &gptq_line));
        } else if (k && strcmp(k, "calibration") == 0) {
            CALL(r->ctx, parse_calibration(r, value, line, recipe));
        } else if (k && strcmp(k, "exclude") == 0) {
            CALL(r->ctx, parse_exclude(r, value, line, recipe));
        }
    }
    CALL(r->ctx, check_recipe(r, recipe, weights_seen, weights_line, gptq_line));
fail:
    return status;
}

/* libfyaml reports "<memory-@0x...>:3:5: error: ..." for text parsed from
 * memory; keep "3:5: error: ..." and the first line only. */
static void capture_diag(struct fy_diag *diag, void *user, const char *buf, size_t len)
{
    (void)diag;
    char *out = user;
    if (out[0])
        return; /* the first diagnostic is the cause */
    size_t n = len < 1023 ? len : 1023;
    memcpy(out, buf, n);
    out[n] = '\0';
    out[strcspn(out, "\n")] = '\0';
    char *at = strstr(out, ">:");
    if (out[0] == '<' && at)
        memmove(out, at + 2, strlen(at + 2) + 1);
    char *err = strstr(out, " error: ");
    if (err && strlen(out) + 16 < 1024) {
        memmove(err + 17, err + 8, strlen(err + 8) + 1);
        memcpy(err, " not valid YAML: ", 17);
    }
}

/* Nodes of `node` with every alias expanded, counted up to `budget` (then
 * the count stops: the work is bounded however deep the aliases nest). */
static size_t expanded_nodes(struct fy_node *node, size_t budget)
{
    size_t n = 1;
    if (fy_node_is_alias(node)) {
        struct fy_node *target = fy_node_resolve_alias(node);
        return target ? expanded_nodes(target, budget) : 1;
    }
    void *iter = NULL;
    if (fy_node_is_sequence(node)) {
        for (struct fy_node *item; n <= budget && (item = fy_node_sequence_iterate(node, &iter));)
            n += expanded_nodes(item, budget - n);
    } else if (fy_node_is_mapping(node)) {
        for (struct fy_node_pair *pair; n <= budget && (pair = fy_node_mapping_iterate(node, &iter));) {
            n += expanded_nodes(fy_node_pair_key(pair), budget - n);
            if (n <= budget)
                n += expanded_nodes(fy_node_pair_value(pair), budget - n);
        }
    }
    return n;
}

/* Aliases resolved into copies of their anchors, once the copies are known
 * to stay small: a few hundred bytes of nested aliases ("billion laughs")
 * would otherwise expand to gigabytes inside libfyaml. */
static mxq_status resolve_aliases(mxq_ctx *ctx, struct fy_document *doc, const char *name)
{
    mxq_status status = MXQ_OK;
    enum { MAX_NODES = 10000 }; /* a recipe has a few dozen */
    CHECK(ctx, expanded_nodes(fy_document_root(doc), MAX_NODES) <= MAX_NODES, MXQ_ERR_FORMAT,
          "%s: with its aliases expanded the recipe has more than %d YAML nodes; a recipe has a few dozen", name,
          MAX_NODES);
    CHECK(ctx, fy_document_resolve(doc) == 0, MXQ_ERR_FORMAT, "%s: an alias names no anchor", name);
fail:
    return status;
}

/* The first YAML document of `text`, and whether a second one follows
 * (which the recipe schema does not allow). */
static mxq_status load_single_document(mxq_ctx *ctx, struct fy_parser *parser, const char *name,
                                       const char *diag_text, struct fy_document **doc)
{
    mxq_status status = MXQ_OK;
    *doc = fy_parse_load_document(parser);
    if (!*doc && diag_text[0])
        FAIL(ctx, MXQ_ERR_FORMAT, "%s:%s", name, diag_text);
    CHECK(ctx, *doc != NULL && fy_document_root(*doc) != NULL, MXQ_ERR_FORMAT,
          "%s: the recipe is empty; it needs at least 'weights: {format: ..., block: ...}' (see configs/recipes/)", name);
    struct fy_document *second = fy_parse_load_document(parser);
    if (second) {
        fy_parse_document_destroy(parser, second);
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: holds more than one YAML document ('---'); a recipe is one document", name);
    }
    CHECK(ctx, diag_text[0] == '\0', MXQ_ERR_FORMAT, "%s:%s", name, diag_text);
fail:
    return status;
}

/* Offset of the first byte of `text` that does not continue valid UTF-8,
 * or -1 if all of it is valid. YAML is Unicode text; libfyaml 0.7.12 loops
 * forever on some invalid sequences (found by tests/fuzz/fuzz_recipe), so
 * they are refused before it sees them. */
static long first_invalid_utf8(const unsigned char *text)
{
    const unsigned char *p = text;
    while (*p) {
        int more = *p < 0x80 ? 0 : (*p & 0xe0) == 0xc0 ? 1 : (*p & 0xf0) == 0xe0 ? 2 : (*p & 0xf8) == 0xf0 ? 3 : -1;
        if (more < 0 || (more == 1 && *p < 0xc2) || (more == 3 && *p > 0xf4))
            return p - text;
        unsigned cp = *p & (0x7f >> more);
        for (int i = 1; i <= more; i++) {
            if ((p[i] & 0xc0) != 0x80)
                return p - text;
            cp = cp << 6 | (p[i] & 0x3f);
        }
        /* overlong three- and four-byte forms, surrogates, beyond U+10FFFF */
        if ((more == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (more == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return p - text;
        p += 1 + more;
    }
    return -1;
}

/* Line and column (in characters: UTF-8 continuation bytes do not count)
 * of `at` in `text`, both from 1. */
static void text_position(const char *text, const char *at, int *line, int *column)
{
    *line = 1, *column = 1;
    for (const char *p = text; p < at; p++) {
        if (*p == '\n')
            (*line)++, *column = 1;
        else if (((unsigned char)*p & 0xc0) != 0x80)
            (*column)++;
    }
}

/* What libfyaml must not be given: it misbehaves on some invalid input. */
static mxq_status check_recipe_text(mxq_ctx *ctx, const char *text, const char *name)
{
    mxq_status status = MXQ_OK;
    long bad = first_invalid_utf8((const unsigned char *)text);
    int line, column;
    if (bad >= 0) {
        text_position(text, text + bad, &line, &column);
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: line %d, column %d (byte %ld): not valid UTF-8; a recipe is UTF-8 YAML", name,
             line, column, bad + 1);
    }
    /* YAML never indents with tabs, and libfyaml 0.7.12 crashes freeing a
     * parser that failed on some tab placements (tests/fuzz/fuzz_recipe). */
    const char *tab = strchr(text, '\t');
    if (tab) {
        text_position(text, tab, &line, &column);
        FAIL(ctx, MXQ_ERR_FORMAT, "%s: line %d, column %d: a tab; a recipe is indented and separated with spaces",
             name, line, column);
    }
fail:
    return status;
}

mxq_status mxq_recipe_parse_string(mxq_ctx *ctx, const char *text, const char *name, mxq_recipe *recipe)
{
    mxq_status status = MXQ_OK;
    struct fy_diag *diag = NULL;
    struct fy_parser *parser = NULL;
    struct fy_document *doc = NULL;
    char diag_text[1024] = "";
    memset(recipe, 0, sizeof(*recipe));
    CALL(ctx, check_recipe_text(ctx, text, name));
    struct fy_diag_cfg dcfg;
    fy_diag_cfg_default(&dcfg);
    dcfg.fp = NULL;
    dcfg.output_fn = capture_diag;
    dcfg.user = diag_text;
    dcfg.colorize = false;
    diag = fy_diag_create(&dcfg);
    CHECK_ALLOC(ctx, diag, 1, "the YAML diagnostics");
    /* resolved after loading (resolve_aliases): an alias reads as the value
     * of its anchor, not as its name */
    struct fy_parse_cfg pcfg = {.search_path = NULL, .flags = FYPCF_QUIET, .userdata = NULL, .diag = diag};
    parser = fy_parser_create(&pcfg);
    CHECK_ALLOC(ctx, parser, 1, "the YAML parser");
    CHECK(ctx, fy_parser_set_string(parser, text, FY_NT) == 0, MXQ_ERR_NOMEM, "cannot start parsing '%s'", name);
    CALL(ctx, load_single_document(ctx, parser, name, diag_text, &doc));
    CALL(ctx, resolve_aliases(ctx, doc, name));
    reader r = {ctx, name};
    CALL(ctx, parse_document(&r, fy_document_root(doc), recipe));
fail:
    if (doc)
        fy_parse_document_destroy(parser, doc);
    if (parser)
        fy_parser_destroy(parser);
    if (diag)
        fy_diag_destroy(diag);
    if (status != MXQ_OK)
        mxq_recipe_free(recipe);
    return status;
}

mxq_status mxq_recipe_load(mxq_ctx *ctx, const char *path, mxq_recipe *recipe)
{
    mxq_status status = MXQ_OK;
    char *text = NULL;
    size_t size = 0;
    memset(recipe, 0, sizeof(*recipe));
    CALL(ctx, mxq_input_read_all(ctx, path, "recipe", 1 << 20, &text, &size));
    /* A binary or UTF-16 file would otherwise read as an empty or odd recipe. */
    CHECK(ctx, memchr(text, '\0', size) == NULL, MXQ_ERR_FORMAT,
          "%s: not a text file (it holds NUL bytes); a recipe is UTF-8 YAML", path);
    CALL(ctx, mxq_recipe_parse_string(ctx, text, path, recipe));
fail:
    free(text);
    return status;
}

void mxq_recipe_free(mxq_recipe *recipe)
{
    for (int i = 0; i < recipe->n_exclude; i++)
        free(recipe->exclude[i]);
    recipe->n_exclude = 0;
}

int mxq_recipe_excludes(const mxq_recipe *recipe, const char *tensor_name)
{
    for (int i = 0; i < recipe->n_exclude; i++)
        if (fnmatch(recipe->exclude[i], tensor_name, 0) == 0)
            return 1;
    return 0;
}
