/* Host memory: every allocation goes through uc_malloc/uc_free so the stats can count bytes and
 * the fault tests can make allocation N fail. Thread-safe counters. */
#ifndef UC_BASE_MEM_H
#define UC_BASE_MEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

void *uc_malloc(size_t size_bytes);
void *uc_calloc(size_t n, size_t size_bytes);
void *uc_realloc(void *p, size_t size_bytes);
/* Frees memory from uc_malloc/uc_calloc/uc_realloc; NULL is fine. */
void uc_free(void *p);
char *uc_strdup(const char *s);
char *uc_strndup(const char *s, size_t n);
/* Grows the array *p of *n elements of elem bytes to `want` (nothing when it holds that many),
 * the new elements zeroed; false when out of memory, with the array unchanged. */
bool uc_grow_zeroed(void **p, int32_t *n, int32_t want, size_t elem);

/* Frees and NULLs a pointer. */
#define UC_FREE(p)                                                                                 \
    do {                                                                                           \
        uc_free(p);                                                                                \
        (p) = NULL;                                                                                \
    } while (0)

/* Bytes currently allocated through uc_malloc and friends, and the number of live blocks. */
size_t uc_mem_bytes_in_use(void);
int64_t uc_mem_blocks_in_use(void);
/* Number of allocation calls so far (successful or failed). */
int64_t uc_mem_alloc_calls(void);
/* Makes the n-th allocation call from now fail (1 = the next one); 0 disables. After that one
 * failure allocations succeed again. */
void uc_mem_fail_after(int64_t n);

#ifdef __cplusplus
}
#endif
#endif
