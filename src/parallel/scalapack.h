/* The BLACS and ScaLAPACK/PBLAS routines mxq calls. No C header ships with
 * Debian's ScaLAPACK: these are the Fortran entry points (every argument by
 * pointer, a hidden trailing size_t length per character argument) and the
 * C interface of BLACS. Internal. */
#ifndef MXQ_PARALLEL_SCALAPACK_H
#define MXQ_PARALLEL_SCALAPACK_H

#include <mpi.h>
#include <stddef.h>

/* BLACS (C interface) */
void Cblacs_pinfo(int *mypnum, int *nprocs);
int Csys2blacs_handle(MPI_Comm comm);
void Cfree_blacs_system_handle(int handle);
void Cblacs_gridinit(int *context, const char *order, int nprow, int npcol);
void Cblacs_gridinfo(int context, int *nprow, int *npcol, int *myrow, int *mycol);
void Cblacs_gridexit(int context);

/* ScaLAPACK tools */
int numroc_(const int *n, const int *nb, const int *iproc, const int *isrcproc, const int *nprocs);
void descinit_(int *desc, const int *m, const int *n, const int *mb, const int *nb, const int *irsrc,
               const int *icsrc, const int *context, const int *lld, int *info);

/* PBLAS level 3 */
void pstrmm_(const char *side, const char *uplo, const char *transa, const char *diag, const int *m, const int *n,
             const float *alpha, const float *a, const int *ia, const int *ja, const int *desca, float *b,
             const int *ib, const int *jb, const int *descb, size_t side_len, size_t uplo_len, size_t transa_len,
             size_t diag_len);

#endif
