/* mxq verify DIR: whether a checkpoint is whole and valid, before anyone
 * evaluates or ships it. First the files: every shard the index names
 * exists, and for a checkpoint mxq wrote, has the size and SHA-256 the
 * index records (a flipped byte, a truncated shard, bytes appended after
 * it). Then the content: config.json (format_version, known formats)
 * against the tensors' headers, and every tensor loaded as eval loads it,
 * one layer at a time: shapes, element codes, scale bytes, finite values.
 * The first problem is the error. */
#include <jansson.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "io/fsutil.h"
#include "io/sha256.h"
#include "jobs/jobs_internal.h"
#include "model/lazy.h"
#include "mxq/jobs.h"

/* One shard against what the index records of it (`want`, NULL: nothing). */
static mxq_status check_shard(mxq_ctx *ctx, const char *dir, const char *name, const json_t *want,
                              mxq_verify_result *res)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF], hex[65];
    uint64_t bytes = 0;
    struct stat st;
    mxq_path_join(path, dir, name);
    CHECK(ctx, stat(path, &st) == 0, MXQ_ERR_FORMAT, "%s: shard '%s', named by the index, is missing", dir, name);
    res->shards++;
    res->bytes += (uint64_t)st.st_size;
    if (!want)
        return MXQ_OK;
    const json_int_t recorded = json_integer_value(json_object_get(want, "bytes"));
    const char *sum = json_string_value(json_object_get(want, "sha256"));
    CHECK(ctx, sum && json_is_integer(json_object_get(want, "bytes")), MXQ_ERR_FORMAT,
          "%s/model.safetensors.index.json: metadata.mxq_shards.%s needs 'sha256' and 'bytes'", dir, name);
    CHECK(ctx, (json_int_t)st.st_size == recorded, MXQ_ERR_FORMAT,
          "%s is %lld bytes, the index records %lld: the shard is %s", path, (long long)st.st_size,
          (long long)recorded, (json_int_t)st.st_size < recorded ? "truncated" : "longer than written (bytes appended)");
    CALL(ctx, mxq_sha256_file(ctx, path, "shard", hex, &bytes));
    CHECK(ctx, strcmp(hex, sum) == 0, MXQ_ERR_FORMAT,
          "%s: SHA-256 %s, the index records %s: the shard changed after it was written", path, hex, sum);
    res->checksummed++;
fail:
    return status;
}

/* Every shard of the index, and no checksum of a shard it does not name. */
static mxq_status check_files(mxq_ctx *ctx, const char *dir, mxq_verify_result *res)
{
    mxq_status status = MXQ_OK;
    char path[MXQ_PATH_BUF];
    json_t *index = NULL, *seen = json_object();
    const char *tensor, *name;
    json_t *shard, *digest;
    CHECK_ALLOC(ctx, seen, 1, "the list of shards");
    mxq_path_join(path, dir, "model.safetensors.index.json");
    if (access(path, F_OK) != 0) { /* a single model.safetensors: nothing recorded to compare with */
        struct stat st;
        CHECK(ctx, stat(dir, &st) == 0 && S_ISDIR(st.st_mode), MXQ_ERR_ARG, "'%s' is not a checkpoint directory", dir);
        mxq_path_join(path, dir, "model.safetensors");
        CHECK(ctx, access(path, F_OK) == 0, MXQ_ERR_FORMAT,
              "%s holds neither model.safetensors.index.json nor model.safetensors: no checkpoint", dir);
        CALL(ctx, check_shard(ctx, dir, "model.safetensors", NULL, res));
        goto fail;
    }
    CALL(ctx, mxq_json_read(ctx, path, "checkpoint index", &index));
    const json_t *map = json_object_get(index, "weight_map");
    const json_t *sums = json_object_get(json_object_get(index, "metadata"), "mxq_shards");
    CHECK(ctx, json_is_object(map), MXQ_ERR_FORMAT, "%s: no 'weight_map' object", path);
    json_object_foreach((json_t *)map, tensor, shard)
    {
        const char *file = json_string_value(shard);
        CHECK(ctx, file && !strchr(file, '/'), MXQ_ERR_FORMAT, "%s: weight_map.%s is not a file name", path, tensor);
        if (json_object_get(seen, file))
            continue;
        CHECK(ctx, json_object_set_new(seen, file, json_true()) == 0, MXQ_ERR_NOMEM, "out of memory");
        CALL(ctx, check_shard(ctx, dir, file, sums ? json_object_get(sums, file) : NULL, res));
        CHECK(ctx, !sums || json_object_get(sums, file), MXQ_ERR_FORMAT, "%s: no checksum recorded for shard '%s'",
              path, file);
    }
    json_object_foreach((json_t *)sums, name, digest)
        CHECK(ctx, json_object_get(seen, name), MXQ_ERR_FORMAT,
              "%s: a checksum for shard '%s', which holds no tensor of the weight map", path, name);
fail:
    json_decref(index);
    json_decref(seen);
    return status;
}

/* Every tensor as eval loads it, one layer at a time. */
static mxq_status check_content(mxq_ctx *ctx, const char *dir, mxq_verify_result *res)
{
    mxq_status status = MXQ_OK;
    mxq_model_config cfg;
    mxq_model *model = NULL;
    CALL(ctx, mxq_job_config(ctx, dir, 0, &cfg));
    res->mx = cfg.mx_weights;
    const mxq_model_part part = {0, cfg.n_layers, 1, 1};
    CALL(ctx, mxq_model_load_lazy(ctx, dir, &cfg, &part, 1, 0, &model));
    for (int l = 0; l < cfg.n_layers; l++) {
        CALL_IN(ctx, mxq_model_layer_load(ctx, model, l), "layer %d", l);
        CALL(ctx, mxq_model_layer_unload(ctx, model, l));
        res->layers++;
    }
fail:
    mxq_model_free(model);
    return status;
}

mxq_status mxq_verify(mxq_ctx *ctx, const char *dir, mxq_verify_result *res)
{
    mxq_status status = MXQ_OK;
    memset(res, 0, sizeof(*res));
    CALL(ctx, check_files(ctx, dir, res));
    CALL(ctx, check_content(ctx, dir, res));
fail:
    return status;
}
