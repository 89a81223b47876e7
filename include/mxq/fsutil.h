/* File-system helpers: temporary names for all-or-nothing output. */
#ifndef MXQ_FSUTIL_H
#define MXQ_FSUTIL_H

#include "mxq/core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* `<dir>/.<base>.tmp-<pid>` for final path `<dir>/<base>`; free() the result. */
mxq_status mxq_temp_path_for(mxq_ctx *ctx, const char *final_path, char **temp_path);

/* Fails with a message naming `path` and the reason (missing directory,
 * permission, is a directory, ...) if a file cannot be created there. The
 * probe file is removed again. */
mxq_status mxq_check_writable(mxq_ctx *ctx, const char *path, const char *what);

/* rename(2) with an error naming both paths. */
mxq_status mxq_rename(mxq_ctx *ctx, const char *from, const char *to);

/* Write a jansson value as indented JSON (doubles with 17 significant
 * digits, so they read back exactly) under a temporary name, then rename. */
struct json_t;
mxq_status mxq_json_write_atomic(mxq_ctx *ctx, const struct json_t *value, const char *path);

#ifdef __cplusplus
}
#endif

#endif
