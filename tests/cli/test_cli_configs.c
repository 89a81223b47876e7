/* The Slurm job examples in configs/jobs/: each one's settings, given to
 * `mxq quantize --dry-run` with its rank count, its model's config.json
 * (configs/models/) and 128 x 2048 calibration tokens, give a plan that fits
 * its --mem-per-rank, with the peak its comment quotes. */
#include <dirent.h>
#include <hdf5.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "testutil.h"

/* The value of KEY=... (quotes dropped) in an env file's text. */
static void env_value(const char *text, const char *key, char *out, size_t size)
{
    char pattern[64];
    snprintf(pattern, sizeof(pattern), "\n%s=", key);
    const char *p = strstr(text, pattern);
    if (!p)
        fail_msg("no %s= line", key);
    p += strlen(pattern);
    if (*p == '"')
        p++;
    snprintf(out, size, "%.*s", (int)strcspn(p, "\"\n"), p);
}

static const char *calibration(void)
{
    static const char *path;
    if (path)
        return path;
    enum { SEQS = 128, LEN = 2048 };
    int *ids = malloc(sizeof(int) * SEQS * LEN);
    assert_non_null(ids);
    tu_rng rng = {7};
    for (int i = 0; i < SEQS * LEN; i++)
        ids[i] = (int)(tu_rng_next(&rng) % 32000);
    path = tu_scratch_path("calib-128x2048.h5");
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    const hsize_t dims[2] = {SEQS, LEN};
    tu_h5_write(f, "tokens", H5T_STD_I32LE, H5T_NATIVE_INT32, 2, dims, ids);
    H5Fclose(f);
    free(ids);
    return path;
}

/* The largest "peak RSS MB" (last column) of a plan's rank rows. */
static double plan_peak_mb(const char *plan)
{
    double peak = 0;
    for (const char *line = plan; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (*line < '0' || *line > '9')
            continue;
        const char *end = line + strcspn(line, "\n"), *last = end;
        while (last > line && last[-1] != ' ')
            last--;
        peak = atof(last) > peak ? atof(last) : peak;
    }
    return peak;
}

static void check_example(const char *name)
{
    char path[1024], recipe[256], args[256], sbatch[256], model[512], ranks[16], mem[32], quoted[64];
    snprintf(path, sizeof(path), "../configs/jobs/%s.env", name);
    char *text = tu_read_file(tu_data_path(path), NULL);
    assert_non_null(text);
    env_value(text, "MXQ_RECIPE", recipe, sizeof(recipe));
    env_value(text, "MXQ_ARGS", args, sizeof(args));
    env_value(text, "MXQ_SBATCH", sbatch, sizeof(sbatch));
    const char *n = strstr(sbatch, "--ntasks="), *m = strstr(args, "--mem-per-rank ");
    assert_non_null(n);
    assert_non_null(m);
    snprintf(ranks, sizeof(ranks), "%d", atoi(n + strlen("--ntasks=")));
    snprintf(mem, sizeof(mem), "%.*s", (int)strcspn(m + 15, " "), m + 15);
    snprintf(model, sizeof(model), "%s/../configs/models/%s", tu_data_dir(), name);
    snprintf(path, sizeof(path), "%s/../%s", tu_data_dir(), recipe);
    const char *argv[] = {"mpirun", "-n", ranks, getenv("MXQ_BIN"), "quantize", "--dry-run", "--model", model,
                          "--calib", calibration(), "--recipe", path, "--out", tu_scratch_path("%s-out", name),
                          "--mem-per-rank", mem, NULL};
    tu_run_result r;
    tu_run(argv, &r);
    if (r.exit_code != 0)
        fail_msg("%s: the dry-run failed: %.600s", name, r.err);
    const double peak = plan_peak_mb(r.out), limit_mb = atof(mem) * 1024;
    print_message("# %s: %s ranks, peak %.1f MB a rank, --mem-per-rank %s\n", name, ranks, peak, mem);
    assert_true(peak > 0 && peak <= limit_mb);
    snprintf(quoted, sizeof(quoted), "peak RSS %.1f GB", peak / 1000);
    if (!strstr(text, quoted))
        fail_msg("%s.env does not quote its plan's '%s'", name, quoted);
    free(text);
}

static void test_llama_2_7b(void **state) { (void)state; check_example("llama-2-7b"); }
static void test_llama_2_13b(void **state) { (void)state; check_example("llama-2-13b"); }
static void test_llama_3_1_8b(void **state) { (void)state; check_example("llama-3.1-8b"); }
static void test_llama_2_70b(void **state) { (void)state; check_example("llama-2-70b"); }

/* No example goes untested. */
static void test_every_example_is_checked(void **state)
{
    (void)state;
    DIR *d = opendir(tu_data_path("../configs/jobs"));
    assert_non_null(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += strstr(e->d_name, ".env") != NULL;
    closedir(d);
    assert_int_equal(n, 4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_2_7b),
        cmocka_unit_test(test_llama_2_13b),
        cmocka_unit_test(test_llama_3_1_8b),
        cmocka_unit_test(test_llama_2_70b),
        cmocka_unit_test(test_every_example_is_checked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
