#include "fuzz_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir_buf[256];
static char path_buf[512];

/* The directory and what the targets wrote in it go when the fuzzer exits. */
static void remove_dir(void)
{
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir_buf);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir_buf);
}

const char *fuzz_dir(void)
{
    if (!dir_buf[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(dir_buf, sizeof(dir_buf), "%s/mxq-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(dir_buf)) {
            perror("mkdtemp");
            abort();
        }
        atexit(remove_dir);
    }
    return dir_buf;
}

const char *fuzz_path(const char *name)
{
    snprintf(path_buf, sizeof(path_buf), "%s/%s", fuzz_dir(), name);
    return path_buf;
}

void fuzz_write(const char *name, const void *data, size_t size)
{
    FILE *f = fopen(fuzz_path(name), "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) {
        perror(fuzz_path(name));
        abort();
    }
}

mxq_ctx *fuzz_ctx(void)
{
    mxq_ctx *ctx = NULL;
    if (mxq_ctx_create(&ctx) != MXQ_OK)
        abort();
    static FILE *devnull;
    if (!devnull && !(devnull = fopen("/dev/null", "w")))
        abort();
    mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR);
    mxq_ctx_set_log_stream(ctx, devnull);
    return ctx;
}
