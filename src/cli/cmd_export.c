/* mxq export --to gguf: a checkpoint as a file llama.cpp runs. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "mxq/jobs.h"

static void print_export_help(FILE *out)
{
    fprintf(out,
            "Usage: mxq export --to gguf CHECKPOINT_DIR OUT.gguf [--tokenizer FILE | --vocab-from F.gguf]\n"
            "\n"
            "Write the checkpoint in CHECKPOINT_DIR (an mxq MX checkpoint, or an FP Hugging Face\n"
            "model of the llama architecture) as a GGUF v3 file that llama.cpp loads, with every\n"
            "weight value unchanged:\n"
            "  MXINT4, MXINT3, MXINT2 -> Q4_0   (f16 d = 2^(e - mantissa bits), q = k + 8)\n"
            "  MXINT8                 -> Q8_0   (f16 d = 2^(e - 6), q = k)\n"
            "  MXFP4                  -> MXFP4  (the same scale byte and codes)\n"
            "  MXFP6, MXFP8           -> BF16   (every such value is a BF16 value)\n"
            "MX blocks of 64, 128, ... become blocks of 32 repeating their scale. A linear whose\n"
            "rows are not whole blocks of 32, or whose scales fall outside f16's range for Q4_0/\n"
            "Q8_0, is written as BF16 (also exact); the export names each one. Other tensors keep\n"
            "their F32/F16/BF16 bytes. q_proj and k_proj rows are reordered from Hugging Face's\n"
            "rotate-half layout to llama.cpp's interleaved one; Llama-3 rope scaling becomes\n"
            "llama.cpp's rope_freqs tensor.\n"
            "GGUF carries weights only: a checkpoint that quantizes activations is exported with\n"
            "a notice, and llama.cpp quantizes activations its own way.\n"
            "\n"
            "Options:\n"
            "      --to gguf          the output format (the only one)\n"
            "      --tokenizer FILE   the vocabulary: a llama2.c tokenizer.bin, or a Hugging Face\n"
            "                         tokenizer.json of SentencePiece-style BPE (byte_fallback, as\n"
            "                         Llama-2's). Default: tokenizer.bin, else tokenizer.json, in\n"
            "                         CHECKPOINT_DIR, else in the model it was quantized from\n"
            "      --vocab-from F.gguf  copy the tokenizer.* keys of a GGUF of the same model (e.g.\n"
            "                         one llama.cpp's convert_hf_to_gguf.py made; needed for\n"
            "                         byte-level BPE such as Llama-3's) instead\n"
            "  -q, --quiet            print errors only\n"
            "  -h, --help             this text\n"
            "\n"
            "The output is written under a temporary name and renamed when complete. It is never\n"
            "an input (a file of the checkpoint, the vocabulary, the model the checkpoint came\n"
            "from), and an existing OUT.gguf is replaced only if mxq wrote it.\n");
}

int mxq_cmd_export(mxq_ctx *ctx, int argc, char **argv)
{
    enum { OPT_TO = 256, OPT_TOKENIZER, OPT_VOCAB_FROM };
    static const struct option options[] = {{"to", required_argument, NULL, OPT_TO},
                                            {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
                                            {"vocab-from", required_argument, NULL, OPT_VOCAB_FROM},
                                            {"quiet", no_argument, NULL, 'q'},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    mxq_export_options opt = {0};
    const char *to = NULL;
    int c, quiet = 0;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":qh", options, NULL)) != -1) {
        switch (c) {
        case OPT_TO: to = optarg; break;
        case OPT_TOKENIZER: opt.tokenizer = optarg; break;
        case OPT_VOCAB_FROM: opt.vocab_from = optarg; break;
        case 'q': quiet = 1; break;
        case 'h': print_export_help(stdout); return MXQ_EXIT_OK;
        case ':': return mxq_cli_usage_error(ctx, "export", "option '%s' needs a value", argv[optind - 1]);
        default: return mxq_cli_usage_error(ctx, "export", "unknown option '%s' (see mxq export --help)", argv[optind - 1]);
        }
    }
    if (!to || strcmp(to, "gguf") != 0)
        return mxq_cli_usage_error(ctx, "export", to ? "--to '%s': the only format is gguf" : "--to gguf is required",
                                   to);
    if (opt.tokenizer && opt.vocab_from)
        return mxq_cli_usage_error(ctx, "export", "--tokenizer and --vocab-from both give the vocabulary: give one");
    if (argc - optind > 2)
        return mxq_cli_usage_error(ctx, "export", "unexpected argument '%s'", argv[optind + 2]);
    if (argc - optind != 2)
        return mxq_cli_usage_error(ctx, "export", "CHECKPOINT_DIR and OUT.gguf are required (see mxq export --help)");
    if (quiet)
        mxq_ctx_set_log_level(ctx, MXQ_LOG_ERROR);
    mxq_export_result res;
    if (mxq_export_gguf(ctx, argv[optind], argv[optind + 1], &opt, &res) != MXQ_OK)
        return mxq_cli_job_failed(ctx, "export");
    if (!quiet)
        printf("%s: %d tensors, %d MX linears as block types, %d as BF16 (%d of them a fallback), %.1f MB%s\n",
               argv[optind + 1], res.tensors, res.quantized, res.mx_bf16, res.bf16_fallbacks, (double)res.bytes / 1e6,
               res.activations_dropped ? "; weights only (activations: llama.cpp's own)" : "");
    return MXQ_EXIT_OK;
}
