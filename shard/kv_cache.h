/* Paged KV cache: one pool of fixed-size blocks per rank, shared by every sequence, layer and
 * KV head, and a block table per (sequence, layer, local KV head), so each head holds its own
 * number of tokens and the blocks compression never fills stay free for other sequences.
 * Tokens of a head are kept in position order: logical index i lives in slot
 * blocks[i / block_tokens] * block_tokens + i % block_tokens. */
#ifndef UC_SHARD_KV_CACHE_H
#define UC_SHARD_KV_CACHE_H

#include <stdint.h>

#include "backend.h"
#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_kv_cache {
    struct uc_backend *be;
    struct uc_kv_pool_view pool;
    int64_t n_blocks;
    int64_t block_tokens;
    int64_t head_dim;
    int32_t *free_list; /* stack of free block ids */
    int64_t n_free;
    size_t bytes_per_block; /* K and V */
};

struct uc_kv_head {
    int32_t n_tokens;
    int32_t n_blocks;
    int32_t cap_blocks;
    int32_t *blocks;
};

/* The cache of one sequence on this rank: L x Hkv_local heads. */
struct uc_kv_seq {
    int64_t n_layers;
    int64_t n_heads_kv; /* local */
    struct uc_kv_head *heads; /* (L, Hkv_local) */
};

uc_status uc_kv_cache_init(struct uc_kv_cache *kv, struct uc_backend *be, int64_t n_blocks,
                           int64_t block_tokens, int64_t head_dim);
void uc_kv_cache_fini(struct uc_kv_cache *kv);
/* Blocks needed to hold n tokens. */
int64_t uc_kv_blocks_for(const struct uc_kv_cache *kv, int64_t n_tokens);

uc_status uc_kv_seq_init(struct uc_kv_seq *s, int64_t n_layers, int64_t n_heads_kv);
/* Returns every block of the sequence to the pool and frees its tables. */
void uc_kv_seq_fini(struct uc_kv_cache *kv, struct uc_kv_seq *s);
static inline struct uc_kv_head *uc_kv_seq_head(struct uc_kv_seq *s, int64_t layer, int64_t head)
{
    return &s->heads[layer * s->n_heads_kv + head];
}
/* Grows a head so it can hold n_tokens (allocating blocks); UC_ERR_KV_FULL when the pool is
 * out of blocks (nothing is allocated then). Does not change n_tokens. */
uc_status uc_kv_head_reserve(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t n_tokens);
/* Physical slot of logical token i. */
static inline int32_t uc_kv_head_slot(const struct uc_kv_cache *kv, const struct uc_kv_head *h,
                                      int64_t i)
{
    return (int32_t)(h->blocks[i / kv->block_tokens] * kv->block_tokens + i % kv->block_tokens);
}
/* Removes logical token i, shifting the later tokens down (evict mode). */
uc_status uc_kv_head_remove(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t i);
/* Frees blocks beyond what n_tokens needs. */
void uc_kv_head_trim(struct uc_kv_cache *kv, struct uc_kv_head *h);
/* Tokens and blocks held by a sequence on this rank. */
int64_t uc_kv_seq_tokens(const struct uc_kv_seq *s);
int64_t uc_kv_seq_blocks(const struct uc_kv_seq *s);
int64_t uc_kv_used_blocks(const struct uc_kv_cache *kv);

#ifdef __cplusplus
}
#endif
#endif
