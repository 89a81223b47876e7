#include "testutil.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

const char *tu_data_dir(void)
{
    const char *dir = getenv("MXQ_DATA_DIR");
    if (!dir) {
        fail_msg("MXQ_DATA_DIR is not set (meson sets it; run tests with meson test)");
    }
    return dir;
}

const char *tu_data_path(const char *relative)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", tu_data_dir(), relative);
    char *copy = strdup(path); /* lives until the test process ends */
    assert_non_null(copy);
    return copy;
}

void *tu_h5_read(hid_t file, const char *name, hid_t mem_type, size_t elem_size, int *rank, size_t dims[4])
{
    hid_t dset = H5Dopen2(file, name, H5P_DEFAULT);
    if (dset < 0)
        fail_msg("cannot open dataset %s", name);
    hid_t space = H5Dget_space(dset);
    hsize_t hd[4] = {0};
    int r = H5Sget_simple_extent_ndims(space);
    assert_true(r >= 0 && r <= 4);
    H5Sget_simple_extent_dims(space, hd, NULL);
    size_t count = 1;
    for (int i = 0; i < r; i++) {
        dims[i] = (size_t)hd[i];
        count *= (size_t)hd[i];
    }
    void *buf = malloc(count * elem_size + 1);
    assert_non_null(buf);
    if (H5Dread(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0)
        fail_msg("cannot read dataset %s", name);
    H5Sclose(space);
    H5Dclose(dset);
    *rank = r;
    return buf;
}

int tu_same_float(float a, float b)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    if (a == 0.0f && b == 0.0f)
        return 1;
    uint32_t ua, ub;
    memcpy(&ua, &a, 4);
    memcpy(&ub, &b, 4);
    return ua == ub;
}

uint64_t tu_rng_next(tu_rng *rng)
{
    uint64_t x = rng->s ? rng->s : 0x9E3779B97F4A7C15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng->s = x;
    return x;
}

double tu_rng_uniform(tu_rng *rng)
{
    return (double)(tu_rng_next(rng) >> 11) * 0x1.0p-53;
}

double tu_rng_normal(tu_rng *rng)
{
    double u1 = tu_rng_uniform(rng), u2 = tu_rng_uniform(rng);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static char scratch_dir[256];
static pid_t scratch_owner;

/* The scratch directory goes when the test program ends (not in a forked
 * child), unless MXQ_KEEP_SCRATCH is set, for looking at a failure. */
static void remove_scratch(void)
{
    if (getpid() != scratch_owner || getenv("MXQ_KEEP_SCRATCH"))
        return;
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf --one-file-system '%s'", scratch_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "# could not remove %s\n", scratch_dir);
}

const char *tu_scratch_dir(void)
{
    if (!scratch_dir[0]) {
        const char *base = getenv("MXQ_SCRATCH_DIR");
        snprintf(scratch_dir, sizeof(scratch_dir), "%s/mxq-test-%ld", base ? base : "/tmp", (long)getpid());
        mkdir(scratch_dir, 0755);
        scratch_owner = getpid();
        atexit(remove_scratch);
    }
    return scratch_dir;
}

const char *tu_scratch_path(const char *fmt, ...)
{
    char name[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    char *p = malloc(1024);
    assert_non_null(p);
    snprintf(p, 1024, "%s/%s", tu_scratch_dir(), name);
    return p;
}

static void slurp(const char *path, char *buf, size_t size)
{
    buf[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (!f)
        return;
    size_t n = fread(buf, 1, size - 1, f);
    buf[n] = '\0';
    fclose(f);
}

/* Start argv with stdout/stderr to files tagged `slot`. */
static pid_t spawn(const char *const *argv, int slot)
{
    char out_path[512], err_path[512];
    snprintf(out_path, sizeof(out_path), "%s/run_stdout_%d.txt", tu_scratch_dir(), slot);
    snprintf(err_path, sizeof(err_path), "%s/run_stderr_%d.txt", tu_scratch_dir(), slot);
    fflush(stdout);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fo = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fi = open("/dev/null", O_RDONLY);
        dup2(fi, 0);
        dup2(fo, 1);
        dup2(fe, 2);
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static void collect(pid_t pid, int slot, tu_run_result *r)
{
    char out_path[512], err_path[512];
    int wstatus = 0;
    waitpid(pid, &wstatus, 0);
    r->exit_code = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
    snprintf(out_path, sizeof(out_path), "%s/run_stdout_%d.txt", tu_scratch_dir(), slot);
    snprintf(err_path, sizeof(err_path), "%s/run_stderr_%d.txt", tu_scratch_dir(), slot);
    slurp(out_path, r->out, sizeof(r->out));
    slurp(err_path, r->err, sizeof(r->err));
}

int tu_start(const char *const *argv, int slot) { return (int)spawn(argv, slot); }

void tu_finish(int pid, int slot, tu_run_result *r) { collect((pid_t)pid, slot, r); }

void tu_run(const char *const *argv, tu_run_result *r)
{
    collect(spawn(argv, 0), 0, r);
}

void tu_run_all(const char *const *const *argvs, size_t n, int parallel, tu_run_result *results)
{
    pid_t pids[16];
    assert_true(parallel >= 1 && parallel <= 16);
    for (size_t first = 0; first < n; first += (size_t)parallel) {
        size_t count = n - first < (size_t)parallel ? n - first : (size_t)parallel;
        for (size_t i = 0; i < count; i++)
            pids[i] = spawn(argvs[first + i], (int)i + 1);
        for (size_t i = 0; i < count; i++)
            collect(pids[i], (int)i + 1, &results[first + i]);
    }
}

char *tu_read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    if (size)
        *size = (size_t)n;
    return buf;
}

void tu_write_file(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        fail_msg("cannot create %s", path);
    assert_int_equal(fwrite(data, 1, size, f), size);
    fclose(f);
}

void tu_run_prefixed(const char *const *prefix, size_t n_prefix, va_list rest, tu_run_result *result)
{
    const char *argv[64];
    size_t argc = 0;
    for (; argc < n_prefix && argc < 63; argc++)
        argv[argc] = prefix[argc];
    for (const char *a = va_arg(rest, const char *); a && argc < 63; a = va_arg(rest, const char *))
        argv[argc++] = a;
    argv[argc] = NULL;
    tu_run(argv, result);
}

void tu_h5_write(hid_t file, const char *name, hid_t file_type, hid_t mem_type, int rank, const hsize_t *dims,
                 const void *data)
{
    hid_t space = H5Screate_simple(rank, dims, NULL);
    assert_true(space >= 0);
    hid_t d = H5Dcreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(d >= 0);
    assert_true(H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    H5Dclose(d);
    H5Sclose(space);
}

int tu_same_file(const char *dir_a, const char *dir_b, const char *name)
{
    char pa[1024], pb[1024];
    size_t na, nb;
    snprintf(pa, sizeof(pa), "%s/%s", dir_a, name);
    snprintf(pb, sizeof(pb), "%s/%s", dir_b, name);
    char *da = tu_read_file(pa, &na), *db = tu_read_file(pb, &nb);
    const int same = na == nb && memcmp(da, db, na) == 0;
    free(da);
    free(db);
    return same;
}

json_t *tu_safetensors_header(const char *path, size_t *data_start)
{
    size_t n;
    char *data = tu_read_file(path, &n);
    uint64_t hlen = 0;
    assert_true(n >= 8);
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | (unsigned char)data[i];
    assert_true(hlen <= n - 8);
    json_t *header = json_loadb(data + 8, hlen, 0, NULL);
    assert_non_null(header);
    *data_start = 8 + hlen;
    free(data);
    return header;
}

void tu_poke_tensor(const char *dir, const char *file, const char *tensor, size_t offset, const void *bytes,
                    size_t size)
{
    char path[1024];
    size_t n, start;
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    json_t *header = tu_safetensors_header(path, &start);
    json_t *offsets = json_object_get(json_object_get(header, tensor), "data_offsets");
    assert_non_null(offsets);
    char *data = tu_read_file(path, &n);
    size_t at = start + (size_t)json_integer_value(json_array_get(offsets, 0)) + offset;
    assert_true(at + size <= n);
    memcpy(data + at, bytes, size);
    tu_write_file(path, data, n);
    json_decref(header);
    free(data);
}

const char *tu_tiled_calib(int copies)
{
    const char *path = tu_scratch_path("calib%d.h5", copies * 128);
    if (access(path, F_OK) == 0)
        return path;
    hid_t in = H5Fopen(tu_data_path("stories260K/calib.h5"), H5F_ACC_RDONLY, H5P_DEFAULT);
    assert_true(in >= 0);
    int rank;
    size_t dims[4];
    int *tokens = tu_h5_read(in, "tokens", H5T_NATIVE_INT32, sizeof(int), &rank, dims);
    H5Fclose(in);
    const size_t n = dims[0] * dims[1];
    int *tiled = malloc((size_t)copies * n * sizeof(int));
    assert_non_null(tiled);
    for (int k = 0; k < copies; k++)
        memcpy(tiled + (size_t)k * n, tokens, n * sizeof(int));
    hid_t out = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t shape[2] = {(hsize_t)copies * dims[0], dims[1]};
    tu_h5_write(out, "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, 2, shape, tiled);
    H5Fclose(out);
    free(tokens);
    free(tiled);
    return path;
}

/* text with the value after `key` (up to the next ',' or '}') replaced */
static char *replace_value(char *text, const char *key, const char *value)
{
    char *p = strstr(text, key);
    assert_non_null(p);
    const char *rest = p + strlen(key) + strcspn(p + strlen(key), ",}");
    size_t len = (size_t)(p - text) + strlen(key) + strlen(value) + strlen(rest) + 1;
    char *out = malloc(len);
    assert_non_null(out);
    snprintf(out, len, "%.*s%s%s%s", (int)(p - text), text, key, value, rest);
    free(text);
    return out;
}

const char *tu_recipe_variant(const char *recipe, int samples, const char *mode, const char *name)
{
    char rel[512], count[32];
    snprintf(rel, sizeof(rel), "../configs/recipes/%s", recipe);
    char *text = tu_read_file(tu_data_path(rel), NULL);
    snprintf(count, sizeof(count), "%d", samples);
    text = replace_value(text, "samples: ", count);
    if (mode)
        text = replace_value(text, "mode: ", mode);
    const char *path = tu_scratch_path("%s", name);
    tu_write_file(path, text, strlen(text));
    free(text);
    return path;
}

const char *tu_edited_copy(const char *path, const char *from, const char *to, const char *name)
{
    char *text = tu_read_file(path, NULL);
    assert_non_null(text);
    char *p = strstr(text, from);
    if (!p)
        fail_msg("'%s' is not in %s", from, path);
    const char *out = tu_scratch_path("%s", name);
    FILE *f = fopen(out, "wb");
    assert_non_null(f);
    fprintf(f, "%.*s%s%s", (int)(p - text), text, to, p + strlen(from));
    assert_int_equal(fclose(f), 0);
    free(text);
    return out;
}
