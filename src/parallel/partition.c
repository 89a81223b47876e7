/* Which rank owns which decoder layers. */
#include <stdlib.h>

#include "parallel/parallel.h"

mxq_status mxq_partition_layers(mxq_ctx *ctx, const mxq_model_config *cfg, int nranks, int *first)
{
    mxq_status status = MXQ_OK;
    double *best = NULL;
    int *cut = NULL;
    const int L = cfg->n_layers;
    CHECK(ctx, nranks >= 1, MXQ_ERR_ARG, "need at least one rank");
    CHECK(ctx, nranks <= L, MXQ_ERR_ARG,
          "%d ranks but the model has only %d decoder layers: every rank owns at least one layer, so use at most %d "
          "ranks",
          nranks, L, L);

    const double layer = (double)mxq_config_layer_params(cfg);
    const double embed = (double)mxq_config_embedding_params(cfg);
    /* Load of a rank owning layers [a, b), as a function of its position. */
#define LOAD(r, a, b) ((double)((b) - (a)) * layer + ((r) == 0 ? embed : 0.0) + ((r) == nranks - 1 ? embed : 0.0))
    /* best[r][b]: smallest possible maximum load when ranks 0..r own layers [0, b). */
    best = malloc((size_t)nranks * (size_t)(L + 1) * sizeof(double));
    cut = malloc((size_t)nranks * (size_t)(L + 1) * sizeof(int));
    CHECK_ALLOC(ctx, best && cut, (size_t)nranks * (L + 1) * sizeof(double), "the layer partition table");
    for (int b = 0; b <= L; b++) {
        best[b] = b >= 1 ? LOAD(0, 0, b) : 1e300;
        cut[b] = 0;
    }
    for (int r = 1; r < nranks; r++)
        for (int b = 0; b <= L; b++) {
            double value = 1e300;
            int arg = -1;
            for (int a = r; a < b; a++) { /* ranks 0..r-1 hold [0, a), at least one layer each */
                double prev = best[(size_t)(r - 1) * (L + 1) + a];
                double here = LOAD(r, a, b);
                double m = prev > here ? prev : here;
                if (m < value) {
                    value = m;
                    arg = a;
                }
            }
            best[(size_t)r * (L + 1) + b] = value;
            cut[(size_t)r * (L + 1) + b] = arg;
        }
#undef LOAD
    first[nranks] = L;
    for (int r = nranks - 1, b = L; r >= 0; r--) {
        int a = r == 0 ? 0 : cut[(size_t)r * (L + 1) + b];
        first[r] = a;
        b = a;
    }
fail:
    free(best);
    free(cut);
    return status;
}
