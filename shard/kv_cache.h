/* Paged KV cache: one pool of fixed-size blocks per rank, shared by every sequence, layer and
 * KV head, and a block table per (sequence, layer, local KV head), so each head holds its own
 * number of tokens and the blocks compression never fills stay free for other sequences.
 * Tokens of a head are kept in position order: logical index i lives in slot
 * blocks[i / block_tokens] * block_tokens + i % block_tokens.
 *
 * Blocks are reference counted, so a forked sequence shares its source's full blocks (n > 1
 * completions of one prompt hold one copy of it). A shared block is never written: writes go
 * to a head's last, partly filled block, which a fork copies (uc_kv_head_fork), and anything
 * that rewrites older slots (uc_kv_head_remove) first gives the head its own copies
 * (uc_kv_head_unshare). A block returns to the pool when its last holder releases it. */
#ifndef UC_SHARD_KV_CACHE_H
#define UC_SHARD_KV_CACHE_H

#include <stdbool.h>
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
    int32_t *refs;      /* (n_blocks) holders of each block; 0 = free */
    int64_t n_shared;   /* blocks with more than one holder */
    size_t bytes_per_block; /* K and V */
};

struct uc_kv_head {
    int32_t n_tokens;
    int32_t n_blocks;
    int32_t cap_blocks;
    int32_t kdim;    /* key channels kept (packed head); 0: all D, unpacked */
    uint32_t rewrites; /* changes to blocks[] other than appending ids (kv_table.h) */
    int32_t *blocks;
    int32_t *chan;   /* (kdim) kept key channels, ascending; NULL when unpacked */
    int32_t merged;  /* 1: a MiniCache pair's merged rows (backend.h), 0: tokens of one layer */
    int32_t lrank;   /* latent rank (LoRC latent head); 0: not latent */
    int32_t lwidth;  /* elements per latent row (uc_kv_latent_width), 0 when not latent */
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
/* Releases every block of the sequence (each returns to the pool when no other sequence holds
 * it) and frees its tables. */
void uc_kv_seq_fini(struct uc_kv_cache *kv, struct uc_kv_seq *s);
/* uc_kv_seq_fini releases a sequence of at least this many blocks on several threads. */
#define UC_KV_PARALLEL_MIN_BLOCKS 65536
static inline struct uc_kv_head *uc_kv_seq_head(struct uc_kv_seq *s, int64_t layer, int64_t head)
{
    return &s->heads[layer * s->n_heads_kv + head];
}
/* Makes an empty head (no blocks) a packed head keeping the kdim key channels chan (copied;
 * ascending, each in [0, D)), 0 < kdim < D. UC_ERR_INVALID_ARG for a head holding blocks or a
 * bad list, UC_ERR_NOMEM. */
uc_status uc_kv_head_set_packed(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t kdim,
                                const int32_t *chan);
/* Makes an empty head (no blocks, unpacked) the merged rows of a MiniCache layer pair
 * (uc_kv_merged_tokens rows per block). UC_ERR_INVALID_ARG for a head holding blocks, a packed
 * head, or blocks too small for one merged row. */
uc_status uc_kv_head_set_merged(struct uc_kv_cache *kv, struct uc_kv_head *h);
/* Makes an empty, unpacked head (no blocks) a latent head of rank 0 < rank <= D (LoRC): rows
 * of uc_kv_latent_width(rank) elements. UC_ERR_INVALID_ARG for a head holding blocks, a packed
 * head or a bad rank. */
uc_status uc_kv_head_set_latent(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t rank);
/* Tokens per block of a head: block_tokens when neither packed, merged nor latent. */
static inline int64_t uc_kv_head_block_tokens(const struct uc_kv_cache *kv,
                                              const struct uc_kv_head *h)
{
    if (h->merged) {
        return uc_kv_merged_tokens(kv->block_tokens, kv->head_dim);
    }
    if (h->lwidth > 0) {
        return uc_kv_latent_tokens(kv->block_tokens, kv->head_dim, h->lwidth);
    }
    return h->kdim > 0 ? uc_kv_packed_tokens(kv->block_tokens, kv->head_dim, h->kdim)
                       : kv->block_tokens;
}
/* Blocks a head needs to hold n tokens. */
static inline int64_t uc_kv_head_blocks_for(const struct uc_kv_cache *kv,
                                            const struct uc_kv_head *h, int64_t n_tokens)
{
    int64_t tpb = uc_kv_head_block_tokens(kv, h);
    return (n_tokens + tpb - 1) / tpb;
}
/* Grows a head so it can hold n_tokens (allocating blocks); UC_ERR_KV_FULL when the pool is
 * out of blocks (nothing is allocated then). Does not change n_tokens. */
uc_status uc_kv_head_reserve(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t n_tokens);
/* Reserving for many heads at once, from several threads: uc_kv_head_make_room gives a head's
 * block table room for n_blocks ids (taking no block; the only step that can fail);
 * uc_kv_take_blocks moves the next n free blocks to ids, in the order uc_kv_head_reserve calls
 * would take them (false, taking nothing, when fewer are free); uc_kv_head_add_taken then grows
 * a head with room to n_tokens from ids, in order, and returns how many it took. The first and
 * the last may run for different heads at once. Every taken block must be handed out before
 * anything else touches the pool. */
uc_status uc_kv_head_make_room(struct uc_kv_head *h, int64_t n_blocks);
bool uc_kv_take_blocks(struct uc_kv_cache *kv, int64_t n, int32_t *ids);
int64_t uc_kv_head_add_taken(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t n_tokens,
                             const int32_t *ids);
/* Physical slot of logical token i (a packed slot for a packed head). */
static inline int32_t uc_kv_head_slot(const struct uc_kv_cache *kv, const struct uc_kv_head *h,
                                      int64_t i)
{
    int64_t tpb = uc_kv_head_block_tokens(kv, h);
    return (int32_t)(h->blocks[i / tpb] * tpb + i % tpb);
}
/* Removes logical token i, shifting the later tokens down (evict mode; not for latent heads:
 * UC_ERR_UNSUPPORTED). Shared blocks from the
 * one holding i on are copied first (uc_kv_head_unshare), so other holders keep their tokens;
 * UC_ERR_KV_FULL when the pool cannot hold those copies (nothing is removed then). */
uc_status uc_kv_head_remove(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t i);
/* Releases blocks beyond what n_tokens needs. */
void uc_kv_head_trim(struct uc_kv_cache *kv, struct uc_kv_head *h);
/* dst (an empty head of another sequence) becomes a copy of src (its kept channels too, when
 * packed): it shares src's full blocks
 * and gets a new block for src's partly filled last one, if any. The block contents are not
 * copied here: the pairs to copy (new block, src block) are appended to copy_dst/copy_src at
 * *n_copy (room for one more pair is needed), for one kv_copy_blocks call over all heads.
 * UC_ERR_KV_FULL when the pool has no block for the copy, UC_ERR_NOMEM for the table; dst is
 * unchanged on failure. */
uc_status uc_kv_head_fork(struct uc_kv_cache *kv, struct uc_kv_head *dst,
                          const struct uc_kv_head *src, int32_t *copy_dst, int32_t *copy_src,
                          int64_t *n_copy);
/* Gives h its own copy (through the backend) of every shared block from block index
 * first_block on, so its slots there can be rewritten. UC_ERR_KV_FULL when the pool cannot
 * hold the copies (nothing changes then). Never allocates host memory. */
uc_status uc_kv_head_unshare(struct uc_kv_cache *kv, struct uc_kv_head *h, int64_t first_block);
/* Whether block b of the pool is held by more than one head. */
static inline bool uc_kv_block_shared(const struct uc_kv_cache *kv, int32_t b)
{
    return kv->refs[b] > 1;
}
/* Tokens and blocks held by a sequence on this rank (a shared block counts for each holder). */
int64_t uc_kv_seq_tokens(const struct uc_kv_seq *s);
int64_t uc_kv_seq_blocks(const struct uc_kv_seq *s);
/* Bytes of K and V a sequence's tokens take in their rows on this rank: (kdim + D) elements
 * per token of a packed head, 2 D + 4 per merged row, uc_kv_latent_width of a latent one, 2 D
 * of a plain one (what its blocks hold, less their unused tail). */
int64_t uc_kv_seq_row_bytes(const struct uc_kv_cache *kv, const struct uc_kv_seq *s);
/* Blocks of the pool in use (a shared block counts once). */
int64_t uc_kv_used_blocks(const struct uc_kv_cache *kv);
/* Blocks of the pool held by more than one head. */
int64_t uc_kv_shared_blocks(const struct uc_kv_cache *kv);

#ifdef __cplusplus
}
#endif
#endif
