/* Small shared helpers: whole-file reads, monotonic time, FNV-1a hashing, a growable byte
 * buffer, float16/bfloat16 conversion and half-up rounding. */
#ifndef UC_BASE_UTIL_H
#define UC_BASE_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t uc_bf16;
typedef uint16_t uc_f16;

/* Opens a regular file read-only (a FIFO, device or folder is refused at once, never waited
 * on); returns the descriptor, or -1 after logging why. */
int uc_file_open_regular(const char *path);
/* Reads a whole file (regular, or a character device such as /dev/null; a FIFO is refused at
 * once) into a NUL-terminated uc_malloc'd buffer (*out owned by the caller). */
uc_status uc_file_read_all(char **out, size_t *size_bytes, const char *path);
/* Writes a buffer to path atomically (temp file + rename). */
uc_status uc_file_write_all(const char *path, const void *data, size_t size_bytes);
bool uc_file_exists(const char *path);
/* Joins dir and name into a uc_malloc'd path. */
char *uc_path_join(const char *dir, const char *name);

/* Monotonic clock in seconds / milliseconds. */
double uc_time_s(void);
int64_t uc_time_ms(void);
/* Wall clock, Unix milliseconds. */
int64_t uc_wall_ms(void);

/* FNV-1a 64-bit, chainable: pass the previous hash as `h` (start with UC_FNV_INIT). */
#define UC_FNV_INIT 0xcbf29ce484222325ULL
uint64_t uc_fnv1a(uint64_t h, const void *data, size_t n);

/* Half up rounding, as UNCOMP.md uses everywhere: floor(x + 0.5). */
int64_t uc_round_half_up(double x);

float uc_bf16_to_f32(uc_bf16 v);
uc_bf16 uc_f32_to_bf16(float f); /* round to nearest even */
float uc_f16_to_f32(uc_f16 v);
uc_f16 uc_f32_to_f16(float f);

/* A growable byte buffer; `data` is always NUL-terminated. */
struct uc_buf {
    char *data;
    size_t len;
    size_t cap;
    bool oom; /* set when an append failed; further appends are ignored */
};
void uc_buf_init(struct uc_buf *b);
void uc_buf_fini(struct uc_buf *b);
void uc_buf_append(struct uc_buf *b, const void *data, size_t n);
void uc_buf_puts(struct uc_buf *b, const char *s);
void uc_buf_printf(struct uc_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Transfers the buffer out (the caller frees it with uc_free); the buf is empty afterwards. */
char *uc_buf_take(struct uc_buf *b);

/* Seeded deterministic generator (splitmix64 / xoshiro-like), for tests and sampling. */
struct uc_rng {
    uint64_t s[4];
};
void uc_rng_seed(struct uc_rng *r, uint64_t seed);
uint64_t uc_rng_next(struct uc_rng *r);
/* Uniform double in [0, 1). */
double uc_rng_uniform(struct uc_rng *r);
/* Deterministic test data: fills buf[i] with a value in [-1, 1) that depends only on
 * (seed, rank, index0 + i). */
void uc_test_fill(float *buf, int64_t n, uint64_t seed, int rank, int64_t index0);

#ifdef __cplusplus
}
#endif
#endif
