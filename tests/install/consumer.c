/* A program of a user of the installed mxq: the public header and the flags
 * pkg-config gives, nothing else. MX-quantizes a row and reads it back. */
#include <stdio.h>

#include <mxq/mxq.h>

int main(void)
{
    mxq_ctx *ctx = NULL;
    float row[32], back[32];
    uint8_t packed[16], scale;
    for (int i = 0; i < 32; i++)
        row[i] = (float)(i - 16) / 8.0f;
    mxq_mx_spec spec = {mxq_format_by_name("mxint4"), 32, MXQ_ROUND_EVEN, MXQ_KERNEL_AUTO};
    if (mxq_ctx_create(&ctx) != MXQ_OK || mxq_mx_quantize_rows(ctx, &spec, row, 1, 32, packed, &scale, NULL) != MXQ_OK ||
        mxq_mx_dequantize_rows(ctx, &spec, packed, &scale, 1, 32, back) != MXQ_OK)
        return 1;
    printf("mxq %s: %s block of 32, scale 2^%d, %g -> %g\n", MXQ_VERSION, spec.format->name, scale - 127, row[3], back[3]);
    mxq_ctx_destroy(ctx);
    return back[3] == -1.5f ? 0 : 1; /* -1.625 = -3.25/4 * 2^1 rounds to k = -3 */
}
