/* Shared by the libFuzzer harnesses: quiet logs, inputs as files or NUL-terminated text. */
#ifndef UC_TESTS_FUZZ_COMMON_H
#define UC_TESTS_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"

static void fz_sink(enum uc_log_level level, const char *line, void *user)
{
    (void)level;
    (void)line;
    (void)user; /* refusals are the expected outcome: keep the fuzzer's output readable */
}

static void fz_quiet(void)
{
    static int done;
    if (!done) {
        uc_log_set_sink(fz_sink, NULL);
        done = 1;
    }
}

/* data[0..size) as a NUL-terminated heap string (free()). */
static char *fz_text(const uint8_t *data, size_t size)
{
    char *t = malloc(size + 1);
    if (t) {
        memcpy(t, data, size);
        t[size] = '\0';
    }
    return t;
}

static char fz_dir_path[64];

static void fz_dir_remove(void)
{
    static const char *names[] = {"model.safetensors", "a.safetensors",
                                  "model.safetensors.index.json", "uncompd.conf"};
    char p[160];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", fz_dir_path, names[i]);
        unlink(p);
    }
    rmdir(fz_dir_path);
}

/* A private folder for this process (its files are rewritten per input; removed at exit). */
static const char *fz_dir(void)
{
    if (!fz_dir_path[0]) {
        snprintf(fz_dir_path, sizeof fz_dir_path, "/tmp/uc_fuzz_%d", (int)getpid());
        mkdir(fz_dir_path, 0700);
        atexit(fz_dir_remove);
    }
    return fz_dir_path;
}

#endif
