/* Block pool and per-head block tables. Allocation is a free-list pop and blocks are reference
 * counted (forks share them); nothing here touches K/V data except uc_kv_head_remove and
 * uc_kv_head_unshare, which move and copy slots through the backend. */
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
    kv->refs = uc_calloc((size_t)n_blocks, sizeof *kv->refs);
    if (!kv->free_list || !kv->refs) {
        UC_FREE(kv->free_list);
        UC_FREE(kv->refs);
        return UC_ERRF(UC_ERR_NOMEM, "kv free list blocks=%lld", (long long)n_blocks);
    }
    uc_status rc = be->ops->kv_pool_create(be, &kv->pool, n_blocks, block_tokens, head_dim);
    if (rc != UC_OK) {
        UC_FREE(kv->free_list);
        UC_FREE(kv->refs);
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
    uc_free(kv->refs);
    memset(kv, 0, sizeof *kv);
}

/* A free block, now held once (the caller checked n_free). */
static int32_t block_take(struct uc_kv_cache *kv)
{
    int32_t b = kv->free_list[--kv->n_free];
    kv->refs[b] = 1;
    return b;
}

/* One more holder of block b. */
static void block_hold(struct uc_kv_cache *kv, int32_t b)
{
    if (kv->refs[b]++ == 1) {
        kv->n_shared++;
    }
}

/* One holder less; the last returns it to the pool. */
static void block_release(struct uc_kv_cache *kv, int32_t b)
{
    UC_ASSERT(kv->refs[b] > 0);
    if (--kv->refs[b] == 0) {
        kv->free_list[kv->n_free++] = b;
    } else if (kv->refs[b] == 1) {
        kv->n_shared--;
    }
}

/* Room in h's table for n blocks. */
static uc_status table_reserve(struct uc_kv_head *h, int64_t n)
{
    if (n <= h->cap_blocks) {
        return UC_OK;
    }
    /* room beyond n: a prompt's table is reserved whole, and doubling from a power of two
     * left a power-of-two prompt (8192 tokens = 512 blocks) with no room, so every head of a
     * batch reallocated its table at the first decode step */
    int64_t cap = 2 * (int64_t)h->cap_blocks;
    cap = cap > n + n / 4 + 4 ? cap : n + n / 4 + 4;
    int32_t *b = uc_realloc(h->blocks, (size_t)cap * sizeof *b);
    if (!b) {
        return UC_ERRF(UC_ERR_NOMEM, "kv block table blocks=%lld", (long long)cap);
    }
    h->blocks = b;
    h->cap_blocks = (int32_t)cap;
    return UC_OK;
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

/* A head's blocks released on one of several threads while no block of the pool has a second
 * holder (so no other head touches these blocks' counts): the ids gathered in the head's own
 * table, then appended to the free list in one run reserved atomically. */
static void head_release_alone(struct uc_kv_cache *kv, struct uc_kv_head *h)
{
    for (int32_t i = 0; i < h->n_blocks; i++) {
        UC_ASSERT(kv->refs[h->blocks[i]] == 1);
        kv->refs[h->blocks[i]] = 0;
    }
    int64_t at = __atomic_fetch_add(&kv->n_free, (int64_t)h->n_blocks, __ATOMIC_RELAXED);
    memcpy(kv->free_list + at, h->blocks, (size_t)h->n_blocks * sizeof *h->blocks);
}

void uc_kv_seq_fini(struct uc_kv_cache *kv, struct uc_kv_seq *s)
{
    if (!s->heads) {
        return;
    }
    int64_t nh = s->n_layers * s->n_heads_kv;
    /* a long sequence holds many blocks (8K tokens of an 8B model: 132K, 0.4 ms on one thread,
     * and a batch that ends together frees them all in one step), so while no block of the
     * pool is shared its heads go back on several threads, each a run of neighbouring heads
     * (whose block ids are near each other's); the free list's order then differs from run to
     * run, which only moves where later sequences' K/V live. The heads' tables are freed on this
     * thread afterwards, not on the threads that released their blocks (tables of 2 KB and more
     * go back through the allocator's lock of the thread that made them): bench_kv_free at b's
     * 32 sequences of 8,320 tokens, 2 threads, 7.8-8.0 -> 5.5-6.0 ms (one thread: 5.3-6.5) */
    bool par = kv->n_shared == 0 && uc_kv_seq_blocks(s) >= UC_KV_PARALLEL_MIN_BLOCKS;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < nh; i++) {
        struct uc_kv_head *h = &s->heads[i];
        if (par) {
            head_release_alone(kv, h);
        } else {
            for (int32_t b = 0; b < h->n_blocks; b++) {
                block_release(kv, h->blocks[b]);
            }
        }
    }
    for (int64_t i = 0; i < nh; i++) {
        uc_free(s->heads[i].blocks);
        uc_free(s->heads[i].chan);
    }
    UC_FREE(s->heads);
    memset(s, 0, sizeof *s);
}

uc_status uc_kv_head_set_packed(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t kdim,
                                const int32_t *chan)
{
    if (h->n_blocks != 0 || h->kdim != 0 || h->merged) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv packed head: set on a head holding %d blocks",
                       h->n_blocks);
    }
    if (kdim <= 0 || kdim >= kv->head_dim) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv packed head: kdim=%lld outside (0, %lld)",
                       (long long)kdim, (long long)kv->head_dim);
    }
    for (int64_t c = 0; c < kdim; c++) {
        if (chan[c] < 0 || chan[c] >= kv->head_dim || (c > 0 && chan[c] <= chan[c - 1])) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "kv packed head: channel %d at %lld not "
                           "ascending in [0, %lld)", chan[c], (long long)c,
                           (long long)kv->head_dim);
        }
    }
    int32_t *cp = uc_malloc((size_t)kdim * sizeof *cp);
    if (!cp) {
        return UC_ERRF(UC_ERR_NOMEM, "kv packed head channels=%lld", (long long)kdim);
    }
    memcpy(cp, chan, (size_t)kdim * sizeof *cp);
    h->chan = cp;
    h->kdim = (int32_t)kdim;
    h->rewrites++;
    return UC_OK;
}

uc_status uc_kv_head_set_merged(struct uc_kv_cache *kv, struct uc_kv_head *h)
{
    if (h->n_blocks != 0 || h->kdim != 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv merged head: set on a head holding %d blocks "
                       "or packed (kdim=%d)", h->n_blocks, h->kdim);
    }
    if (uc_kv_merged_tokens(kv->block_tokens, kv->head_dim) < 1) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv merged head: blocks of %lld tokens hold no "
                       "merged row", (long long)kv->block_tokens);
    }
    h->merged = 1;
    return UC_OK;
}

uc_status uc_kv_head_set_latent(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t rank)
{
    if (h->n_blocks != 0 || h->kdim != 0 || h->lrank != 0 || h->merged) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv latent head: set on a head holding %d blocks "
                       "(kdim=%d rank=%d)", h->n_blocks, h->kdim, h->lrank);
    }
    if (rank <= 0 || rank > kv->head_dim) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv latent head: rank=%lld outside (0, %lld]",
                       (long long)rank, (long long)kv->head_dim);
    }
    h->lrank = (int32_t)rank;
    h->lwidth = (int32_t)uc_kv_latent_width(rank, kv->be->ops->act_size(kv->be));
    return UC_OK;
}

uc_status uc_kv_head_reserve(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t n_tokens)
{
    int64_t need = uc_kv_head_blocks_for(kv, h, n_tokens);
    if (need <= h->n_blocks) {
        return UC_OK;
    }
    if (need - h->n_blocks > kv->n_free) {
        return UC_ERR_KV_FULL; /* retryable; the caller decides what to log */
    }
    uc_status rc = table_reserve(h, need);
    if (rc != UC_OK) {
        return rc;
    }
    while (h->n_blocks < need) {
        h->blocks[h->n_blocks++] = block_take(kv);
    }
    return UC_OK;
}

bool uc_kv_take_blocks(struct uc_kv_cache *kv, int64_t n, int32_t *ids)
{
    if (n > kv->n_free) {
        return false;
    }
    for (int64_t k = 0; k < n; k++) {
        ids[k] = kv->free_list[kv->n_free - 1 - k];
    }
    kv->n_free -= n;
    return true;
}

uc_status uc_kv_head_make_room(struct uc_kv_head *h, int64_t n_blocks)
{
    return table_reserve(h, n_blocks);
}

int64_t uc_kv_head_add_taken(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t n_tokens,
                             const int32_t *ids)
{
    int64_t need = uc_kv_head_blocks_for(kv, h, n_tokens), used = 0;
    UC_ASSERT(need <= h->cap_blocks);
    while (h->n_blocks < need) {
        int32_t b = ids[used++];
        kv->refs[b] = 1; /* a block of its own, as block_take leaves it */
        h->blocks[h->n_blocks++] = b;
    }
    return used;
}

void uc_kv_head_trim(struct uc_kv_cache *kv, struct uc_kv_head *h)
{
    int64_t need = uc_kv_head_blocks_for(kv, h, h->n_tokens);
    if (h->n_blocks > need) {
        h->rewrites++;
    }
    while (h->n_blocks > need) {
        block_release(kv, h->blocks[--h->n_blocks]);
    }
}

uc_status uc_kv_head_fork(struct uc_kv_cache *kv, struct uc_kv_head *dst,
                          const struct uc_kv_head *src, int32_t *copy_dst, int32_t *copy_src,
                          int64_t *n_copy)
{
    int64_t tpb = uc_kv_head_block_tokens(kv, src);
    int64_t full = src->n_tokens / tpb;
    bool part = src->n_tokens % tpb != 0;
    if (dst->n_blocks != 0 || dst->kdim != 0 || dst->lrank != 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv fork into a head holding %d blocks",
                       dst->n_blocks);
    }
    if (part && kv->n_free < 1) {
        return UC_ERR_KV_FULL; /* retryable; the caller decides what to log */
    }
    uc_status rc = table_reserve(dst, full + part);
    if (rc != UC_OK) {
        return rc;
    }
    if (src->kdim > 0) {
        rc = uc_kv_head_set_packed(kv, dst, src->kdim, src->chan);
        if (rc != UC_OK) {
            return rc;
        }
    }
    dst->merged = src->merged;
    if (src->lrank > 0) {
        rc = uc_kv_head_set_latent(kv, dst, src->lrank);
        if (rc != UC_OK) {
            return rc;
        }
    }
    for (int64_t b = 0; b < full; b++) {
        block_hold(kv, src->blocks[b]);
        dst->blocks[b] = src->blocks[b];
    }
    if (part) {
        dst->blocks[full] = block_take(kv);
        copy_dst[*n_copy] = dst->blocks[full];
        copy_src[*n_copy] = src->blocks[full];
        (*n_copy)++;
    }
    dst->n_blocks = (int32_t)(full + part);
    dst->n_tokens = src->n_tokens;
    dst->rewrites++;
    return UC_OK;
}

uc_status uc_kv_head_unshare(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t first_block)
{
    enum { BATCH = 64 }; /* copies per backend call: a few per step at most in practice */
    int32_t cd[BATCH], cs[BATCH];
    int64_t need = 0;
    for (int64_t b = first_block < 0 ? 0 : first_block; b < h->n_blocks; b++) {
        need += uc_kv_block_shared(kv, h->blocks[b]);
    }
    if (need == 0) {
        return UC_OK;
    }
    if (need > kv->n_free) {
        return UC_ERR_KV_FULL;
    }
    int64_t k = 0;
    for (int64_t b = first_block < 0 ? 0 : first_block; b < h->n_blocks; b++) {
        int32_t old = h->blocks[b];
        if (!uc_kv_block_shared(kv, old)) {
            continue;
        }
        h->blocks[b] = block_take(kv);
        h->rewrites++;
        block_release(kv, old); /* still held by the others: never freed here */
        cd[k] = h->blocks[b];
        cs[k++] = old;
        if (k == BATCH) {
            uc_status rc = kv->be->ops->kv_copy_blocks(kv->be, &kv->pool, cd, cs, k);
            if (rc != UC_OK) {
                return rc;
            }
            k = 0;
        }
    }
    if (k > 0) {
        return kv->be->ops->kv_copy_blocks(kv->be, &kv->pool, cd, cs, k);
    }
    return UC_OK;
}

uc_status uc_kv_head_remove(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t i)
{
    struct uc_backend *be = kv->be;
    if (h->merged) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv remove from a merged head (MiniCache rows are "
                       "never evicted)");
    }
    if (i < 0 || i >= h->n_tokens) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv remove index %lld outside %d tokens", (long long)i,
                       h->n_tokens);
    }
    if (h->lrank > 0) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "kv remove: latent heads (lorc) do not evict");
    }
    uc_status urc = uc_kv_head_unshare(kv, h, i / uc_kv_head_block_tokens(kv, h));
    if (urc != UC_OK) {
        return urc;
    }
    for (int64_t t = i; t + 1 < h->n_tokens; t++) {
        int32_t dst = uc_kv_head_slot(kv, h, t), src = uc_kv_head_slot(kv, h, t + 1);
        uc_status rc = h->kdim > 0 ? be->ops->kv_move_packed(be, &kv->pool, dst, src, h->kdim)
                                   : be->ops->kv_move(be, &kv->pool, dst, src);
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

int64_t uc_kv_seq_row_bytes(const struct uc_kv_cache *kv, const struct uc_kv_seq *s)
{
    size_t a = kv->be->ops->act_size(kv->be);
    int64_t n = 0;
    for (int64_t i = 0; i < s->n_layers * s->n_heads_kv; i++) {
        const struct uc_kv_head *h = &s->heads[i];
        int64_t kd = h->kdim > 0 ? h->kdim : kv->head_dim;
        if (h->merged) {
            kd = kv->head_dim + UC_KV_MERGED_EXTRA;
        }
        int64_t row = h->lwidth > 0 ? h->lwidth : kd + kv->head_dim;
        n += (int64_t)h->n_tokens * row * (int64_t)a;
    }
    return n;
}

int64_t uc_kv_used_blocks(const struct uc_kv_cache *kv) { return kv->n_blocks - kv->n_free; }

int64_t uc_kv_shared_blocks(const struct uc_kv_cache *kv) { return kv->n_shared; }
