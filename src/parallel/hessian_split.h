/* Calibration statistics spread over the ranks of a data-parallel group:
 * each linear input's Hessian lives in block rows on every rank, in the
 * layout GPTQ's grid factors in place (parallel/gptq_grid.h), and no rank
 * ever holds it whole. A 70B layer's 7.8 GB of Hessians take 3.9 GB a rank
 * on 2 ranks.
 *
 * Accumulation: the ranks' activations of a micro-batch are gathered in
 * slabs of tokens (every rank then sees every token) and each rank adds the
 * Gram products of its block rows, H's lower triangle only (what the
 * factor reads). max|x|, sum|x| and the token count stay per rank until
 * they are summed onto the layer's owner.
 *
 * Use: the layer's owner runs the layer's quantization with the inputs'
 * Hessians reached through mxq_hsplit_remote's requests, and ends with
 * mxq_hsplit_end; the other ranks serve the requests (mxq_hsplit_serve)
 * meanwhile. Internal. */
#ifndef MXQ_PARALLEL_HESSIAN_SPLIT_H
#define MXQ_PARALLEL_HESSIAN_SPLIT_H

#include "algo/hessian_ref.h"
#include "mxq/recipe.h"
#include "parallel/gptq_grid.h"
#include "parallel/parallel.h"

typedef struct {
    int features, nb;
    size_t nblk, n_loc;   /* block rows in all; this rank's rows */
    mxq_grid_hessian grid; /* rows [n_loc, n]: block row gb (gb % ranks == rank) holds H's rows
                              n-(gb+1)nb .. n-gb nb, both index orders reversed (M = J H J) */
    double *saved_blocks;  /* [n_loc / nb][nb][nb] this rank's diagonal blocks (H order), kept at the factor */
    mxq_input_stats abs;   /* max|x|, sum|x|, tokens of this rank's share (no hessian); on the owner, all */
} mxq_hsplit;

/* Scratch of the accumulation, shared by a layer's inputs. */
typedef struct {
    float *gathered; /* [slab tokens * ranks, widest input] */
    float *panel;    /* [widest input, nb] one block row's Gram product */
    size_t slab;     /* tokens a rank adds per exchange */
    int *counts, *displs;
} mxq_hsplit_work;

/* Whether an input of `features` can be spread in block rows of nb (whole
 * blocks, each a whole number of MX blocks of `block`). */
int mxq_hsplit_applies(int features, int nb, int block);

mxq_status mxq_hsplit_init(mxq_ctx *ctx, const mxq_dist *dist, int features, int nb, mxq_hsplit *hs);
void mxq_hsplit_zero(mxq_hsplit *hs);
void mxq_hsplit_free(mxq_hsplit *hs);
/* The bytes rank r holds of a spread input. */
double mxq_hsplit_bytes(int features, int nb, int ranks, int r);

/* For adds of at most most_tokens tokens a rank. */
mxq_status mxq_hsplit_work_init(mxq_ctx *ctx, const mxq_dist *dist, int widest, int nb, size_t most_tokens,
                                mxq_hsplit_work *w);
void mxq_hsplit_work_free(mxq_hsplit_work *w);
/* Scratch bytes of the accumulation. */
double mxq_hsplit_work_bytes(int widest, int nb, int ranks, size_t most_tokens);

/* Collective: adds this rank's x [tokens, features] (tokens may be 0, for a
 * rank with fewer micro-batches). Every rank calls it as often, for the
 * same inputs in the same order. A rank whose work failed (`local` not OK)
 * still calls it once, so that the others learn of it here instead of
 * waiting: all then return an error. */
mxq_status mxq_hsplit_add(mxq_ctx *ctx, const mxq_dist *dist, mxq_hsplit *hs, mxq_hsplit_work *w, const float *x,
                          size_t tokens, mxq_status local);

/* Collective: max|x|, sum|x| and the tokens summed onto `root`; every
 * rank's diagonal checked finite (agreed, naming the channel). */
mxq_status mxq_hsplit_finish(mxq_ctx *ctx, const mxq_dist *dist, mxq_hsplit *hs, int root, const char *input_name);

/* One layer's spread inputs, served to its owner. */
typedef struct {
    const mxq_dist *dist;
    int root;               /* the layer's owner */
    int layer;              /* for messages */
    const mxq_recipe *recipe;
    mxq_hsplit *inputs;     /* [MXQ_INPUT_COUNT] */
    mxq_remote_hessian ops; /* the owner's requests (user: this) */
    mxq_status failed;      /* a server's first failure */
} mxq_hsplit_server;

void mxq_hsplit_server_init(mxq_hsplit_server *sv, const mxq_dist *dist, int root, int layer,
                            const mxq_recipe *recipe, mxq_hsplit *inputs);
/* The other ranks: answer the owner's requests until it ends. */
mxq_status mxq_hsplit_serve(mxq_ctx *ctx, mxq_hsplit_server *sv);
/* The owner: no more requests for this layer. */
mxq_status mxq_hsplit_end(mxq_ctx *ctx, mxq_hsplit_server *sv);

#endif
