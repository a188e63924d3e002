/* The engine: the model, its backend, the paged KV cache and the live sequences of one rank,
 * driven in lockstep. Rank 0 builds each step (which sequences start, prefill, decode, end) and
 * calls uc_engine_step, which broadcasts the step descriptor over the MPI control plane and then
 * runs it; every other rank runs uc_engine_serve, which receives and runs the same steps. All
 * ranks therefore hold the same sequences, plans and kept-token sets.
 *
 * Prefill is layer-major: a sequence's whole prompt goes through layer l before layer l+1, so
 * that the compression of layer l (entropy, head budgets, kept tokens) and the stage boundaries
 * of uncomp-stage see the whole prompt. A step with prompts is one sweep over the layers: at each
 * layer the decode rows and the slices of every prompt at that layer share the products
 * (engine/sweep.c), and a prompt advances as far as its row budget for the step reaches. */
#ifndef UC_SHARD_ENGINE_H
#define UC_SHARD_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "base/status.h"
#include "comm.h"
#include "compress/kvsharer.h"
#include "compress/policy.h"
#include "compress/profile.h"
#include "model_config.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_engine;

struct uc_engine_params {
    const char *model_dir;
    struct uc_backend_params backend;
    int64_t kv_memory_bytes; /* pool size per rank (K and V); 0 = default */
    int64_t kv_blocks;       /* if > 0, overrides kv_memory_bytes */
    int64_t block_tokens;    /* tokens per KV block, default 16 */
    int64_t prefill_chunk;   /* prompt rows per sweep pass at one layer (workspace rows beside
                                max_batch decode rows), default 512 */
    int64_t max_batch;       /* most sequences decoded in one step, default 64 */
    int64_t max_ctx;         /* 0 = the model's max_position_embeddings */
    const char *profile_path; /* NULL = MODEL_DIR/uncomp_profile.json */
    bool no_lookahead;        /* decode steps take their blocks in the step, not ahead while
                                 the step before runs (for A/B timings and tests) */
    bool no_overlap;          /* a decode step is never launched before the host has read the
                                 one before it (next.c, "the decode step in flight"; for A/B
                                 timings and tests) */
    bool overlap_sync;        /* ... also on a backend that runs each op as it is called (the
                                 CPU's): no gain there, only each token a step later; for tests */
};

struct uc_engine_params uc_engine_default_params(void);

/* Collective: every rank calls it with the same params. Loads the model slice, agrees on the
 * config and model hash with the other ranks (refusing to run if they differ), allocates the KV
 * pool and loads the calibration profile if there is one. */
uc_status uc_engine_create(struct uc_engine **out, const struct uc_engine_params *p,
                           struct uc_comm *comm);
void uc_engine_destroy(struct uc_engine *e);

const struct uc_model_config *uc_engine_config(const struct uc_engine *e);
struct uc_backend *uc_engine_backend(struct uc_engine *e);
struct uc_comm *uc_engine_comm(struct uc_engine *e);
int64_t uc_engine_max_ctx(const struct uc_engine *e);
size_t uc_engine_weight_bytes(const struct uc_engine *e);
uint64_t uc_engine_model_hash(const struct uc_engine *e);
/* Where this rank's first NaN or Inf weight is ("layer 3"), or NULL when all are finite. */
const char *uc_engine_nonfinite_weights(const struct uc_engine *e);
/* KV pool on this rank. */
int64_t uc_engine_kv_blocks_total(const struct uc_engine *e);
int64_t uc_engine_kv_blocks_used(const struct uc_engine *e);
/* Blocks in use held by more than one sequence (forks share their source's blocks). */
int64_t uc_engine_kv_blocks_shared(const struct uc_engine *e);
int64_t uc_engine_kv_block_tokens(const struct uc_engine *e);
size_t uc_engine_kv_bytes_per_token(const struct uc_engine *e); /* one token, one KV head, K+V */
/* The active profile, or NULL when none is loaded. */
const struct uc_profile *uc_engine_profile(const struct uc_engine *e);
const char *uc_engine_profile_path(const struct uc_engine *e);
const char *uc_engine_model_dir(const struct uc_engine *e);

/* ---- steps ---------------------------------------------------------------------------- */

enum uc_seq_flags {
    UC_SEQ_ALL_LOGITS = 1 << 0,   /* keep logits of every prompt position */
    UC_SEQ_RECORD_KEPT = 1 << 1,  /* keep the kept original positions per (layer, KV head) */
    UC_SEQ_SPECTRA = 1 << 2,      /* keep query and hidden-state spectra per layer */
    UC_SEQ_CALIBRATE = 1 << 3,    /* add this prompt's entropies to the calibration sums */
    UC_SEQ_FORK = 1 << 4,         /* a copy of sequence fork_of (decoding): its cache, plan and
                                     logits; no prompt */
    UC_SEQ_HIDDEN = 1 << 5,       /* rank 0 keeps the last layer's output rows (before the final
                                     norm) for uc_engine_seq_hidden */
    UC_SEQ_KVSHARE_STATS = 1 << 6, /* add this prompt's K/V of every layer to the KVSharer sums
                                      (its length must be the one KVSHARE_RESET set) */
    UC_SEQ_MC_STATS = 1 << 7,      /* add this prompt's adjacent-layer K/V distances to the
                                      MiniCache sums (policy full; after an MC_RESET) */
};

struct uc_step_new {
    int64_t seq_id;
    int32_t flags;
    int32_t max_new_tokens; /* for KV reservation */
    struct uc_compress_params cp;
    int64_t n_prompt;
    const int32_t *prompt; /* borrowed for the call */
    int64_t fork_of;       /* with UC_SEQ_FORK */
};

struct uc_step_prefill {
    int64_t seq_id;
    int64_t budget_rows; /* row-layers this step may process (0 = the whole remaining prefill):
                            rows of its current layer, then of the next, as far as it reaches */
};

enum uc_decode_flags {
    UC_DECODE_GREEDY = 1 << 0, /* only the argmax is needed: computed on the backend when every
                                  row of the step asks for it (one rank), no logits cross */
};

struct uc_step_decode {
    int64_t seq_id;
    int32_t token; /* the token at the sequence's next position */
    int32_t flags; /* enum uc_decode_flags */
};

enum uc_step_op {
    UC_STEP_RUN = 1,
    UC_STEP_HEARTBEAT = 2,
    UC_STEP_SHUTDOWN = 3,
    UC_STEP_PROFILE_RESET = 4,  /* start a calibration: zero the sums */
    UC_STEP_PROFILE_FINISH = 5, /* average the sums into the active profile and save it */
    UC_STEP_DIAGNOSE = 6,       /* find where sequence diag_seq's activations went non-finite */
    UC_STEP_KVSHARE_RESET = 7,  /* KVSharer calibration: zero the per-layer K/V sums for
                                   prompts of ks_tokens tokens */
    UC_STEP_KVSHARE_DIST = 8,   /* the layers' squared cache distances, summed over ranks */
    UC_STEP_KVSHARE_SET = 9,    /* install ks_pairs in the active profile and save it */
    UC_STEP_MC_RESET = 10,      /* MiniCache calibration: zero the adjacent-layer distance sums */
    UC_STEP_MC_SET = 11,        /* all-reduce them into mean distances, select mc_n_pairs pairs,
                                   record both in the active profile and save it */
};

struct uc_step {
    enum uc_step_op op;
    int32_t n_new, n_free, n_prefill, n_decode;
    const struct uc_step_new *news;
    const int64_t *frees;
    const struct uc_step_prefill *prefills;
    const struct uc_step_decode *decodes;
    /* PROFILE_FINISH: head groups, stage eps and source text name */
    int32_t profile_groups;
    double profile_eps;
    char profile_source[256];
    int64_t diag_seq; /* DIAGNOSE: the sequence */
    /* KVSHARE_*: window length (RESET), and the pairs found (SET) */
    int64_t ks_tokens;
    int32_t ks_n_pairs;
    int32_t ks_target;
    double ks_threshold;
    double ks_cosine;
    struct uc_share_pair ks_pairs[UC_MAX_SHARE_PAIRS];
    int32_t mc_n_pairs; /* MC_SET: pairs to select (0: drop the sums, record nothing) */
    /* RUN, rank 0 alone (not sent to the other ranks): the scheduler expects its next step to
     * decode these sequences again, fed their greedy tokens, and nothing else (sequences that
     * end left out). The engine may then launch that step before this one returns
     * (uc_engine_decode_in_flight). */
    bool decode_again;
};

/* Rank 0: broadcasts the step to every rank and runs it. A bad request in the step (an unknown
 * sequence, a prompt longer than the context) fails the step on every rank with the same
 * status before any work is done; a failure during the work ends the job. */
uc_status uc_engine_step(struct uc_engine *e, const struct uc_step *step);
/* Ranks > 0: receive and run steps until SHUTDOWN. Returns UC_OK on a clean shutdown. */
uc_status uc_engine_serve(struct uc_engine *e);
/* Rank 0: tells the other ranks it is alive (call when idle, well within the comm timeout). */
uc_status uc_engine_heartbeat(struct uc_engine *e);
/* Rank 0: ends uc_engine_serve on every rank. */
uc_status uc_engine_shutdown(struct uc_engine *e);

/* Checks a new sequence against the engine before it goes into a step: context length, token
 * ids, parameters. Writes a message naming the field. */
uc_status uc_engine_check_new(const struct uc_engine *e, const struct uc_step_new *n, char *msg,
                              size_t msg_size);
/* Bytes of the prefill buffers of a prompt of n_prompt tokens compressed by cp on this rank, at
 * most (its residual stream and Q/K/V, allocated at its first slice, and what its compression
 * adds: a stage cut's new residual stream, a pipelined layer end's K|V rows, KVSharer's source
 * layers; all freed when its prefill ends). The report's prefill_bytes_peak_local is what it
 * held. */
int64_t uc_engine_prefill_bytes(const struct uc_engine *e, const struct uc_compress_params *cp,
                                int64_t n_prompt);
/* KV blocks this rank must keep free for the sequence at most (its post-compression footprint
 * plus max_new_tokens of decode; with UC_SEQ_FORK, what the fork holds beside the blocks it
 * shares with its source). */
int64_t uc_engine_kv_blocks_needed(const struct uc_engine *e, const struct uc_step_new *n);
/* KV blocks this rank must keep free for one fork (UC_SEQ_FORK, max_new_tokens of n) of the
 * sequence n will be, at most, beside the blocks the fork shares with it: forks share their
 * source's full blocks and copy each head's partly filled last block, so appending this is a
 * block per head plus the decode; with decode_mode=evict a fork may come to copy every shared
 * block (eviction rewrites them), so it is n's own bound. With UC_SEQ_FORK set in n,
 * uc_engine_kv_blocks_needed gives the same for the existing source, exactly. */
int64_t uc_engine_kv_fork_blocks_needed(const struct uc_engine *e, const struct uc_step_new *n);

/* ---- sequence state (valid between steps) ----------------------------------------------- */

enum uc_seq_phase {
    UC_SEQ_UNKNOWN = 0,
    UC_SEQ_PREFILLING = 1,
    UC_SEQ_DECODING = 2, /* prefill done; logits of the last position are ready */
};

enum uc_seq_phase uc_engine_seq_phase(const struct uc_engine *e, int64_t seq_id);
/* Logits of the sequence's last step: (n_rows, V) host floats, engine-owned, valid until the
 * next step. n_rows is 1 except after a prefill with UC_SEQ_ALL_LOGITS. */
const float *uc_engine_seq_logits(const struct uc_engine *e, int64_t seq_id, int64_t *n_rows);
/* After a decode step run with UC_DECODE_GREEDY on every row: the argmax token (true), in place
 * of logits (uc_engine_seq_logits then returns NULL). */
bool uc_engine_seq_greedy(const struct uc_engine *e, int64_t seq_id, int32_t *token);
/* Where a prefilling sequence is: its current layer and the rows of that layer done (the next
 * slice's rows attend to that many keys before them). False, with both 0, when it is not
 * prefilling. Engine thread only, between steps. */
bool uc_engine_seq_prefill_pos(const struct uc_engine *e, int64_t seq_id, int64_t *layer,
                               int64_t *row);
/* Rows of background prefill (calibration windows) to give the sequence in its next step:
 * `rows`, or fewer deep into a long prompt's layer, so that the slice's attention work (its rows
 * x the keys before them) stays within that of `rows` rows at 1024 tokens of context; at least
 * 1. A sequence not created yet counts as at its start. Engine thread only, between steps. */
int64_t uc_engine_background_rows(const struct uc_engine *e, int64_t seq_id, int64_t rows);
/* Layer ends this rank has finished after the next pass (pipelined: the host chose kept
 * tokens while the device ran on), since the engine was created. */
int64_t uc_engine_pipelined_ends(const struct uc_engine *e);
/* How a decode-only step ran its layers. */
enum uc_step_graph {
    UC_STEP_GRAPH_NONE = 0,     /* not a decode-only step, or one that evicts */
    UC_STEP_GRAPH_REPLAYED = 1, /* from recorded graphs */
    UC_STEP_GRAPH_RECORDED = 2, /* recorded, then launched */
    UC_STEP_GRAPH_DIRECT = 3,   /* directly (no graphs here, or the recording could not be made) */
    UC_STEP_GRAPH_MODES = 4,
};

/* Where the last step's decode rows went, for step traces (rank 0, engine thread). */
struct uc_engine_step_info {
    double decode_prep_ms;   /* host time before the decode rows' first layer: blocks taken,
                                block tables synced, index arrays built and uploaded */
    int64_t blocks_taken;    /* KV blocks the decode rows' heads took */
    int64_t table_ints;      /* ints of block tables uploaded (a scatter counts 2 per id) */
    enum uc_step_graph graph;
    bool lookahead; /* the blocks were taken and the tables synced while the step before ran */
    double free_ms;  /* host time ending the step's finished sequences (their KV blocks back) */
    double new_ms;   /* host time starting its new sequences */
    bool overlapped; /* its decode rows ran as the step in flight, launched by the step before */
};
void uc_engine_last_step_info(const struct uc_engine *e, struct uc_engine_step_info *out);
/* Whether a decode step is in flight: launched by the last step (decode_again) for the same
 * sequences, fed by its greedy tokens. The scheduler's next step should then decode those
 * sequences alone (any of them may be left out); anything else waits for the device to finish
 * that step and discards it (its sequences go back a token), costing the step's device time. */
bool uc_engine_decode_in_flight(const struct uc_engine *e);
/* With UC_SEQ_HIDDEN, on rank 0 after the prefill: the last layer's output rows (n_rows, C),
 * before the final norm; engine-owned, valid until the sequence ends. NULL elsewhere. */
const float *uc_engine_seq_hidden(const struct uc_engine *e, int64_t seq_id, int64_t *n_rows);
/* KVSharer calibration (rank 0; the other ranks serve its steps): runs `windows` windows of
 * `window` tokens of `tokens` unshared, ranks the layer pairs by the distance of their averaged
 * caches (summed over ranks), searches the pairs greedily (compress/kvsharer.h), and installs
 * and saves them in the active profile on every rank (which must exist: calibrate the entropy
 * profile first). Uses sequence ids below -1000. UC_ERR_KV_FULL when the pool cannot hold a
 * window now. */
uc_status uc_engine_kvsharer_calibrate(struct uc_engine *e, const int32_t *tokens,
                                       int64_t n_tokens, int64_t window,
                                       const struct uc_kvsharer_params *kp,
                                       struct uc_kvsharer_result *out);
/* After a KVSharer calibration: the (L, L) squared distances of the layers' averaged caches,
 * summed over the ranks, that ranked its pairs; NULL before one. Engine thread only. */
const double *uc_engine_kvsharer_distances(const struct uc_engine *e);
/* MiniCache calibration (rank 0; the other ranks serve its steps): prefills the windows of
 * `window` tokens of `tokens` (at most 16, one step, policy full); each rank sums, for every
 * adjacent layer pair (l, l + 1), the angular distance of each token's cached K/V (the larger
 * of the key's and the value's, kv_merge_dist) over its own KV heads; the sums are all-reduced
 * (a replicated KV head counted once) into the mean distance per pair, and the n_pairs pairs of
 * least total distance (0: uc_minicache_default_pairs) are recorded with the distances in the
 * active profile on every rank, identical everywhere, and saved (rank 0). The profile must
 * exist (UC_ERR_UNAVAILABLE: calibrate the entropy profile first); UC_ERR_KV_FULL when the pool
 * cannot hold the windows now; UC_ERR_INVALID_ARG for a pair count the layers cannot hold. Uses
 * sequence ids -2000 and below. */
uc_status uc_engine_minicache_calibrate(struct uc_engine *e, const int32_t *tokens,
                                        int64_t n_tokens, int64_t window, int32_t n_pairs);
/* Tokens in context (prompt plus decoded). */
int64_t uc_engine_seq_len(const struct uc_engine *e, int64_t seq_id);

/* What compression did to one sequence (API.md CompressionReport). */
struct uc_compress_report {
    enum uc_policy policy;
    uint32_t stages;         /* enum uc_stage_flag bits of the request */
    int32_t n_shared_layers; /* KVSharer: layers reading another layer's cache (no KV held) */
    int32_t kv_budget;
    int64_t kv_tokens_full;  /* prompt tokens x layers x KV heads (whole model) */
    int64_t kv_tokens_kept;  /* after prefill compression (whole model) */
    int64_t kv_bytes_full;
    int64_t kv_bytes_kept;
    double ratio;
    int32_t n_stages;
    int64_t stage_rows[UC_MAX_STAGES + 1];
    int32_t stage_starts[UC_MAX_STAGES];
    int32_t n_groups;
    int32_t group_budget[UC_MAX_HEAD_GROUPS];
    double group_mean_kept[UC_MAX_HEAD_GROUPS];
    int64_t n_layers;
    double *entropy_min;  /* (L), NaN where not computed; engine-owned */
    double *entropy_mean;
    double *entropy_max;
    double compress_ms;   /* time in selection, entropy and gathers */
    double prefill_ms;
    uint64_t plan_checksum;
    int64_t kv_tokens_held_local; /* tokens actually in this rank's cache now */
    int64_t kv_blocks_held_local;
    int64_t prefill_bytes_peak_local; /* the most bytes its prefill buffers held on this rank */
    float think_ratio;            /* ThinK's pruned share (0: no think stage) */
    int64_t key_channels;         /* key channels each KV head keeps (ThinK), D without */
    int64_t kv_row_bytes_local;   /* bytes of this rank's cached K/V rows (packed rows smaller) */
    int32_t minicache_pairs;      /* MiniCache: layer pairs merged (0: no minicache stage) */
    int32_t minicache_start;      /* its first merged layer */
    int16_t minicache_first[UC_MINICACHE_MAX_PAIRS]; /* each pair's first layer, ascending: the
                                                        request's minicache_start on, else the
                                                        profile's calibrated pairs, else L / 2 on */
    int64_t minicache_merged;     /* (token, KV head) pairs of layers stored merged, whole model */
    int64_t minicache_retained;   /* common tokens kept unmerged (the retention rule) */
    float lorc_ratio;             /* LoRC's kept share (0: no lorc stage) */
    const int32_t *lorc_rank;     /* (L) LoRC's latent rank per layer; engine-owned, NULL without */
    int32_t lorc_rank_first;      /* LoRC: layer 0's and the last layer's ranks (0 without) */
    int32_t lorc_rank_last;
};
/* The report of a sequence (pointers valid until the sequence ends). */
uc_status uc_engine_seq_report(const struct uc_engine *e, int64_t seq_id,
                               struct uc_compress_report *out);
/* LoRC: each layer's sensitivity (log condition number, agreed over the ranks), L values, or
 * NULL where lorc cannot run on this model. Any thread (constant after create). */
const double *uc_engine_lorc_log_cond(const struct uc_engine *e);
/* The plan of a sequence (valid until it ends). */
const struct uc_plan *uc_engine_seq_plan(const struct uc_engine *e, int64_t seq_id);
/* With UC_SEQ_RECORD_KEPT: the kept original positions of (layer, global KV head), gathered
 * from every rank at the end of prefill. */
const int32_t *uc_engine_seq_kept(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                  int64_t kv_head, int64_t *n);
/* With UC_SEQ_RECORD_KEPT: whether every rank computed the same plan checksum (and replicated
 * KV heads the same kept sets). */
bool uc_engine_seq_plan_agreed(const struct uc_engine *e, int64_t seq_id);
/* ThinK: the kept key channels (ascending) of (layer, KV head) when that head is on this rank
 * and packed, with *n of them; NULL with *n = 0 otherwise. Valid until the sequence ends. */
const int32_t *uc_engine_seq_key_channels(const struct uc_engine *e, int64_t seq_id,
                                          int64_t layer, int64_t kv_head, int64_t *n);
/* MiniCache, with UC_SEQ_RECORD_KEPT: the original positions (ascending) that layer `layer`'s
 * pair stores merged for KV head kv_head, when that head is on this rank; NULL with *n = 0 for
 * an unmerged layer. uc_engine_seq_kept then lists the pair's first layer's whole kept set and
 * the second layer's unmerged tokens only. Valid until the sequence ends. */
const int32_t *uc_engine_seq_merged(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                    int64_t kv_head, int64_t *n);
/* With UC_SEQ_RECORD_KEPT and uncomp-stage: original positions of the rows present at a layer. */
const int32_t *uc_engine_seq_rows(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                  int64_t *n);
/* With UC_SEQ_SPECTRA: eigenvalues (descending) of query head h (global) at a layer (D values)
 * and of the layer's input hidden states (C values). */
const double *uc_engine_seq_query_spectrum(const struct uc_engine *e, int64_t seq_id,
                                           int64_t layer, int64_t head);
const double *uc_engine_seq_hidden_spectrum(const struct uc_engine *e, int64_t seq_id,
                                            int64_t layer);
/* Rank 0, after a sequence's logits came out NaN or Inf: the first layer whose cached K or V of
 * the sequence holds a NaN or Inf, over every rank's heads (one step of its own that every rank
 * runs, agreeing by an all-reduce; normal steps pay nothing). *layer = n_layers when every
 * cached value is finite, -1 on failure. Layer l's cache is computed from layer l's input, so
 * the activations went non-finite inside layer *layer - 1 (uc_engine_nonfinite_origin says so
 * in words). With compression the cache holds the kept tokens only, so this bounds the layer
 * from above. Engine thread only, between steps. */
uc_status uc_engine_diagnose_nonfinite(struct uc_engine *e, int64_t seq_id, int64_t *layer);
/* Writes where non-finite activations arose, from uc_engine_diagnose_nonfinite's layer:
 * "layer 3: its K/V cache is finite, layer 4's is not (so layer 3's attention or MLP, or layer
 * 4's K/V projection)", "the embedding: ...", or "layer 7 or the LM head: ...". Returns what
 * snprintf returns. */
int uc_engine_nonfinite_origin(const struct uc_engine *e, int64_t first_bad_kv_layer, char *buf,
                               size_t buf_size);
/* Number of live sequences. */
int64_t uc_engine_n_seqs(const struct uc_engine *e);

#ifdef __cplusplus
}
#endif
#endif
