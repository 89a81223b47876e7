/* Helpers shared by the cmocka test programs. */
#ifndef MXQ_TESTUTIL_H
#define MXQ_TESTUTIL_H

#include <hdf5.h>
#include <stddef.h>
#include <stdint.h>

/* Directory holding the bundled test data (data/ of the repository):
 * $MXQ_DATA_DIR, set by meson for every test. */
const char *tu_data_dir(void);
/* "<data dir>/<relative>" in a static buffer (one at a time). */
const char *tu_data_path(const char *relative);

/* Read a whole dataset converted to `mem_type`; returns malloc'd data and the
 * dims (up to 4). Fails the current test on any error. */
void *tu_h5_read(hid_t file, const char *name, hid_t mem_type, size_t elem_size, int *rank, size_t dims[4]);

/* Bitwise float equality where both-NaN counts as equal and +0 == -0. */
int tu_same_float(float a, float b);

/* Deterministic xorshift generator for reproducible random tests. */
typedef struct {
    uint64_t s;
} tu_rng;
uint64_t tu_rng_next(tu_rng *rng);
double tu_rng_uniform(tu_rng *rng);  /* [0, 1) */
double tu_rng_normal(tu_rng *rng);

/* A scratch directory unique to this test process, created on first use. */
const char *tu_scratch_dir(void);

#endif
