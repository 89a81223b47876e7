/* libFuzzer target: the recipe parser (YAML through libfyaml), as
 * `mxq quantize --recipe` reads it. */
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "mxq/recipe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    mxq_ctx *ctx = fuzz_ctx();
    mxq_recipe recipe;
    memset(&recipe, 0, sizeof(recipe));
    if (mxq_recipe_parse_string(ctx, text, "fuzz.yaml", &recipe) == MXQ_OK) {
        /* What the jobs do with a recipe: match names against its excludes. */
        volatile int excluded = mxq_recipe_excludes(&recipe, "model.layers.0.mlp.down_proj");
        (void)excluded;
        mxq_recipe_free(&recipe);
    }
    mxq_ctx_destroy(ctx);
    free(text);
    return 0;
}
