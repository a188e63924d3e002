/* Block pool and per-head block tables. Allocation is a free-list pop; nothing here touches
 * K/V data except uc_kv_head_remove, which moves slots through the backend. */
#include "kv_cache.h"

#include <string.h>

#include "base/log.h"
#include "base/mem.h"

uc_status uc_kv_cache_init(struct uc_kv_cache *kv, struct uc_backend *be, int64_t n_blocks,
                           int64_t block_tokens, int64_t head_dim)
{
    memset(kv, 0, sizeof *kv);
    if (n_blocks <= 0 || n_blocks > INT32_MAX / 2 || block_tokens <= 0 || head_dim <= 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv blocks=%lld block_tokens=%lld", (long long)n_blocks,
                       (long long)block_tokens);
    }
    kv->be = be;
    kv->n_blocks = n_blocks;
    kv->block_tokens = block_tokens;
    kv->head_dim = head_dim;
    kv->bytes_per_block = (size_t)(2 * block_tokens * head_dim) * be->ops->act_size(be);
    kv->free_list = uc_malloc((size_t)n_blocks * sizeof *kv->free_list);
    if (!kv->free_list) {
        return UC_ERRF(UC_ERR_NOMEM, "kv free list blocks=%lld", (long long)n_blocks);
    }
    uc_status rc = be->ops->kv_pool_create(be, &kv->pool, n_blocks, block_tokens, head_dim);
    if (rc != UC_OK) {
        UC_FREE(kv->free_list);
        return rc;
    }
    for (int64_t i = 0; i < n_blocks; i++) { /* pop order: block 0 first */
        kv->free_list[i] = (int32_t)(n_blocks - 1 - i);
    }
    kv->n_free = n_blocks;
    return UC_OK;
}

void uc_kv_cache_fini(struct uc_kv_cache *kv)
{
    if (kv->be && kv->pool.k) {
        kv->be->ops->kv_pool_destroy(kv->be, &kv->pool);
    }
    uc_free(kv->free_list);
    memset(kv, 0, sizeof *kv);
}

int64_t uc_kv_blocks_for(const struct uc_kv_cache *kv, int64_t n_tokens)
{
    return (n_tokens + kv->block_tokens - 1) / kv->block_tokens;
}

uc_status uc_kv_seq_init(struct uc_kv_seq *s, int64_t n_layers, int64_t n_heads_kv)
{
    memset(s, 0, sizeof *s);
    s->heads = uc_calloc((size_t)(n_layers * n_heads_kv), sizeof *s->heads);
    if (!s->heads) {
        return UC_ERRF(UC_ERR_NOMEM, "kv seq L=%lld", (long long)n_layers);
    }
    s->n_layers = n_layers;
    s->n_heads_kv = n_heads_kv;
    return UC_OK;
}

void uc_kv_seq_fini(struct uc_kv_cache *kv, struct uc_kv_seq *s)
{
    if (!s->heads) {
        return;
    }
    for (int64_t i = 0; i < s->n_layers * s->n_heads_kv; i++) {
        struct uc_kv_head *h = &s->heads[i];
        for (int32_t b = 0; b < h->n_blocks; b++) {
            kv->free_list[kv->n_free++] = h->blocks[b];
        }
        uc_free(h->blocks);
    }
    UC_FREE(s->heads);
    memset(s, 0, sizeof *s);
}

uc_status uc_kv_head_reserve(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t n_tokens)
{
    int64_t need = uc_kv_blocks_for(kv, n_tokens);
    if (need <= h->n_blocks) {
        return UC_OK;
    }
    if (need - h->n_blocks > kv->n_free) {
        return UC_ERR_KV_FULL; /* retryable; the caller decides what to log */
    }
    if (need > h->cap_blocks) {
        int64_t cap = h->cap_blocks ? h->cap_blocks : 4;
        while (cap < need) {
            cap *= 2;
        }
        int32_t *b = uc_realloc(h->blocks, (size_t)cap * sizeof *b);
        if (!b) {
            return UC_ERRF(UC_ERR_NOMEM, "kv block table blocks=%lld", (long long)cap);
        }
        h->blocks = b;
        h->cap_blocks = (int32_t)cap;
    }
    while (h->n_blocks < need) {
        h->blocks[h->n_blocks++] = kv->free_list[--kv->n_free];
    }
    return UC_OK;
}

void uc_kv_head_trim(struct uc_kv_cache *kv, struct uc_kv_head *h)
{
    int64_t need = uc_kv_blocks_for(kv, h->n_tokens);
    while (h->n_blocks > need) {
        kv->free_list[kv->n_free++] = h->blocks[--h->n_blocks];
    }
}

uc_status uc_kv_head_remove(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t i)
{
    struct uc_backend *be = kv->be;
    if (i < 0 || i >= h->n_tokens) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv remove index %lld outside %d tokens", (long long)i,
                       h->n_tokens);
    }
    for (int64_t t = i; t + 1 < h->n_tokens; t++) {
        uc_status rc = be->ops->kv_move(be, &kv->pool, uc_kv_head_slot(kv, h, t),
                                        uc_kv_head_slot(kv, h, t + 1));
        if (rc != UC_OK) {
            return rc;
        }
    }
    h->n_tokens--;
    uc_kv_head_trim(kv, h);
    return UC_OK;
}

int64_t uc_kv_seq_tokens(const struct uc_kv_seq *s)
{
    int64_t n = 0;
    for (int64_t i = 0; i < s->n_layers * s->n_heads_kv; i++) {
        n += s->heads[i].n_tokens;
    }
    return n;
}

int64_t uc_kv_seq_blocks(const struct uc_kv_seq *s)
{
    int64_t n = 0;
    for (int64_t i = 0; i < s->n_layers * s->n_heads_kv; i++) {
        n += s->heads[i].n_blocks;
    }
    return n;
}

int64_t uc_kv_used_blocks(const struct uc_kv_cache *kv) { return kv->n_blocks - kv->n_free; }
