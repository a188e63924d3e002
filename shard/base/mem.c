/* Counting allocator with one-shot fault injection (the fault tests fail allocation N). */
#include "mem.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HDR 16 /* keeps malloc's 16-byte alignment; holds the block size */

static atomic_size_t bytes_in_use;
static atomic_llong blocks_in_use;
static atomic_llong alloc_calls;
static atomic_llong fail_at; /* absolute call number that fails, 0 = none */

static bool should_fail(void)
{
    long long call = atomic_fetch_add(&alloc_calls, 1) + 1;
    long long f = atomic_load(&fail_at);
    if (f != 0 && call == f) {
        atomic_store(&fail_at, 0);
        return true;
    }
    return false;
}

void *uc_malloc(size_t size_bytes)
{
    if (should_fail() || size_bytes > SIZE_MAX - HDR) {
        return NULL;
    }
    unsigned char *p = malloc(size_bytes + HDR);
    if (!p) {
        return NULL;
    }
    memcpy(p, &size_bytes, sizeof size_bytes);
    atomic_fetch_add(&bytes_in_use, size_bytes);
    atomic_fetch_add(&blocks_in_use, 1);
    return p + HDR;
}

void *uc_calloc(size_t n, size_t size_bytes)
{
    if (size_bytes != 0 && n > SIZE_MAX / size_bytes) {
        return NULL;
    }
    void *p = uc_malloc(n * size_bytes);
    if (p) {
        memset(p, 0, n * size_bytes);
    }
    return p;
}

bool uc_grow_zeroed(void **p, int32_t *n, int32_t want, size_t elem)
{
    if (want <= *n) {
        return true;
    }
    unsigned char *q = uc_realloc(*p, (size_t)want * elem);
    if (!q) {
        return false;
    }
    memset(q + (size_t)*n * elem, 0, (size_t)(want - *n) * elem);
    *p = q;
    *n = want;
    return true;
}

void *uc_realloc(void *p, size_t size_bytes)
{
    if (!p) {
        return uc_malloc(size_bytes);
    }
    if (should_fail() || size_bytes > SIZE_MAX - HDR) {
        return NULL;
    }
    unsigned char *base = (unsigned char *)p - HDR;
    size_t old;
    memcpy(&old, base, sizeof old);
    unsigned char *q = realloc(base, size_bytes + HDR);
    if (!q) {
        return NULL;
    }
    memcpy(q, &size_bytes, sizeof size_bytes);
    atomic_fetch_sub(&bytes_in_use, old);
    atomic_fetch_add(&bytes_in_use, size_bytes);
    return q + HDR;
}

void uc_free(void *p)
{
    if (!p) {
        return;
    }
    unsigned char *base = (unsigned char *)p - HDR;
    size_t old;
    memcpy(&old, base, sizeof old);
    atomic_fetch_sub(&bytes_in_use, old);
    atomic_fetch_sub(&blocks_in_use, 1);
    free(base);
}

char *uc_strndup(const char *s, size_t n)
{
    char *d = uc_malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

char *uc_strdup(const char *s) { return uc_strndup(s, strlen(s)); }

size_t uc_mem_bytes_in_use(void) { return atomic_load(&bytes_in_use); }
int64_t uc_mem_blocks_in_use(void) { return (int64_t)atomic_load(&blocks_in_use); }
int64_t uc_mem_alloc_calls(void) { return (int64_t)atomic_load(&alloc_calls); }

void uc_mem_fail_after(int64_t n)
{
    atomic_store(&fail_at, n > 0 ? atomic_load(&alloc_calls) + n : 0);
}
