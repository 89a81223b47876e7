/* Error wrappers for the external libraries: HDF5 and MPI turn their own
 * failure reports into one line of mxq's error record. */
#include <hdf5.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"

struct h5_walk_state {
    char text[512];
    int sys_errno; /* from a "errno = N" in some frame's description, 0 if none */
};

static herr_t h5_walk_innermost(unsigned n, const H5E_error2_t *err, void *data)
{
    struct h5_walk_state *state = data;
    /* The stack walk goes from the innermost frame (n = 0) outward; the
     * innermost description is the most specific ("unable to open file").
     * A failed system call is described by a multi-line dump holding
     * "errno = 28"; the user needs strerror(28), not the dump. */
    const char *at = err->desc ? strstr(err->desc, "errno = ") : NULL;
    if (at && !state->sys_errno)
        state->sys_errno = atoi(at + 8);
    if (n == 0 && err->desc && err->desc[0]) {
        snprintf(state->text, sizeof(state->text), "%s", err->desc);
        state->text[strcspn(state->text, "\n:")] = '\0';
    }
    return 0;
}

void mxq_h5_error_set(mxq_ctx *ctx, const char *file, int line, const char *fmt, ...)
{
    char what[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    struct h5_walk_state state = {{0}, 0};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, h5_walk_innermost, &state);
    H5Eclear2(H5E_DEFAULT);
    if (state.sys_errno > 0)
        mxq_error_set(ctx, MXQ_ERR_IO, file, line, "%s: %s", what, strerror(state.sys_errno));
    else if (state.text[0])
        mxq_error_set(ctx, MXQ_ERR_HDF5, file, line, "%s (HDF5: %s)", what, state.text);
    else
        mxq_error_set(ctx, MXQ_ERR_HDF5, file, line, "%s", what);
}

void mxq_mpi_error_set(mxq_ctx *ctx, int mpi_rc, const char *file, int line, const char *what)
{
    char text[MPI_MAX_ERROR_STRING + 1] = {0};
    int len = 0;
    if (MPI_Error_string(mpi_rc, text, &len) != MPI_SUCCESS)
        snprintf(text, sizeof(text), "MPI error code %d", mpi_rc);
    mxq_error_set(ctx, MXQ_ERR_MPI, file, line, "%s failed: %s", what, text);
}
