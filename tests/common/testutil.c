#include "testutil.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

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
    static char path[4096];
    snprintf(path, sizeof(path), "%s/%s", tu_data_dir(), relative);
    return path;
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

const char *tu_scratch_dir(void)
{
    static char dir[256];
    if (!dir[0]) {
        const char *base = getenv("MXQ_SCRATCH_DIR");
        snprintf(dir, sizeof(dir), "%s/mxq-test-%ld", base ? base : "/tmp", (long)getpid());
        mkdir(dir, 0755);
    }
    return dir;
}
