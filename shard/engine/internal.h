/* The engine's insides, shared by its files (engine.h is the public face):
 * the sequence and engine structs, and the functions each file offers the others.
 *
 *   engine.c   lifecycle, accessors and the compression report
 *   wire.c     the step descriptor as bytes, broadcast from rank 0
 *   seq.c      sequences: admission checks, KV bounds, create, fork, free
 *   seq_map.c  the sequences by id
 *   prefill.c  a prompt's layer start and layer end (entropy, plan, kept tokens, stages), logits
 *   pipeline.c layer ends finished after the next pass, while the device runs it
 *   decode.c   the decode rows' index arrays, paged attention, eviction, decode-only graphs
 *   sweep.c    one step as one sweep over the layers: decode and prefill rows share products
 *   step.c     validation and the step loop on every rank
 *   diag.c     after non-finite logits: the first layer with non-finite cached K/V */
#ifndef UC_SHARD_ENGINE_INTERNAL_H
#define UC_SHARD_ENGINE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "base/util.h"
#include "compress/entropy.h"
#include "compress/policy.h"
#include "engine.h"
#include "kv_cache.h"
#include "kv_table.h"
#include "model.h"

/* Evict mode: the attention rows of a head's last W queries over its slots (slot order). */
struct ring {
    float *rows;  /* (W, cap) */
    int32_t cap;  /* columns */
    int32_t n_rows;
    int32_t next; /* row that the next query overwrites */
};

/* A batch of query spectra begun in a sweep pass (prefill.c): the prompts that end a layer in
 * it, that layer, and once fetched their eigenvalues. */
struct qs_batch {
    int64_t *seq;   /* (count) */
    int64_t *layer; /* (count) */
    int64_t count, seq_cap, layer_cap;
    bool fetched;   /* qspec_end has written host */
    double *host;   /* (count, H_local, D) */
    int64_t host_cap;
};

/* The engine's sequences by id (seq_map.c): an open-addressing table of the seq pointers. */
struct eng_seq_map {
    struct seq **slots; /* (cap), NULL = empty */
    int64_t cap, n;
};

/* A device buffer of a prompt's prefill and its size (seq.c). */
struct eng_pf_buf {
    void *p;
    int64_t bytes;
};

struct seq {
    int64_t id;
    int64_t at;       /* its index in the engine's seqs[] */
    int64_t decode_mark; /* the step whose validation last found it among the decode rows */
    int32_t flags;
    int32_t max_new;
    struct uc_compress_params cp;
    enum uc_seq_phase phase;
    int64_t n_prompt;
    int32_t *prompt;  /* (n_prompt) ids, kept until the prefill buffers exist */
    int64_t n_ctx; /* tokens whose K/V are in context (prompt + decoded) */
    int64_t ah_step; /* the step whose lookahead readied this sequence's next token (decode.c) */
    /* prefill state */
    int64_t layer;
    int64_t t_done;
    int64_t n_rows;   /* rows present at the current layer */
    void *x;          /* (n_prompt, C) residual stream, device */
    void *qkv;        /* (n_prompt, qkv_dim) this layer's Q, K, V, device */
    /* the prefill's device buffers (x, qkv, end_kv, src_kv, a stage cut's new x), each with its
     * bytes (eng_pf_alloc): the most held at once is what admission's uc_engine_prefill_bytes
     * must cover, and the report gives it */
    struct eng_pf_buf *pf_bufs;
    int64_t n_pf_bufs, pf_bufs_cap;
    int64_t pf_held, pf_peak;
    int32_t *pos;     /* (n_rows) original positions of the rows present */
    int32_t stage;
    double *row_acc;  /* (n_rows) accumulated stage row scores (accum row scores) */
    struct uc_plan plan;
    struct uc_kv_seq kv;
    struct uc_kv_table_region bt; /* its block tables in backend memory, while it decodes */
    float *logits;
    int64_t logits_rows;
    const float *logits_ext; /* this step's decode logits, in the engine's batch buffer */
    int32_t greedy;          /* the step's argmax token when it ran greedy-only, else -1 */
    /* report */
    int64_t *layer_rows; /* (L) rows present at each layer */
    double *ent_min, *ent_mean, *ent_max; /* (L) KV-head entropy summaries */
    double compress_ms;
    double prefill_ms;
    double t_prefill_start;
    /* records */
    int32_t **kept;    /* (L, Hkv_local) kept original positions */
    int64_t *n_kept;
    int32_t **kept_all; /* (L, Hkv) kept positions of every KV head, gathered from all ranks */
    int64_t *n_kept_all;
    bool plan_agreed;   /* every rank computed the same plan checksum and kept sets */
    int32_t **rows_at; /* (L) original positions of the rows present */
    double *qspec;     /* (L, H, D) */
    double *hspec;     /* (L, C) */
    /* rank 0, with spectra or calibration: the current layer's input rows, copied at its first
     * slice, and their spectrum accumulated slice by slice (prefill.c) */
    float *hid_rows;   /* (n_rows, C) host */
    int64_t hid_cap;   /* floats */
    struct uc_entropy_acc hacc;
    /* a calibration window ends each layer in parts, one per step (prefill.c) */
    int32_t end_part;     /* parts done of the current layer's end */
    bool hid_done;        /* this layer's hidden spectrum is in */
    double *qspec_local;  /* (H_local, D) this layer's query spectra, computed in parts or
                           * parked (spec_parked) */
    bool spec_parked;     /* qspec_local holds a pending end's spectra (prefill.c) */
    /* a layer end begun and finished after the next pass (pipeline.c) */
    bool end_pending;
    int32_t end_slot;     /* its window scores' staging slot */
    int64_t end_layer;
    void *end_kv;         /* (n_prompt, 2 Hkv_local D) device: the layer's K|V rows */
    struct ring *rings; /* (L, Hkv_local), evict mode */
    /* KVSharer: K|V rows of each layer some later layer reads, (n_prompt, 2 Hkv_local D) device,
     * kept until the prefill ends (the later layer's prompt attention reads them) */
    void **src_kv;      /* (L) */
    /* MiniCache (minicache.c): each layer's pair (-1: unmerged) and the other layer of it;
     * the pairs' merged heads are layers L .. L + mc_n_pairs - 1 of kv */
    int16_t *mc_pair;    /* (L) */
    int16_t *mc_partner; /* (L) */
    int32_t mc_n_pairs;
    int32_t **mc_keep_a; /* (P, Hkv_local) layer a's kept rows, until layer b merges them */
    int64_t *mc_n_keep_a;
    int64_t mc_merged;   /* tokens merged (per local KV head, summed), this rank */
    int64_t mc_retained; /* common tokens kept unmerged by the retention rule, this rank */
    int64_t mc_merged_all, mc_retained_all; /* the same over the whole model (every rank) */
    int32_t **mc_rec;    /* (P, Hkv_local) with UC_SEQ_RECORD_KEPT: merged original positions */
    int64_t *mc_n_rec;
    float *hidden;      /* (n_rows, C) with UC_SEQ_HIDDEN, rank 0 */
    int64_t hidden_rows;
    int32_t *lorc_rank; /* (L) LoRC: latent rank of each layer's heads; NULL without lorc */
};

/* A whole decode step (every layer, from the embedded rows to the last residual add) recorded
 * as backend graphs of a few layers each, for one batch size and index buffer. Several parts,
 * not one graph: the device starts on the first part while the host submits the next ones
 * (submitting a graph costs host time in proportion to its nodes). */
#define DECODE_GRAPH_MAX_ROWS 64
#define DECODE_GRAPH_SLOTS 4
#define DECODE_GRAPH_LAYERS 4     /* layers per part (more where a model would need too many) */
#define DECODE_GRAPH_MAX_PARTS 64
#define ENG_PARALLEL_MIN_HEADS 4096 /* e->par_min_heads: batch 16 of an 8B model (32 x 8 heads) */
struct decode_graph {
    void *exec[DECODE_GRAPH_MAX_PARTS];
    int64_t nb;
    const void *meta; /* the index buffer its ops read */
    const void *tables; /* the block table arena they read */
    bool packed;      /* recorded with packed heads in the batch (their layout and ops) */
    bool merged;      /* recorded with MiniCache merged heads in the batch */
    bool latent;      /* recorded with latent heads (LoRC) in the batch */
    uint64_t epoch;   /* the backend's workspace epoch when recorded */
};

struct uc_engine {
    struct uc_engine_params p;
    char *model_dir;
    char *profile_path;
    struct uc_comm *comm;
    bool owns_backend;
    struct uc_backend *be;
    struct uc_model *m;
    const struct uc_model_config *cfg;
    const struct uc_model_shard *sh;
    int64_t max_ctx;
    struct uc_model_ws ws;
    struct uc_kv_cache kv;
    struct seq **seqs;
    int64_t n_seqs;
    int64_t cap_seqs;
    struct eng_seq_map seq_map; /* the same sequences by id */
    struct uc_profile prof;
    bool have_prof;
    double *cal_head;   /* (L, H) sums */
    double *cal_hidden; /* (L) sums */
    int64_t cal_windows;
    int64_t cal_tokens;
    int64_t step_no;
    /* decode scratch */
    void *dx;   /* (max_batch + prefill_chunk, C): a step's packed rows, decode rows first */
    void *dqkv; /* (max_batch + prefill_chunk, qkv_dim) */
    int32_t *d_tok;
    int32_t *sc_row, *sc_head, *sc_slot; /* scatter lists */
    int64_t sc_cap;
    /* the decoding sequences' block tables in backend memory, kept between steps */
    struct uc_kv_table bt;
    struct uc_kv_table_seq *bt_seqs; /* (bt_seqs_cap) a step's list */
    int64_t bt_seqs_cap;
    int64_t *dm_need; /* (dm_need_cap) blocks a sequence's heads take for the step's token */
    int64_t dm_need_cap;
    int32_t *dm_ids;   /* (dm_ids_cap) the blocks a step's reservation hands out */
    int64_t dm_ids_cap;
    int64_t *dm_first; /* (dm_first_cap) a sequence's first block in dm_ids */
    int64_t dm_first_cap;
    /* the decode step's index arrays for every layer, built on the host and uploaded in one
     * copy (layout: decode_meta_prep) */
    int32_t *dm_host;
    int64_t dm_cap;
    void *dm_dev;
    int64_t dm_dev_cap;
    int64_t *dm_maxn; /* (L) longest head of each layer this step */
    bool dm_packed;   /* the index arrays have the packed heads' part (decode_meta_prep) */
    bool dm_merged;   /* the index arrays have the merged heads' part (MiniCache) */
    struct decode_graph graphs[DECODE_GRAPH_SLOTS];
    int64_t last_nb; /* batch size of the previous decode step */
    struct seq **batch; /* (max_batch) */
    /* the sweep: each prefill's sequence and row-layers left this step */
    struct seq **sw_seq;
    int64_t sw_cap;
    int64_t *sw_left;
    int64_t sw_left_cap;
    float *dec_logits;  /* (max_batch, V) host: the last decode step's logits */
    int32_t *dec_argmax; /* (max_batch) */
    float *psum;
    int64_t psum_cap;
    /* layer-end scratch (host) */
    float *wprob;    /* (H_local, W, n) */
    double *colscore; /* (Hkv, n) */
    double *rowscore; /* (n) */
    int32_t *keep;    /* (Hkv_local, n): the kept rows of each local KV head (row i: keep + i n) */
    void *sel_scratch; /* (Hkv_local) selection scratches of uc_select_scratch_bytes(n) each */
    size_t sel_cap;   /* tokens the layer-end scratch holds */
    double *spec;     /* (H, D) gathered spectra */
    double *spec_local;
    /* query spectra begun in sweep passes for the prompts that end their layer in them, so the
     * eigensolves run beside the rest of the pass (and, for pipelined ends, the next one); each
     * layer end takes its own (prefill.c). A ring, oldest first. */
    struct qs_batch qsb[UC_QSPEC_BATCHES];
    int qs_first, qs_n;
    /* layer ends begun and not finished (pipeline.c), in the order begun; an end's staging
     * slot is its index here */
    struct seq **pend;
    int64_t n_pend, pend_cap;
    bool pipe_ends; /* pipelining on (UC_PIPELINE_ENDS=0: off) */
    /* a decode step's host loops over the batch's heads run on the OpenMP threads from this
     * many (sequences x layers x local KV heads) on; below it waking them costs more than the
     * loops (UC_PARALLEL_MIN_HEADS; the tests set 64 so their small batches take both paths) */
    int64_t par_min_heads;
    int64_t n_pipelined; /* ends finished that way, since creation */
    struct uc_engine_step_info info; /* the last step's (uc_engine_last_step_info) */
    struct uc_buf wire;
    /* KVSharer calibration: each layer's K|V sums over the windows, (L, ks_tokens, 2 Hkv_local D),
     * and the squared distances of their means, (L, L) summed over ranks */
    double *ks_sum;
    int64_t ks_tokens;
    int64_t ks_windows;
    double *ks_dist;
    /* MiniCache calibration (minicache.c): per adjacent layer pair (l, l + 1), this rank's sum of
     * the tokens' angular distances over its own KV heads and the count, (L - 1) each; NULL
     * outside a calibration */
    double *mc_sum;
    double *mc_cnt;
    int64_t diag_layer; /* the last DIAGNOSE step's answer */
    /* LoRC (lorc.c): each layer's sensitivity, agreed over the ranks, and this rank's latent
     * bases (L, Hkv_local, 2, D, D) on the backend; lorc_ready false where lorc cannot run */
    bool lorc_ready;
    double *lorc_log_cond; /* (L) */
    void *lorc_basis;
    bool dm_latent; /* the decode index arrays have the latent heads' ranks (decode_meta_prep) */
    bool dm_shared; /* a sequence of the step reads an earlier layer's cache (KVSharer) */
    int64_t dm_next; /* the first layer whose index arrays this step has not built yet */
    double dm_t0;    /* when the step's decode rows began (decode_prep_ms) */
    /* the lookahead (decode.c): after a decode-only step's layers are launched, the next
     * step's blocks are taken and the tables synced for the same batch while the device runs
     * this one; the next step skips that work when it is exactly that batch, next */
    int64_t ah_nb;   /* the batch it was done for (its sequences' ah_step say which); 0: none */
    int64_t ah_step; /* e->step_no of the step that did it */
    struct seq **ah_batch; /* (ah_batch_cap) a prefill-only step's lookahead batch */
    int64_t ah_batch_cap;
    bool ah_packed, ah_latent;         /* what seq_blocks_needed found */
    int64_t ah_blocks, ah_table_ints; /* what it took and uploaded (the next step's info) */
    /* the decode step in flight (decode.c): launched for the same batch, fed by the argmax
     * kept in backend memory, before the host read the tokens of the step that launched it */
    struct {
        bool live;
        int64_t step;    /* the step it runs as (e->step_no + 1 when launched) */
        int64_t nb;
        int64_t *ids;    /* (max_batch) its sequences, in its rows' order */
        int32_t *expect; /* (max_batch) the tokens it embedded, as the host got them */
        int64_t *map;    /* (max_batch) a step's rows in it (eng_next_covers) */
        int slot;        /* where its argmax goes: ids_dev[slot] and that fetch slot */
        struct uc_engine_step_info info; /* its host side's (reported when taken) */
    } nx;
    int32_t *ids_dev[2]; /* (max_batch) backend memory: a decode step's argmax, by slot */
};

static inline size_t act_size(const struct uc_engine *e) { return e->be->ops->act_size(e->be); }

static inline void *dev_row(const struct uc_engine *e, void *base, int64_t row, int64_t width)
{
    return (char *)base + (size_t)(row * width) * act_size(e);
}

/* engine.c */
bool eng_grow(void **p, int64_t *cap, int64_t need, size_t elem);
/* Whether the layer ends of s need query spectra that can be begun early, in the sweep pass
 * where s ends its layer (prefill.c). */
bool eng_spectra_early(const struct seq *s);
/* Begins the query spectra of the slices' prompts that end their layer in this pass (after
 * their queries are written); with UC_QSPEC_BATCHES in flight the oldest is retired first. */
uc_status eng_spectra_begin(struct uc_engine *e, struct seq *const *seqs, int64_t n);
/* Whether a begun batch may still read its queries (the next pass fences before writing). */
bool eng_spectra_unread(const struct uc_engine *e);
uc_status eng_layer_scratch(struct uc_engine *e, int64_t n, int64_t n_win);

/* wire.c */
struct eng_wire_step {
    struct uc_step s;
    int64_t step_no;
    struct uc_step_new *news;
    int64_t *frees;
    struct uc_step_prefill *prefills;
    struct uc_step_decode *decodes;
    int32_t *prompts;
};
uc_status eng_wire_encode(struct uc_buf *b, const struct uc_step *s, int64_t step_no);
uc_status eng_wire_decode(struct eng_wire_step *d, const char *buf, size_t len);
void eng_wire_fini(struct eng_wire_step *d);
uc_status eng_wire_broadcast(struct uc_engine *e);

/* seq_map.c: put fails on a second entry for an id (and when out of memory); get gives NULL
 * for an id not there; del takes the id's entry out and gives it (NULL: not there). */
uc_status eng_seq_map_put(struct eng_seq_map *m, struct seq *s);
struct seq *eng_seq_map_get(const struct eng_seq_map *m, int64_t id);
struct seq *eng_seq_map_del(struct eng_seq_map *m, int64_t id);
void eng_seq_map_fini(struct eng_seq_map *m);

/* seq.c */
struct seq *eng_find_seq(const struct uc_engine *e, int64_t id);
/* The prefill buffers (residual stream and Q/K/V of the whole prompt), allocated at the first
 * slice with the prompt embedded, and freed when the prefill ends. */
uc_status eng_prefill_buffers(struct uc_engine *e, struct seq *s);
void eng_free_prefill_buffers(struct uc_engine *e, struct seq *s);
/* A prefill buffer of s on the device, counted in s's pf_held and pf_peak; eng_pf_free frees
 * one (NULL: nothing) and sets *p to NULL. */
uc_status eng_pf_alloc(struct uc_engine *e, struct seq *s, void **p, int64_t bytes);
void eng_pf_free(struct uc_engine *e, struct seq *s, void **p);
void eng_seq_destroy(struct uc_engine *e, struct seq *s);
void eng_seq_remove(struct uc_engine *e, int64_t id);
uc_status eng_seq_create(struct uc_engine *e, const struct uc_step_new *n);
uc_status eng_seq_fork(struct uc_engine *e, const struct uc_step_new *n);
int32_t eng_max_group_budget(const struct uc_compress_params *cp);

/* prefill.c */
/* At a layer's first slice: rows record, and the layer's input rows for the hidden-state
 * spectrum (when asked). */
uc_status eng_layer_start(struct uc_engine *e, struct seq *s);
/* A slice of rows [t0, t0 + n) of the layer, before it runs: its share of the hidden-state
 * spectrum (when asked), so no step computes a whole window's covariance. */
uc_status eng_layer_rows(struct uc_engine *e, struct seq *s, int64_t t0, int64_t n);
/* After a layer's last slice: entropy, plan, kept tokens into the cache, stage pruning (after
 * the pending end of an earlier layer of s, if any). */
uc_status eng_layer_end(struct uc_engine *e, struct seq *s);
/* Where a layer end finds the layer's K and V rows (ld apart) and its window scores: the
 * prompt's Q/K/V buffer and scores computed on the spot (eng_end_src_qkv), or, for an end
 * finished after the next pass (pipeline.c), the K|V rows copied aside and the scores begun
 * in a staging slot. */
struct eng_end_src {
    const void *k, *v;
    int64_t ld;
    int32_t slot; /* window_scores_begin's slot; -1: compute them now */
};
struct eng_end_src eng_end_src_qkv(const struct uc_engine *e, const struct seq *s);
/* The layer end of layer l of s (s->layer, or the layer a pending end began at). */
uc_status eng_layer_end_from(struct uc_engine *e, struct seq *s, int64_t l,
                             const struct eng_end_src *src);
/* Whether the end of layer l cuts the rows of s (uncomp-stage, before a stage start; the
 * stage's index into *stage_index when not NULL). */
bool eng_layer_prunes(const struct seq *s, int64_t l, int64_t n_layers, int32_t *stage_index);
/* Whether the stage row scores of s take the max over heads (rather than the sum). */
bool eng_row_score_max(const struct seq *s);
/* Whether the end of layer l adds its row scores to the stage's accumulated ones. */
bool eng_layer_accumulates(const struct seq *s, int64_t l, int64_t n_layers);
/* Whether s ends its layers in parts, one per step (eng_layer_end_part), rather than in the
 * step of the layer's last slice: calibration windows, background work whose steps must stay
 * short. */
bool eng_layer_end_in_parts(const struct seq *s);
/* One part of the layer end of s (all its rows of the layer done): the query spectra of a group
 * of heads, then the hidden-state spectrum, then the rest (eng_layer_end). *finished once the
 * layer end is complete. */
uc_status eng_layer_end_part(struct uc_engine *e, struct seq *s, bool *finished);
/* After the last layer: logits, kept-set records, prefill buffers freed; now decoding. */
uc_status eng_prefill_finish(struct uc_engine *e, struct seq *s);

/* kvsharer.c */
/* Whether layer l of s reads another layer's cache. */
static inline bool eng_layer_shared(const struct seq *s, int64_t l)
{
    return s->plan.share_src[l] != l;
}
/* Whether some later layer of s reads layer l's cache. */
bool eng_layer_is_source(const struct seq *s, int64_t l, int64_t n_layers);
/* At the end of layer l: with UC_SEQ_KVSHARE_STATS its K/V rows into the sums; when it is a
 * source, its K|V rows kept for the layers that read them. */
uc_status eng_kvshare_layer_end(struct uc_engine *e, struct seq *s);
/* The KVSHARE_* steps. */
uc_status eng_kvshare_step(struct uc_engine *e, const struct uc_step *st);
/* Layers whose K|V rows a prompt under cp keeps for later layers (distinct sources of its
 * pairs). */
int64_t eng_kvshare_sources(const struct uc_engine *e, const struct uc_compress_params *cp);
/* The pairs a new sequence shares with: its own, else the profile's. */
void eng_share_pairs_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                         const struct uc_share_pair **pairs, int32_t *n);

/* The parts of the decode step's index arrays for one layer, each E = B Hkv int32s: slot,
 * n_tokens, offset, then kdim and coff when a sequence of the batch has packed heads (ThinK),
 * the latent rank when one has latent heads (LoRC), mc_n, mc_off and mc_side when one has merged
 * heads (MiniCache). per: parts in all; the others: where each starts (in parts), -1 when
 * absent. */
struct eng_meta_layout {
    int64_t per, kdim, lat, mc;
};
static inline struct eng_meta_layout eng_meta_layout(bool packed, bool latent, bool merged)
{
    struct eng_meta_layout y = {3, -1, -1, -1};
    if (packed) {
        y.kdim = y.per;
        y.per += 2;
    }
    if (latent) {
        y.lat = y.per;
        y.per += 1;
    }
    if (merged) {
        y.mc = y.per;
        y.per += 3;
    }
    return y;
}

/* minicache.c */
/* MiniCache's pairs for parameters cp (0 pairs without the stage): partner and pair_of (L,
 * pair_of may be NULL) as uc_minicache_pairs. */
int32_t eng_mc_pairs_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                         int16_t *partner, int16_t *pair_of);
/* A new sequence's pairs (s->cp, s->phase set): its mc_ fields; a fork (src not NULL) takes its
 * source's pairs (the profile's may have changed since). */
uc_status eng_mc_seq_init(struct uc_engine *e, struct seq *s, const struct seq *src);
/* Frees layer a's kept lists (the prefill's end) / everything (the sequence's). */
void eng_mc_free_prefill(struct uc_engine *e, struct seq *s);
void eng_mc_seq_fini(struct uc_engine *e, struct seq *s);
/* The merged head that layer l's local KV head j also reads, and *side (0: the pair's first
 * layer, 1: its second); NULL for an unmerged layer. */
struct uc_kv_head *eng_mc_head(struct seq *s, int64_t l, int64_t j, int32_t *side);
/* With UC_SEQ_RECORD_KEPT: the merged original positions of layer l's pair, local KV head j
 * (NULL with *n = 0 for an unmerged layer). */
const int32_t *eng_mc_merged_positions(const struct seq *s, int64_t l, int64_t j, int64_t *n);
/* At the end of layer s->layer, after each local KV head j selected its kept rows
 * (keep + j keep_ld, nks[j] of them) and before they are scattered: the pair's first layer
 * records them; the second merges (rows k and v of kbase/vbase, ld qkv_dim) and leaves in keep
 * and nks the rows it still scatters itself. */
uc_status eng_mc_layer_end(struct uc_engine *e, struct seq *s, int32_t *keep, int64_t keep_ld,
                           int64_t *nks, const void *kbase, const void *vbase);
/* With UC_SEQ_MC_STATS, at the end of layer s->layer > 0 (before its rows are scattered): each
 * token's distance between layer l - 1's cached K/V (the whole prompt, policy full) and layer
 * l's rows (kbase/vbase) into the calibration sums, for this rank's own KV heads. */
uc_status eng_mc_stats_layer_end(struct uc_engine *e, struct seq *s, const void *kbase,
                                 const void *vbase);
/* The MC_* calibration steps. */
uc_status eng_mc_step(struct uc_engine *e, const struct uc_step *st);
/* lorc.c */
/* At engine creation, on every rank: the bases and the agreed sensitivities (nothing, with an
 * INFO line, where the model cannot use lorc). Collective. */
uc_status eng_lorc_init(struct uc_engine *e);
/* Records the sensitivities in the loaded profile when it lacks them or they differ (and, with
 * save, rank 0 writes the file). */
uc_status eng_lorc_profile(struct uc_engine *e, bool save);
/* Whether a request with these parameters can run lorc here; the reason into msg if not. */
bool eng_lorc_check(const struct uc_engine *e, const struct uc_compress_params *cp, char *msg,
                    size_t msg_size);
/* A new sequence's per-layer ranks (nothing without the lorc stage). */
uc_status eng_lorc_seq_init(struct uc_engine *e, struct seq *s);
/* rank (L) = the ranks a sequence with these parameters gets (0 without lorc). */
void eng_lorc_ranks_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                        int32_t *rank);
/* Layer l's bases on the backend ((Hkv_local, 2, D, D)). */
const void *eng_lorc_basis(const struct uc_engine *e, int64_t layer);
void eng_lorc_fini(struct uc_engine *e);

/* sweep.c */
uc_status eng_sweep_run(struct uc_engine *e, const struct uc_step *st);

/* pipeline.c */
/* Whether the end of layer l of s can be finished after the next pass (its end needs nothing
 * of the layer but the K/V rows, the window scores and the query spectra). */
bool eng_end_pipelined(const struct uc_engine *e, const struct seq *s, int64_t l);
/* Begins the end of layer s->layer: window scores queued into a staging slot, the K|V rows
 * copied aside; s joins the pending ends. */
uc_status eng_end_begin(struct uc_engine *e, struct seq *s);
/* Finishes the pending end of s (nothing when none) / every pending end, in the order begun. */
uc_status eng_end_finish(struct uc_engine *e, struct seq *s);
uc_status eng_end_finish_all(struct uc_engine *e);
/* After an error: the pending ends are forgotten (their rows never reach the cache). */
void eng_end_drop_all(struct uc_engine *e);

/* diag.c */
/* The DIAGNOSE step on every rank: e->diag_layer = the first layer with non-finite K/V of the
 * sequence over every rank's heads. */
uc_status eng_diagnose(struct uc_engine *e, const struct uc_step *st);

/* decode.c */
void eng_graph_drop(struct uc_engine *e, struct decode_graph *g);
uc_status eng_decode_begin(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb,
                           bool *any_evict);
uc_status eng_decode_attend(struct uc_engine *e, int64_t nb, int64_t l, bool any_evict);
uc_status eng_decode_end(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb);
/* Rows [0, nb) of e->batch take their results: e->dec_argmax's tokens (greedy) or e->dec_logits'
 * rows. */
void eng_decode_results(struct uc_engine *e, int64_t nb, bool greedy);
uc_status eng_decode_run(struct uc_engine *e, const struct uc_step *st);
/* The pieces of a decode step that next.c runs for the step in flight: the index arrays'
 * layout for step `step` (eng_decode_ahead_done: whether the lookahead readied the batch for
 * it), the layers' launch, and the lookahead for the step after `step`. */
uc_status eng_decode_meta_prep(struct uc_engine *e, struct seq **batch, int64_t nb,
                               int64_t step);
bool eng_decode_ahead_done(const struct uc_engine *e, struct seq *const *batch, int64_t nb,
                           int64_t step);
uc_status eng_decode_graphed(struct uc_engine *e, int64_t nb);
/* Whether eng_decode_graphed would record graphs for a step of nb rows laid out as the index
 * arrays are now (the step before had nb rows too, and none fits). */
bool eng_decode_records(struct uc_engine *e, int64_t nb);
uc_status eng_decode_ahead(struct uc_engine *e, struct seq **batch, int64_t nb, int64_t step);
/* The lookahead of a prefill-only step (its layers launched, its prompts' logits not yet
 * read): every sequence that decodes after it, those decoding now and the n_end prompts it
 * finishes, gets its next token's blocks and its block table written while the device runs
 * the prompts. */
uc_status eng_decode_ahead_of_prefill(struct uc_engine *e, struct seq **end, int64_t n_end);

/* next.c: the decode step in flight. A greedy decode-only step whose scheduler expects the same
 * batch again (uc_step.decode_again) launches that next step before the host reads its own
 * tokens: the next step embeds this one's argmax from backend memory, so the device goes from
 * one step to the next without waiting for the host. */
bool eng_next_wanted(const struct uc_engine *e, const struct uc_step *st);
/* The end of such a step: its argmax kept and fetched, the next step launched behind it, then
 * its tokens read. */
uc_status eng_next_end(struct uc_engine *e, int64_t nb);
/* Whether the step in flight covers this step's decode rows: each one of its sequences with the
 * token it embedded, in its order (sequences that ended left out); if so its rows' map is laid
 * out for eng_next_take. */
bool eng_next_covers(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb);
/* Takes the step in flight as this step's (launching the next one again when the batch is the
 * same and the scheduler expects it again). */
uc_status eng_next_take(struct uc_engine *e, const struct uc_step *st);
/* Waits for the step in flight and discards it: its sequences go back a token. */
uc_status eng_next_settle(struct uc_engine *e);

#endif
