/* The block tables of the decoding sequences, kept in backend memory between decode steps.
 *
 * A decode step's attention reads, for every (row, layer, KV head), the head's block ids (and a
 * packed head's kept key channels). Writing all of them out and uploading them every step cost
 * up to a third of a step on an H200 (22 MB of ids at batch 256 and context 1280). Instead each
 * decoding sequence owns a region of one arena (a host mirror and its backend copy): for each
 * of its heads, the block ids with room to grow, then a packed head's channel list. A sync
 * writes only what changed since the last one:
 * - the ids a head appended (uc_kv_head_reserve), for a sequence whose region is current;
 * - a whole region, for a sequence new to the arena, or one of whose heads changed other than
 *   by appending (its `rewrites` count moved: trim, copy-on-write, packing) or outgrew its room.
 * When the arena has no room left for the regions to write, it is compacted: every sequence of
 * the sync is laid out again from the start (in an arena grown to twice what they need, if it
 * must grow), and the regions of sequences not in the sync are forgotten (they are laid out
 * again when they next decode). Uploads go in few copies (nearby spans merged), or, when what
 * changed is a few words far apart (every head appending a block at once, as a batch of
 * sequences crossing a block boundary together does), as (position, value) pairs the backend
 * scatters, where merged copies would carry the whole arena between them. */
#ifndef UC_SHARD_KV_TABLE_H
#define UC_SHARD_KV_TABLE_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "base/status.h"
#include "kv_cache.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where one head's ids live in the arena, and what the arena holds of it. */
struct uc_kv_table_head {
    int32_t off;      /* first block id; a packed head's channels follow at off + cap */
    int32_t cap;      /* room for block ids */
    int32_t n_up;     /* ids written so far */
    uint32_t rewrites; /* the head's rewrites count when they were written */
};

/* A sequence's region (a part of struct seq); zeroed = none. */
struct uc_kv_table_region {
    int64_t epoch; /* the arena epoch it was written in; 0 = none */
    struct uc_kv_table_head *heads; /* (L, Hkv_local) */
    int64_t n_heads;
};

/* A sequence of a sync: its cache, which of its first n_share layers read another layer's
 * cache (share_src[l] != l: such heads hold no blocks and get no room; NULL = none) and its
 * region. Layers past n_share (extra heads a sequence keeps in its cache) are its own. */
struct uc_kv_table_seq {
    const struct uc_kv_seq *kv;
    const int16_t *share_src; /* (n_share) */
    int64_t n_share;
    struct uc_kv_table_region *r;
};

/* Default merge gap: a copy's fixed cost is about that of 64 KB more. */
#define UC_KV_TABLE_MERGE_GAP 16384
/* Default par_min: 1 MB of ids (a batch of 8K sequences joining writes 21 MB). */
#define UC_KV_TABLE_PAR_MIN (1 << 18)
/* Default par_min_heads: batch 128 of an 8B model (32 layers x 8 KV heads); below it waking
 * the threads costs more than the look (at batch 32 the look takes ~0.04 ms on one thread). */
#define UC_KV_TABLE_PAR_MIN_HEADS 32768

struct uc_kv_table {
    struct uc_backend *be;
    int32_t *host;    /* (cap) mirror of dev */
    void *dev;        /* (cap) int32 */
    int64_t cap;
    int64_t used;     /* ints handed out since the last compaction */
    int64_t epoch;    /* moves at every compaction: older regions are gone */
    int64_t *span;    /* (2 x span_cap) scratch: [lo, hi) of what a sync wrote */
    int64_t span_cap;
    int64_t merge_gap; /* spans this close (ints) go up in one copy (UC_KV_TABLE_MERGE_GAP) */
    int64_t par_min;   /* whole regions of at least this many ints in all are written by the
                        * OpenMP threads (UC_KV_TABLE_PAR_MIN) */
    int64_t par_min_heads; /* sequences of at least this many heads in all are looked over by
                            * the OpenMP threads for what changed (UC_KV_TABLE_PAR_MIN_HEADS) */
    int32_t *sc;      /* (2 x sc_cap) scratch: positions, then values, of a scattered sync */
    int64_t sc_cap;
    /* totals, for tests and logs */
    int64_t n_syncs, n_compactions, ints_uploaded, n_uploads;
};

void uc_kv_table_init(struct uc_kv_table *t, struct uc_backend *be);
void uc_kv_table_fini(struct uc_kv_table *t);
/* Frees a sequence's region record (its room in the arena is reclaimed at the next
 * compaction). */
void uc_kv_table_region_fini(struct uc_kv_table_region *r);
/* Makes the arena hold the current block ids (and channel lists) of every head of the n
 * sequences, in backend memory. The heads' blocks must already be reserved. UC_ERR_NOMEM when
 * the arena or a region record cannot grow; the backend's error for an upload. */
uc_status uc_kv_table_sync(struct uc_kv_table *t, const struct uc_kv_table_seq *seqs, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
