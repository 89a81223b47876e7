/* Shared by the libFuzzer targets: each target hands mxq's parsers the fuzzed
 * bytes through a real file in a private temporary directory, because the
 * parsers under test take paths (they mmap or open what users name). */
#ifndef MXQ_FUZZ_COMMON_H
#define MXQ_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

#include "mxq/core.h"

/* The target's directory, made on first use and reused for every input. */
const char *fuzz_dir(void);
/* <fuzz_dir>/<name>, in a static buffer. */
const char *fuzz_path(const char *name);
/* Write `size` bytes to <fuzz_dir>/<name>; aborts on an I/O failure, which
 * is the harness's fault, not the parser's. */
void fuzz_write(const char *name, const void *data, size_t size);
/* A context that logs nothing below errors and keeps errors quiet too: a
 * fuzzer meets millions of bad inputs. */
mxq_ctx *fuzz_ctx(void);

#endif
