/* Helpers shared by the cmocka test programs. */
#ifndef MXQ_TESTUTIL_H
#define MXQ_TESTUTIL_H

#include <hdf5.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Directory holding the bundled test data (data/ of the repository):
 * $MXQ_DATA_DIR, set by meson for every test. */
const char *tu_data_dir(void);
/* "<data dir>/<relative>", a new string each call (never freed). */
const char *tu_data_path(const char *relative);

/* Read a whole dataset converted to `mem_type`; returns malloc'd data and the
 * dims (up to 4). Fails the current test on any error. */
void *tu_h5_read(hid_t file, const char *name, hid_t mem_type, size_t elem_size, int *rank, size_t dims[4]);

/* Bitwise float equality where both-NaN counts as equal and +0 == -0. */
int tu_same_float(float a, float b);

/* Write dataset `name` (stored as file_type, given as mem_type) into an open
 * file. Fails the current test on any error. */
void tu_h5_write(hid_t file, const char *name, hid_t file_type, hid_t mem_type, int rank, const hsize_t *dims,
                 const void *data);

/* Deterministic xorshift generator for reproducible random tests. */
typedef struct {
    uint64_t s;
} tu_rng;
uint64_t tu_rng_next(tu_rng *rng);
double tu_rng_uniform(tu_rng *rng);  /* [0, 1) */
double tu_rng_normal(tu_rng *rng);

/* A scratch directory unique to this test process, created on first use. */
const char *tu_scratch_dir(void);
/* "<scratch dir>/<printf(fmt, ...)>", a new string (never freed). */
const char *tu_scratch_path(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Run a program (argv[0] is looked up in PATH), capturing stdout and stderr. */
typedef struct {
    int exit_code; /* 128 + signal if killed */
    char out[16384];
    char err[16384];
} tu_run_result;
void tu_run(const char *const *argv, tu_run_result *result);
/* Run the n NULL-terminated argv lists, at most `parallel` (<= 16) at a
 * time; results[i] belongs to argvs[i]. */
void tu_run_all(const char *const *const *argvs, size_t n, int parallel, tu_run_result *results);
/* tu_run of `prefix` (n_prefix words) followed by the NULL-terminated
 * arguments in `rest`. */
void tu_run_prefixed(const char *const *prefix, size_t n_prefix, va_list rest, tu_run_result *result);

/* tu_run in two halves, for a test that acts on a program while it runs
 * (kills it, say): start it (its output to files tagged `slot`, 100 and
 * up are free), then wait for it and collect its result. */
int tu_start(const char *const *argv, int slot);
void tu_finish(int pid, int slot, tu_run_result *result);

/* 1 if files dir_a/name and dir_b/name hold the same bytes. */
int tu_same_file(const char *dir_a, const char *dir_b, const char *name);
/* The JSON header of safetensors file `path` (json_decref it) and where its
 * data starts (8 + header length). */
struct json_t *tu_safetensors_header(const char *path, size_t *data_start);

/* Overwrite `size` bytes of tensor `tensor` at byte `offset` of its data in
 * the safetensors file dir/file (its header read here, not through mxq). */
void tu_poke_tensor(const char *dir, const char *file, const char *tensor, size_t offset, const void *bytes,
                    size_t size);

/* Read a whole file into a new NUL-terminated buffer; *size gets its length. */
char *tu_read_file(const char *path, size_t *size);
void tu_write_file(const char *path, const void *data, size_t size);

/* A copy of text file `path` as <scratch>/<name>, with its first `from`
 * replaced by `to`; fails the test if `from` is absent. */
const char *tu_edited_copy(const char *path, const char *from, const char *to, const char *name);
/* The bundled calib.h5 repeated `copies` times, as <scratch>/calib<N>.h5
 * (written once per process). */
const char *tu_tiled_calib(int copies);
/* configs/recipes/<recipe> with `calibration: {samples: samples, mode: mode}`
 * (mode NULL keeps the recipe's), as <scratch>/<name>. */
const char *tu_recipe_variant(const char *recipe, int samples, const char *mode, const char *name);

#endif
