#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "mxq/fsutil.h"

mxq_status mxq_temp_path_for(mxq_ctx *ctx, const char *final_path, char **temp_path)
{
    mxq_status status = MXQ_OK;
    char *out = NULL;
    const char *slash = strrchr(final_path, '/');
    size_t dir_len = slash ? (size_t)(slash - final_path) + 1 : 0;
    const char *base = final_path + dir_len;
    CHECK(ctx, base[0] != '\0', MXQ_ERR_ARG, "output path '%s' names a directory, not a file", final_path);
    size_t len = strlen(final_path) + 64;
    out = malloc(len);
    CHECK_ALLOC(ctx, out, len, "a temporary file name");
    snprintf(out, len, "%.*s.%s.tmp-%ld", (int)dir_len, final_path, base, (long)getpid());
    *temp_path = out;
    return MXQ_OK;
fail:
    free(out);
    return status;
}

mxq_status mxq_check_writable(mxq_ctx *ctx, const char *path, const char *what)
{
    mxq_status status = MXQ_OK;
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        FAIL(ctx, MXQ_ERR_IO, "cannot write %s '%s': it is a directory", what, path);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0 && errno == EEXIST) {
        /* An existing file is fine if we may write it; do not clobber it here. */
        CHECK(ctx, access(path, W_OK) == 0, MXQ_ERR_IO, "cannot write %s '%s': %s", what, path,
              strerror(errno));
        return MXQ_OK;
    }
    CHECK(ctx, fd >= 0, MXQ_ERR_IO, "cannot write %s '%s': %s", what, path, strerror(errno));
    close(fd);
    unlink(path);
fail:
    return status;
}

mxq_status mxq_rename(mxq_ctx *ctx, const char *from, const char *to)
{
    mxq_status status = MXQ_OK;
    CHECK(ctx, rename(from, to) == 0, MXQ_ERR_IO, "cannot rename '%s' to '%s': %s", from, to, strerror(errno));
fail:
    return status;
}

mxq_status mxq_json_write_atomic(mxq_ctx *ctx, const json_t *value, const char *path)
{
    mxq_status status = MXQ_OK;
    char *temp = NULL;
    CALL(ctx, mxq_check_writable(ctx, path, "output"));
    CALL(ctx, mxq_temp_path_for(ctx, path, &temp));
    CHECK(ctx, json_dump_file(value, temp, JSON_INDENT(2) | JSON_REAL_PRECISION(17)) == 0, MXQ_ERR_IO,
          "cannot write '%s'", temp);
    CALL(ctx, mxq_rename(ctx, temp, path));
fail:
    if (status != MXQ_OK && temp)
        unlink(temp);
    free(temp);
    return status;
}
