/* The engine of one rank: sequences, lockstep steps, layer-major prefill with the compression
 * of UNCOMP.md at every layer end, and batched decode over the paged cache.
 *
 * Sections: step wire format; engine lifecycle; sequences; prefill (layer start, slices,
 * layer end: entropy, plan, kept tokens, stage rows); decode (append and evict); the step loop;
 * reports and accessors. */
#include "engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "compress/entropy.h"
#include "comm_nccl.h"
#include "compress/select.h"
#include "kv_cache.h"
#include "model.h"

#define STEP_MAGIC 0x55435354u /* "UCST" */
#define STEP_INLINE 4096       /* bytes of a step sent in the first broadcast */

/* Evict mode: the attention rows of a head's last W queries over its slots (slot order). */
struct ring {
    float *rows;  /* (W, cap) */
    int32_t cap;  /* columns */
    int32_t n_rows;
    int32_t next; /* row that the next query overwrites */
};

struct seq {
    int64_t id;
    int32_t flags;
    int32_t max_new;
    struct uc_compress_params cp;
    enum uc_seq_phase phase;
    int64_t n_prompt;
    int64_t n_ctx; /* tokens whose K/V are in context (prompt + decoded) */
    /* prefill state */
    int64_t layer;
    int64_t t_done;
    int64_t n_rows;   /* rows present at the current layer */
    void *x;          /* (n_prompt, C) residual stream, device */
    void *qkv;        /* (n_prompt, qkv_dim) this layer's Q, K, V, device */
    int32_t *pos;     /* (n_rows) original positions of the rows present */
    int32_t stage;
    double *row_acc;  /* (n_rows) accumulated stage row scores (accum row scores) */
    struct uc_plan plan;
    struct uc_kv_seq kv;
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
    struct ring *rings; /* (L, Hkv_local), evict mode */
};

/* A whole decode step (every layer, from the embedded rows to the last residual add) recorded
 * as backend graphs of a few layers each, for one batch size and index buffer. Several parts,
 * not one graph: the device starts on the first part while the host submits the next ones
 * (submitting a graph costs host time in proportion to its nodes). */
#define DECODE_GRAPH_MAX_ROWS 64
#define DECODE_GRAPH_SLOTS 4
#define DECODE_GRAPH_LAYERS 4     /* layers per part (more where a model would need too many) */
#define DECODE_GRAPH_MAX_PARTS 64
struct decode_graph {
    void *exec[DECODE_GRAPH_MAX_PARTS];
    int64_t nb;
    const void *meta; /* the index buffer its ops read */
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
    struct uc_profile prof;
    bool have_prof;
    double *cal_head;   /* (L, H) sums */
    double *cal_hidden; /* (L) sums */
    int64_t cal_windows;
    int64_t cal_tokens;
    int64_t step_no;
    /* decode scratch */
    void *dx;   /* (max_batch, C) */
    void *dqkv; /* (max_batch, qkv_dim) */
    int32_t *d_tok;
    int32_t *sc_row, *sc_head, *sc_slot; /* scatter lists */
    int64_t sc_cap;
    /* the decode step's index arrays for every layer, built on the host and uploaded in one
     * copy (layout: decode_meta_build) */
    int32_t *dm_host;
    int64_t dm_cap;
    void *dm_dev;
    int64_t dm_dev_cap;
    int64_t *dm_maxn; /* (L) longest head of each layer this step */
    struct decode_graph graphs[DECODE_GRAPH_SLOTS];
    int64_t last_nb; /* batch size of the previous decode step */
    struct seq **batch; /* (max_batch) */
    float *dec_logits;  /* (max_batch, V) host: the last decode step's logits */
    int32_t *dec_argmax; /* (max_batch) */
    float *psum;
    int64_t psum_cap;
    /* layer-end scratch (host) */
    float *wprob;    /* (H_local, W, n) */
    double *colscore; /* (Hkv, n) */
    double *rowscore; /* (n) */
    int32_t *keep;    /* (n) */
    void *sel_scratch;
    size_t sel_cap;   /* tokens the layer-end scratch holds */
    double *cov;      /* (H_local, D, D) or (C, C) */
    double *spec;     /* (H, D) gathered spectra */
    double *spec_local;
    float *hid_host;  /* (n, C) */
    size_t hid_cap;
    struct uc_buf wire;
};

/* ---- small helpers ---------------------------------------------------------------------- */

static size_t act_size(const struct uc_engine *e) { return e->be->ops->act_size(e->be); }

static void *dev_row(const struct uc_engine *e, void *base, int64_t row, int64_t width)
{
    return (char *)base + (size_t)(row * width) * act_size(e);
}

static bool grow(void **p, int64_t *cap, int64_t need, size_t elem)
{
    if (need <= *cap) {
        return true;
    }
    int64_t c = *cap ? *cap : 64;
    while (c < need) {
        c *= 2;
    }
    void *n = uc_realloc(*p, (size_t)c * elem);
    if (!n) {
        return false;
    }
    *p = n;
    *cap = c;
    return true;
}

/* Scatter lists (source row, head, destination slot) for n entries. */
static uc_status ensure_scatter(struct uc_engine *e, int64_t n)
{
    if (n <= e->sc_cap) {
        return UC_OK;
    }
    int64_t cap = e->sc_cap ? e->sc_cap : 64;
    while (cap < n) {
        cap *= 2;
    }
    int32_t *r = uc_realloc(e->sc_row, (size_t)cap * sizeof(int32_t));
    if (r) {
        e->sc_row = r;
    }
    int32_t *h = uc_realloc(e->sc_head, (size_t)cap * sizeof(int32_t));
    if (h) {
        e->sc_head = h;
    }
    int32_t *sl = uc_realloc(e->sc_slot, (size_t)cap * sizeof(int32_t));
    if (sl) {
        e->sc_slot = sl;
    }
    if (!r || !h || !sl) {
        return UC_ERRF(UC_ERR_NOMEM, "scatter list entries=%lld", (long long)n);
    }
    e->sc_cap = cap;
    return UC_OK;
}

/* Host scratch for layer-end work on n tokens. */
static uc_status ensure_layer_scratch(struct uc_engine *e, int64_t n, int64_t n_win)
{
    size_t need = (size_t)n;
    int64_t hl = e->sh->n_heads, hkv = e->cfg->n_heads_kv;
    if (n_win > 64) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "window=%lld exceeds 64", (long long)n_win);
    }
    if (need <= e->sel_cap) {
        return UC_OK;
    }
    if (need < e->sel_cap) {
        need = e->sel_cap;
    }
    uc_free(e->wprob);
    uc_free(e->colscore);
    uc_free(e->rowscore);
    uc_free(e->keep);
    uc_free(e->sel_scratch);
    e->wprob = uc_malloc(need * (size_t)(hl * 64) * sizeof(float));
    e->colscore = uc_malloc(need * (size_t)hkv * sizeof(double));
    e->rowscore = uc_malloc(need * sizeof(double));
    e->keep = uc_malloc(need * sizeof(int32_t));
    e->sel_scratch = uc_malloc(uc_select_scratch_bytes((int64_t)need));
    if (!e->wprob || !e->colscore || !e->rowscore || !e->keep || !e->sel_scratch) {
        e->sel_cap = 0;
        return UC_ERRF(UC_ERR_NOMEM, "layer scratch tokens=%zu", need);
    }
    e->sel_cap = need;
    return UC_OK;
}

/* ---- step wire format ------------------------------------------------------------------- */

struct wire_hdr {
    uint32_t magic;
    int32_t op;
    int64_t step_no;
    uint64_t n_bytes; /* payload bytes after the header */
};

static void put(struct uc_buf *b, const void *p, size_t n)
{
    if (n > 0) {
        uc_buf_append(b, p, n);
    }
}

static uc_status encode_step(struct uc_buf *b, const struct uc_step *s, int64_t step_no)
{
    b->len = 0;
    struct wire_hdr h = {STEP_MAGIC, (int32_t)s->op, step_no, 0};
    put(b, &h, sizeof h);
    int32_t counts[4] = {s->n_new, s->n_free, s->n_prefill, s->n_decode};
    put(b, counts, sizeof counts);
    for (int32_t i = 0; i < s->n_new; i++) {
        const struct uc_step_new *n = &s->news[i];
        put(b, &n->seq_id, sizeof n->seq_id);
        put(b, &n->flags, sizeof n->flags);
        put(b, &n->max_new_tokens, sizeof n->max_new_tokens);
        put(b, &n->cp, sizeof n->cp);
        put(b, &n->n_prompt, sizeof n->n_prompt);
        put(b, &n->fork_of, sizeof n->fork_of);
        put(b, n->prompt, (size_t)n->n_prompt * sizeof(int32_t));
    }
    if (s->n_free) {
        put(b, s->frees, (size_t)s->n_free * sizeof(int64_t));
    }
    if (s->n_prefill) {
        put(b, s->prefills, (size_t)s->n_prefill * sizeof(struct uc_step_prefill));
    }
    if (s->n_decode) {
        put(b, s->decodes, (size_t)s->n_decode * sizeof(struct uc_step_decode));
    }
    put(b, &s->profile_groups, sizeof s->profile_groups);
    put(b, &s->profile_eps, sizeof s->profile_eps);
    put(b, s->profile_source, sizeof s->profile_source);
    if (b->oom) {
        return UC_ERRF(UC_ERR_NOMEM, "step wire bytes=%zu", b->len);
    }
    ((struct wire_hdr *)(void *)b->data)->n_bytes = b->len - sizeof h;
    return UC_OK;
}

/* Decoded steps point into the wire buffer; arrays that need alignment are copied. */
struct decoded_step {
    struct uc_step s;
    struct uc_step_new *news;
    int64_t *frees;
    struct uc_step_prefill *prefills;
    struct uc_step_decode *decodes;
    int32_t *prompts;
};

static void decoded_fini(struct decoded_step *d)
{
    uc_free(d->news);
    uc_free(d->frees);
    uc_free(d->prefills);
    uc_free(d->decodes);
    uc_free(d->prompts);
    memset(d, 0, sizeof *d);
}

struct reader {
    const char *p;
    size_t left;
    bool bad;
};

static void take(struct reader *r, void *dst, size_t n)
{
    if (r->bad || n > r->left) {
        r->bad = true;
        memset(dst, 0, n);
        return;
    }
    memcpy(dst, r->p, n);
    r->p += n;
    r->left -= n;
}

static uc_status decode_step(struct decoded_step *d, const char *buf, size_t len)
{
    memset(d, 0, sizeof *d);
    struct reader r = {buf, len, false};
    struct wire_hdr h;
    take(&r, &h, sizeof h);
    if (r.bad || h.magic != STEP_MAGIC) {
        return UC_ERRF(UC_ERR_FORMAT, "step wire: bad header");
    }
    d->s.op = (enum uc_step_op)h.op;
    int32_t counts[4];
    take(&r, counts, sizeof counts);
    if (r.bad || counts[0] < 0 || counts[1] < 0 || counts[2] < 0 || counts[3] < 0) {
        return UC_ERRF(UC_ERR_FORMAT, "step wire: bad counts");
    }
    d->s.n_new = counts[0];
    d->s.n_free = counts[1];
    d->s.n_prefill = counts[2];
    d->s.n_decode = counts[3];
    d->news = uc_calloc((size_t)counts[0] + 1, sizeof *d->news);
    d->frees = uc_calloc((size_t)counts[1] + 1, sizeof *d->frees);
    d->prefills = uc_calloc((size_t)counts[2] + 1, sizeof *d->prefills);
    d->decodes = uc_calloc((size_t)counts[3] + 1, sizeof *d->decodes);
    d->prompts = uc_malloc(len + 4);
    if (!d->news || !d->frees || !d->prefills || !d->decodes || !d->prompts) {
        decoded_fini(d);
        return UC_ERRF(UC_ERR_NOMEM, "step wire");
    }
    size_t used = 0;
    for (int32_t i = 0; i < counts[0]; i++) {
        struct uc_step_new *n = &d->news[i];
        take(&r, &n->seq_id, sizeof n->seq_id);
        take(&r, &n->flags, sizeof n->flags);
        take(&r, &n->max_new_tokens, sizeof n->max_new_tokens);
        take(&r, &n->cp, sizeof n->cp);
        take(&r, &n->n_prompt, sizeof n->n_prompt);
        take(&r, &n->fork_of, sizeof n->fork_of);
        if (r.bad || n->n_prompt < 0 || (size_t)n->n_prompt * 4 > r.left) {
            decoded_fini(d);
            return UC_ERRF(UC_ERR_FORMAT, "step wire: bad prompt");
        }
        take(&r, d->prompts + used, (size_t)n->n_prompt * sizeof(int32_t));
        n->prompt = d->prompts + used;
        used += (size_t)n->n_prompt;
    }
    take(&r, d->frees, (size_t)counts[1] * sizeof(int64_t));
    take(&r, d->prefills, (size_t)counts[2] * sizeof(struct uc_step_prefill));
    take(&r, d->decodes, (size_t)counts[3] * sizeof(struct uc_step_decode));
    take(&r, &d->s.profile_groups, sizeof d->s.profile_groups);
    take(&r, &d->s.profile_eps, sizeof d->s.profile_eps);
    take(&r, d->s.profile_source, sizeof d->s.profile_source);
    if (r.bad) {
        decoded_fini(d);
        return UC_ERRF(UC_ERR_FORMAT, "step wire: truncated");
    }
    d->s.profile_source[sizeof d->s.profile_source - 1] = '\0';
    d->s.news = d->news;
    d->s.frees = d->frees;
    d->s.prefills = d->prefills;
    d->s.decodes = d->decodes;
    return UC_OK;
}

/* Rank 0 sends, others receive: a fixed first broadcast carries the header and up to
 * STEP_INLINE bytes; a second one carries the rest. */
static uc_status broadcast_wire(struct uc_engine *e)
{
    char first[STEP_INLINE];
    memset(first, 0, sizeof first);
    bool root = uc_comm_rank(e->comm) == 0;
    if (root) {
        memcpy(first, e->wire.data, e->wire.len < STEP_INLINE ? e->wire.len : STEP_INLINE);
    }
    uc_status rc = uc_comm_bcast(e->comm, first, sizeof first, 0);
    if (rc != UC_OK) {
        return rc;
    }
    struct wire_hdr h;
    memcpy(&h, first, sizeof h);
    if (h.magic != STEP_MAGIC || h.n_bytes > (1ull << 32)) {
        return UC_ERRF(UC_ERR_FORMAT, "step wire: bad magic from rank 0");
    }
    size_t total = sizeof h + (size_t)h.n_bytes;
    if (!root) {
        e->wire.len = 0;
        uc_buf_append(&e->wire, first, total < STEP_INLINE ? total : STEP_INLINE);
        if (total > STEP_INLINE) {
            char *tmp = uc_calloc(1, total - STEP_INLINE);
            if (!tmp) {
                UC_FATAL("step wire: cannot receive %zu bytes", total);
            }
            uc_buf_append(&e->wire, tmp, total - STEP_INLINE);
            uc_free(tmp);
        }
        if (e->wire.oom) {
            UC_FATAL("step wire: out of memory for %zu bytes", total);
        }
    }
    if (total > STEP_INLINE) {
        rc = uc_comm_bcast(e->comm, e->wire.data + STEP_INLINE, total - STEP_INLINE, 0);
    }
    return rc;
}

/* ---- lifecycle -------------------------------------------------------------------------- */

struct uc_engine_params uc_engine_default_params(void)
{
    struct uc_engine_params p = {
        .model_dir = NULL,
        .backend = uc_backend_default_params(),
        .kv_memory_bytes = 0,
        .kv_blocks = 0,
        .block_tokens = 16,
        .prefill_chunk = 512,
        .max_batch = 64,
        .max_ctx = 0,
        .profile_path = NULL,
    };
    return p;
}

static uc_status load_profile(struct uc_engine *e)
{
    if (!uc_file_exists(e->profile_path)) {
        UC_LOG0(UC_LOG_LEVEL_INFO, "engine: no calibration profile at %s", e->profile_path);
        return UC_OK;
    }
    uc_status rc = uc_profile_load(&e->prof, e->profile_path, e->cfg->n_layers, e->cfg->n_heads,
                                   e->cfg->n_heads_kv);
    if (rc != UC_OK) {
        return rc;
    }
    e->have_prof = true;
    if (e->prof.model_hash != 0 && e->prof.model_hash != uc_model_hash(e->m)) {
        UC_LOG0(UC_LOG_LEVEL_WARN, "engine: profile %s was calibrated on another checkpoint "
                "(hash %016llx, this one %016llx); run Calibrate to rebuild it",
                e->profile_path, (unsigned long long)e->prof.model_hash,
                (unsigned long long)uc_model_hash(e->m));
    }
    UC_LOG0(UC_LOG_LEVEL_INFO, "engine: profile %s (source %s, %d stage boundaries)",
            e->profile_path, e->prof.source, e->prof.n_stage_starts);
    return UC_OK;
}

uc_status uc_engine_create(struct uc_engine **out, const struct uc_engine_params *p,
                           struct uc_comm *comm)
{
    *out = NULL;
    uc_status rc;
    struct uc_engine *e = uc_calloc(1, sizeof *e);
    if (!e) {
        return UC_ERRF(UC_ERR_NOMEM, "engine");
    }
    e->p = *p;
    e->comm = comm;
    uc_buf_init(&e->wire);
    e->model_dir = uc_strdup(p->model_dir ? p->model_dir : ".");
    e->profile_path = p->profile_path  ? uc_strdup(p->profile_path)
                      : e->model_dir ? uc_path_join(e->model_dir, "uncomp_profile.json")
                                     : NULL;
    e->p.model_dir = e->model_dir;
    e->p.profile_path = e->profile_path;
    if (!e->model_dir || !e->profile_path) {
        rc = UC_ERRF(UC_ERR_NOMEM, "engine");
        goto out;
    }
    if (e->p.block_tokens <= 0 || e->p.prefill_chunk <= 0 || e->p.max_batch <= 0) {
        rc = UC_ERRF(UC_ERR_INVALID_ARG, "engine: block_tokens, prefill_chunk and max_batch must "
                     "be positive");
        goto out;
    }
    /* Every rank checks the configuration it was given against the others before loading. */
    uint64_t ph = UC_FNV_INIT;
    ph = uc_fnv1a(ph, &e->p.kv_memory_bytes, sizeof(int64_t) * 6);
    ph = uc_fnv1a(ph, &e->p.backend.kind, sizeof e->p.backend.kind);
    int same = 1;
    UC_CHECK(uc_comm_agree_u64(comm, ph, "engine parameters", &same), rc, out);
    if (!same) {
        rc = UC_ERRF(UC_ERR_INVALID_ARG, "ranks were started with different engine parameters");
        goto out;
    }
    UC_CHECK(uc_backend_create(&e->be, &e->p.backend), rc, out);
    e->owns_backend = true;
    if (e->be->kind == UC_BACKEND_CUDA && uc_comm_size(comm) > 1) {
        /* the GPU data plane: NCCL, its unique id carried over MPI */
        UC_CHECK(uc_comm_nccl_attach(comm, e->be->device_index), rc, out);
    }
    struct uc_model_params mp = {.model_dir = e->model_dir, .be = e->be, .comm = comm};
    rc = uc_model_create(&e->m, &mp);
    /* agree on success first: a rank that failed to load must not leave the others waiting */
    int64_t failed = rc != UC_OK;
    uc_status rc2 = uc_comm_allreduce_max(comm, &failed, 1, UC_COMM_I64);
    if (rc != UC_OK) {
        goto out;
    }
    if (rc2 != UC_OK || failed) {
        rc = UC_ERRF(UC_ERR_UNAVAILABLE, "another rank failed to load the model");
        goto out;
    }
    e->cfg = uc_model_cfg(e->m);
    e->sh = uc_model_shard(e->m);
    if (!p->profile_path && access(e->model_dir, W_OK) != 0) {
        /* a read-only model folder: keep its profile in a state folder, named by the model */
        const char *tmp = getenv("TMPDIR");
        char path[4096];
        snprintf(path, sizeof path, "%s/uncomp-profiles", tmp && tmp[0] ? tmp : "/tmp");
        mkdir(path, 0755);
        snprintf(path + strlen(path), sizeof path - strlen(path), "/%016llx.json",
                 (unsigned long long)uc_model_hash(e->m));
        uc_free(e->profile_path);
        e->profile_path = uc_strdup(path);
        if (!e->profile_path) {
            rc = UC_ERRF(UC_ERR_NOMEM, "profile path");
            goto out;
        }
    }
    UC_CHECK(uc_comm_agree_u64(comm, uc_model_hash(e->m), "model hash", &same), rc, out);
    if (!same) {
        rc = UC_ERRF(UC_ERR_INVALID_ARG, "ranks loaded different models (hash mismatch)");
        goto out;
    }
    e->max_ctx = e->p.max_ctx > 0 && e->p.max_ctx < e->cfg->max_ctx ? e->p.max_ctx
                                                                    : e->cfg->max_ctx;
    int64_t ws_rows = e->p.prefill_chunk > e->p.max_batch ? e->p.prefill_chunk : e->p.max_batch;
    UC_CHECK(uc_model_ws_init(e->m, &e->ws, ws_rows, e->p.max_batch), rc, out);
    size_t a = act_size(e);
    int64_t d = e->cfg->head_dim;
    size_t per_block = (size_t)(2 * e->p.block_tokens * d) * a;
    int64_t blocks = e->p.kv_blocks;
    if (blocks <= 0) {
        int64_t bytes = e->p.kv_memory_bytes > 0 ? e->p.kv_memory_bytes : (256LL << 20);
        blocks = bytes / (int64_t)per_block;
    }
    if (blocks < 1) {
        rc = UC_ERRF(UC_ERR_INVALID_ARG, "kv memory too small for one block of %zu bytes",
                     per_block);
        goto out;
    }
    UC_CHECK(uc_kv_cache_init(&e->kv, e->be, blocks, e->p.block_tokens, d), rc, out);
    UC_CHECK(e->be->ops->alloc(e->be, &e->dx, (size_t)(e->p.max_batch * e->cfg->hidden) * a), rc,
             out);
    UC_CHECK(e->be->ops->alloc(e->be, &e->dqkv, (size_t)(e->p.max_batch * e->sh->qkv_dim) * a), rc,
             out);
    e->d_tok = uc_malloc((size_t)e->p.max_batch * sizeof(int32_t));
    e->batch = uc_malloc((size_t)e->p.max_batch * sizeof(struct seq *));
    e->dec_logits = uc_malloc((size_t)(e->p.max_batch * e->cfg->vocab) * sizeof(float));
    e->dec_argmax = uc_malloc((size_t)e->p.max_batch * sizeof(int32_t));
    e->dm_maxn = uc_malloc((size_t)e->cfg->n_layers * sizeof(int64_t));
    e->cov = uc_malloc((size_t)(e->sh->n_heads * d * d) * sizeof(double));
    e->spec = uc_malloc((size_t)(e->cfg->n_heads * d) * sizeof(double));
    e->spec_local = uc_malloc((size_t)(e->sh->n_heads * d) * sizeof(double));
    e->cal_head = uc_calloc((size_t)(e->cfg->n_layers * e->cfg->n_heads), sizeof(double));
    e->cal_hidden = uc_calloc((size_t)e->cfg->n_layers, sizeof(double));
    if (!e->d_tok || !e->batch || !e->dec_logits || !e->dec_argmax || !e->dm_maxn ||
        !e->cov || !e->spec || !e->spec_local || !e->cal_head ||
        !e->cal_hidden) {
        rc = UC_ERRF(UC_ERR_NOMEM, "engine scratch");
        goto out;
    }
    rc = load_profile(e);
    if (rc != UC_OK) {
        UC_LOG_WARN("engine: ignoring unreadable profile %s; calibrate to rebuild it",
                    e->profile_path);
        rc = UC_OK;
    }
    UC_LOG0(UC_LOG_LEVEL_NOTICE,
            "engine: model=%s arch=%s layers=%lld heads=%lld/%lld tp=%d backend=%s "
            "weights_per_rank=%.1fMiB kv_blocks=%lld (%.1fMiB, %lld tokens/block)",
            e->model_dir, e->cfg->arch, (long long)e->cfg->n_layers, (long long)e->cfg->n_heads,
            (long long)e->cfg->n_heads_kv, uc_comm_size(comm), e->be->name,
            (double)uc_model_weight_bytes(e->m) / 1048576.0, (long long)blocks,
            (double)blocks * (double)per_block / 1048576.0, (long long)e->p.block_tokens);
    *out = e;
    e = NULL;
out:
    uc_engine_destroy(e);
    return rc;
}

static void seq_destroy(struct uc_engine *e, struct seq *s);

static void graph_drop(struct uc_engine *e, struct decode_graph *g)
{
    for (int p = 0; p < DECODE_GRAPH_MAX_PARTS; p++) {
        if (g->exec[p]) {
            e->be->ops->graph_destroy(e->be, g->exec[p]);
        }
    }
    memset(g, 0, sizeof *g);
}

void uc_engine_destroy(struct uc_engine *e)
{
    if (!e) {
        return;
    }
    for (int64_t i = 0; i < e->n_seqs; i++) {
        seq_destroy(e, e->seqs[i]);
    }
    uc_free(e->seqs);
    if (e->be) {
        for (int i = 0; i < DECODE_GRAPH_SLOTS; i++) {
            graph_drop(e, &e->graphs[i]);
        }
        if (e->dm_dev) {
            e->be->ops->free(e->be, e->dm_dev);
        }
        if (e->dx) {
            e->be->ops->free(e->be, e->dx);
        }
        if (e->dqkv) {
            e->be->ops->free(e->be, e->dqkv);
        }
        uc_kv_cache_fini(&e->kv);
        if (e->m) {
            uc_model_ws_fini(e->m, &e->ws);
        }
    }
    uc_model_destroy(e->m);
    if (e->owns_backend) {
        uc_backend_destroy(e->be);
    }
    if (e->have_prof) {
        uc_profile_fini(&e->prof);
    }
    void *host[] = {e->d_tok, e->sc_row, e->sc_head, e->sc_slot, e->dm_host,
                    e->dm_maxn, e->psum, e->wprob, e->colscore, e->rowscore, e->keep,
                    e->sel_scratch, e->cov, e->spec, e->spec_local, e->hid_host, e->cal_head,
                    e->cal_hidden, e->model_dir, e->profile_path, e->batch, e->dec_logits,
                    e->dec_argmax};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) {
        uc_free(host[i]);
    }
    uc_buf_fini(&e->wire);
    uc_free(e);
}

const struct uc_model_config *uc_engine_config(const struct uc_engine *e) { return e->cfg; }
struct uc_backend *uc_engine_backend(struct uc_engine *e) { return e->be; }
struct uc_comm *uc_engine_comm(struct uc_engine *e) { return e->comm; }
int64_t uc_engine_max_ctx(const struct uc_engine *e) { return e->max_ctx; }
size_t uc_engine_weight_bytes(const struct uc_engine *e) { return uc_model_weight_bytes(e->m); }
uint64_t uc_engine_model_hash(const struct uc_engine *e) { return uc_model_hash(e->m); }
int64_t uc_engine_kv_blocks_total(const struct uc_engine *e) { return e->kv.n_blocks; }
int64_t uc_engine_kv_blocks_used(const struct uc_engine *e) { return uc_kv_used_blocks(&e->kv); }
int64_t uc_engine_kv_block_tokens(const struct uc_engine *e) { return e->kv.block_tokens; }
size_t uc_engine_kv_bytes_per_token(const struct uc_engine *e)
{
    return (size_t)(2 * e->cfg->head_dim) * act_size(e);
}
const struct uc_profile *uc_engine_profile(const struct uc_engine *e)
{
    return e->have_prof ? &e->prof : NULL;
}
const char *uc_engine_profile_path(const struct uc_engine *e) { return e->profile_path; }
const char *uc_engine_model_dir(const struct uc_engine *e) { return e->model_dir; }
int64_t uc_engine_n_seqs(const struct uc_engine *e) { return e->n_seqs; }

/* ---- sequences -------------------------------------------------------------------------- */

static struct seq *find_seq(const struct uc_engine *e, int64_t id)
{
    for (int64_t i = 0; i < e->n_seqs; i++) {
        if (e->seqs[i]->id == id) {
            return e->seqs[i];
        }
    }
    return NULL;
}

static void free_prefill_buffers(struct uc_engine *e, struct seq *s)
{
    if (s->x) {
        e->be->ops->free(e->be, s->x);
        s->x = NULL;
    }
    if (s->qkv) {
        e->be->ops->free(e->be, s->qkv);
        s->qkv = NULL;
    }
}

static void seq_destroy(struct uc_engine *e, struct seq *s)
{
    if (!s) {
        return;
    }
    free_prefill_buffers(e, s);
    uc_kv_seq_fini(&e->kv, &s->kv);
    uc_plan_fini(&s->plan);
    int64_t nh = e->cfg->n_layers * e->sh->n_heads_kv;
    if (s->kept) {
        for (int64_t i = 0; i < nh; i++) {
            uc_free(s->kept[i]);
        }
    }
    if (s->rows_at) {
        for (int64_t l = 0; l < e->cfg->n_layers; l++) {
            uc_free(s->rows_at[l]);
        }
    }
    if (s->kept_all) {
        for (int64_t i = 0; i < e->cfg->n_layers * e->cfg->n_heads_kv; i++) {
            uc_free(s->kept_all[i]);
        }
    }
    if (s->rings) {
        for (int64_t i = 0; i < nh; i++) {
            uc_free(s->rings[i].rows);
        }
    }
    void *p[] = {s->row_acc, s->pos, s->logits, s->layer_rows, s->ent_min, s->ent_mean, s->ent_max, s->kept,
                 s->n_kept, s->rows_at, s->qspec, s->hspec, s->rings, s->kept_all,
                 s->n_kept_all};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) {
        uc_free(p[i]);
    }
    uc_free(s);
}

static void remove_seq(struct uc_engine *e, int64_t id)
{
    for (int64_t i = 0; i < e->n_seqs; i++) {
        if (e->seqs[i]->id == id) {
            seq_destroy(e, e->seqs[i]);
            e->seqs[i] = e->seqs[--e->n_seqs];
            return;
        }
    }
}

/* Stage boundaries of a new sequence: its own, else the profile's. */
static int32_t stage_starts_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                                const int32_t **starts)
{
    if (cp->n_stage_starts > 0) {
        *starts = cp->stage_starts;
        return cp->n_stage_starts;
    }
    if (e->have_prof) {
        *starts = e->prof.stage_starts;
        return e->prof.n_stage_starts;
    }
    *starts = NULL;
    return 0;
}

static int32_t max_group_budget(const struct uc_compress_params *cp)
{
    int32_t mx = 0;
    for (int32_t g = 0; g < cp->head_groups; g++) {
        int32_t b = uc_group_budget(cp->kv_budget, g, cp->head_groups, cp->spread);
        mx = b > mx ? b : mx;
    }
    return mx;
}

uc_status uc_engine_check_new(const struct uc_engine *e, const struct uc_step_new *n, char *msg,
                              size_t msg_size)
{
    if (n->flags & UC_SEQ_FORK) {
        const struct seq *src = find_seq(e, n->fork_of);
        if (!src || src->phase != UC_SEQ_DECODING) {
            snprintf(msg, msg_size, "fork: sequence %lld is not decoding", (long long)n->fork_of);
            return UC_ERR_INVALID_ARG;
        }
        if (src->n_ctx + (int64_t)n->max_new_tokens > e->max_ctx) {
            snprintf(msg, msg_size, "fork: %lld tokens + max_tokens %d exceed the context",
                     (long long)src->n_ctx, n->max_new_tokens);
            return UC_ERR_INVALID_ARG;
        }
        return UC_OK;
    }
    if (n->n_prompt < 1) {
        snprintf(msg, msg_size, "prompt: empty (at least one token is needed)");
        return UC_ERR_INVALID_ARG;
    }
    if (n->max_new_tokens < 0) {
        snprintf(msg, msg_size, "sampling.max_tokens=%d must not be negative", n->max_new_tokens);
        return UC_ERR_INVALID_ARG;
    }
    if (n->n_prompt + (int64_t)n->max_new_tokens > e->max_ctx) {
        snprintf(msg, msg_size,
                 "prompt of %lld tokens + max_tokens %d exceeds the context length %lld",
                 (long long)n->n_prompt, n->max_new_tokens, (long long)e->max_ctx);
        return UC_ERR_INVALID_ARG;
    }
    for (int64_t i = 0; i < n->n_prompt; i++) {
        if (n->prompt[i] < 0 || n->prompt[i] >= e->cfg->vocab) {
            snprintf(msg, msg_size, "prompt token %lld: id %d outside the vocabulary (%lld)",
                     (long long)i, n->prompt[i], (long long)e->cfg->vocab);
            return UC_ERR_INVALID_ARG;
        }
    }
    uc_status rc = uc_compress_params_validate(&n->cp, e->cfg->n_layers, msg, msg_size);
    if (rc != UC_OK) {
        return rc;
    }
    if (uc_policy_uses_entropy(n->cp.policy) && n->cp.grouping == UC_GROUPING_PROFILE &&
        !e->have_prof) {
        snprintf(msg, msg_size, "compression.grouping=profile: no calibration profile is loaded "
                 "(run Calibrate, or use grouping=prompt)");
        return UC_ERR_UNAVAILABLE;
    }
    const int32_t *starts;
    if (n->cp.policy == UC_POLICY_UNCOMP_STAGE && stage_starts_for(e, &n->cp, &starts) == 0 &&
        !e->have_prof) {
        snprintf(msg, msg_size, "compression.policy=uncomp-stage needs stage boundaries: a "
                 "calibration profile or explicit stage_starts");
        return UC_ERR_UNAVAILABLE;
    }
    return UC_OK;
}

/* A KV head's budget under the plan: known from the profile for grouping=profile, the largest
 * group budget otherwise (not capped by the prompt). */
static int64_t head_budget_bound(const struct uc_engine *e, const struct uc_step_new *n,
                                 int64_t layer, int64_t kv_head)
{
    const struct uc_compress_params *cp = &n->cp;
    int64_t b;
    switch (cp->policy) {
    case UC_POLICY_FULL: b = n->n_prompt; break;
    case UC_POLICY_PYRAMIDKV: b = uc_pyramid_budget(cp->kv_budget, layer, e->cfg->n_layers); break;
    case UC_POLICY_UNCOMP:
    case UC_POLICY_UNCOMP_STAGE:
        if (cp->grouping == UC_GROUPING_PROFILE && e->have_prof &&
            e->prof.head_groups == cp->head_groups) {
            b = uc_group_budget(cp->kv_budget,
                                e->prof.kv_group[layer * e->cfg->n_heads_kv + kv_head],
                                cp->head_groups, cp->spread);
        } else {
            b = max_group_budget(cp);
        }
        break;
    default: b = cp->kv_budget; break;
    }
    return b;
}

int64_t uc_engine_kv_blocks_needed(const struct uc_engine *e, const struct uc_step_new *n)
{
    if (n->flags & UC_SEQ_FORK) {
        const struct seq *src = find_seq(e, n->fork_of);
        int64_t total = 0;
        for (int64_t i = 0; src && i < e->cfg->n_layers * e->sh->n_heads_kv; i++) {
            total += uc_kv_blocks_for(&e->kv, src->kv.heads[i].n_tokens + n->max_new_tokens);
        }
        return total;
    }
    /* the most any rank needs: ranks hold different heads, and with them different budgets */
    int64_t worst = 0, gen = n->max_new_tokens;
    int64_t hkv = e->cfg->n_heads_kv, hkv_l = e->sh->n_heads_kv;
    bool evict = n->cp.decode_mode == UC_DECODE_EVICT && n->cp.policy != UC_POLICY_FULL;
    for (int64_t kv0 = 0; kv0 < hkv; kv0 += hkv_l) {
        int64_t total = 0;
        for (int64_t l = 0; l < e->cfg->n_layers; l++) {
            for (int64_t j = kv0; j < kv0 + hkv_l; j++) {
                int64_t b = head_budget_bound(e, n, l, j);
                int64_t np = n->n_prompt;
                /* append: the prefill's share plus every decoded token; evict: the head grows
                 * to its budget (plus the token being placed) and stays there */
                int64_t tokens = evict ? (b + 1 < np + gen ? b + 1 : np + gen)
                                       : (b < np ? b : np) + gen;
                total += uc_kv_blocks_for(&e->kv, tokens);
            }
        }
        worst = total > worst ? total : worst;
    }
    return worst;
}

/* Adds s to the engine's sequence table (which then owns it). */
static uc_status seq_register(struct uc_engine *e, struct seq *s)
{
    if (!grow((void **)&e->seqs, &e->cap_seqs, e->n_seqs + 1, sizeof *e->seqs)) {
        return UC_ERRF(UC_ERR_NOMEM, "sequence table");
    }
    e->seqs[e->n_seqs++] = s;
    return UC_OK;
}

static uc_status seq_create(struct uc_engine *e, const struct uc_step_new *n)
{
    struct seq *s = uc_calloc(1, sizeof *s);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "sequence %lld", (long long)n->seq_id);
    }
    uc_status rc;
    int64_t L = e->cfg->n_layers, hkv_l = e->sh->n_heads_kv, np = n->n_prompt;
    size_t a = act_size(e);
    s->id = n->seq_id;
    s->flags = n->flags;
    s->max_new = n->max_new_tokens;
    s->cp = n->cp;
    s->phase = UC_SEQ_PREFILLING;
    s->greedy = -1;
    s->n_prompt = np;
    s->n_rows = np;
    UC_CHECK(uc_plan_init(&s->plan, L, e->cfg->n_heads_kv), rc, out);
    UC_CHECK(uc_kv_seq_init(&s->kv, L, hkv_l), rc, out);
    UC_CHECK(e->be->ops->alloc(e->be, &s->x, (size_t)(np * e->cfg->hidden) * a), rc, out);
    UC_CHECK(e->be->ops->alloc(e->be, &s->qkv, (size_t)(np * e->sh->qkv_dim) * a), rc, out);
    s->pos = uc_malloc((size_t)np * sizeof(int32_t));
    s->layer_rows = uc_calloc((size_t)L, sizeof(int64_t));
    s->ent_min = uc_malloc((size_t)L * sizeof(double));
    s->ent_mean = uc_malloc((size_t)L * sizeof(double));
    s->ent_max = uc_malloc((size_t)L * sizeof(double));
    int64_t lrows = n->flags & UC_SEQ_ALL_LOGITS ? np : 1;
    s->logits = uc_malloc((size_t)(lrows * e->cfg->vocab) * sizeof(float));
    if (!s->pos || !s->layer_rows || !s->ent_min || !s->ent_mean || !s->ent_max || !s->logits) {
        rc = UC_ERRF(UC_ERR_NOMEM, "sequence %lld tokens=%lld", (long long)n->seq_id,
                     (long long)np);
        goto out;
    }
    for (int64_t l = 0; l < L; l++) {
        s->ent_min[l] = s->ent_mean[l] = s->ent_max[l] = NAN;
    }
    if (n->flags & UC_SEQ_RECORD_KEPT) {
        s->kept = uc_calloc((size_t)(L * hkv_l), sizeof *s->kept);
        s->n_kept = uc_calloc((size_t)(L * hkv_l), sizeof *s->n_kept);
        s->rows_at = uc_calloc((size_t)L, sizeof *s->rows_at);
        if (!s->kept || !s->n_kept || !s->rows_at) {
            rc = UC_ERRF(UC_ERR_NOMEM, "sequence records");
            goto out;
        }
    }
    if (n->flags & UC_SEQ_SPECTRA) {
        s->qspec = uc_calloc((size_t)(L * e->cfg->n_heads * e->cfg->head_dim), sizeof(double));
        s->hspec = uc_calloc((size_t)(L * e->cfg->hidden), sizeof(double));
        if (!s->qspec || !s->hspec) {
            rc = UC_ERRF(UC_ERR_NOMEM, "sequence spectra");
            goto out;
        }
    }
    if (n->cp.decode_mode == UC_DECODE_EVICT && n->cp.policy != UC_POLICY_FULL) {
        s->rings = uc_calloc((size_t)(L * hkv_l), sizeof *s->rings);
        if (!s->rings) {
            rc = UC_ERRF(UC_ERR_NOMEM, "sequence rings");
            goto out;
        }
    }
    for (int64_t i = 0; i < np; i++) {
        s->pos[i] = (int32_t)i;
    }
    /* plan: stages now (they depend only on n0), budgets per layer as layers finish */
    if (s->cp.policy == UC_POLICY_UNCOMP_STAGE) {
        const int32_t *starts;
        int32_t ns = stage_starts_for(e, &s->cp, &starts);
        s->plan.n_stage_starts = ns;
        int64_t min_rows = max_group_budget(&s->cp) + s->cp.window;
        for (int32_t c = 0; c < ns; c++) {
            s->plan.stage_starts[c] = starts[c];
        }
        for (int32_t c = 0; c <= ns; c++) {
            s->plan.stage_rows[c] = uc_stage_rows(np, c, ns + 1, s->cp.r_min, min_rows);
        }
    } else {
        s->plan.stage_rows[0] = np;
    }
    UC_CHECK(uc_model_embed(e->m, s->x, n->prompt, np), rc, out);
    s->t_prefill_start = uc_time_s();
    UC_CHECK(seq_register(e, s), rc, out);
    s = NULL;
out:
    seq_destroy(e, s);
    return rc;
}

/* A copy of a decoding sequence: same plan, logits and cache contents (whole blocks copied on
 * the backend), its own blocks. */
static uc_status seq_fork(struct uc_engine *e, const struct uc_step_new *n)
{
    const struct seq *src = find_seq(e, n->fork_of);
    int64_t L = e->cfg->n_layers, hkv = e->cfg->n_heads_kv, hkv_l = e->sh->n_heads_kv;
    uc_status rc;
    int32_t *dst_b = NULL, *src_b = NULL;
    struct seq *s = uc_calloc(1, sizeof *s);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "fork");
    }
    s->id = n->seq_id;
    s->flags = src->flags & ~(UC_SEQ_RECORD_KEPT | UC_SEQ_SPECTRA | UC_SEQ_CALIBRATE);
    s->max_new = n->max_new_tokens;
    s->cp = src->cp;
    s->phase = UC_SEQ_DECODING;
    s->n_prompt = src->n_prompt;
    s->n_ctx = src->n_ctx;
    s->n_rows = src->n_rows;
    s->layer = src->layer;
    s->prefill_ms = src->prefill_ms;
    s->compress_ms = src->compress_ms;
    UC_CHECK(uc_plan_init(&s->plan, L, hkv), rc, out);
    memcpy(s->plan.budget, src->plan.budget, (size_t)(L * hkv) * sizeof(int32_t));
    memcpy(s->plan.group, src->plan.group, (size_t)(L * hkv) * sizeof(int32_t));
    memcpy(s->plan.entropy, src->plan.entropy, (size_t)(L * hkv) * sizeof(double));
    s->plan.n_stage_starts = src->plan.n_stage_starts;
    memcpy(s->plan.stage_starts, src->plan.stage_starts, sizeof s->plan.stage_starts);
    memcpy(s->plan.stage_rows, src->plan.stage_rows, sizeof s->plan.stage_rows);
    UC_CHECK(uc_kv_seq_init(&s->kv, L, hkv_l), rc, out);
    s->layer_rows = uc_malloc((size_t)L * sizeof(int64_t));
    s->ent_min = uc_malloc((size_t)L * sizeof(double));
    s->ent_mean = uc_malloc((size_t)L * sizeof(double));
    s->ent_max = uc_malloc((size_t)L * sizeof(double));
    s->logits = uc_malloc((size_t)e->cfg->vocab * sizeof(float));
    if (!s->layer_rows || !s->ent_min || !s->ent_mean || !s->ent_max || !s->logits) {
        rc = UC_ERRF(UC_ERR_NOMEM, "fork");
        goto out;
    }
    memcpy(s->layer_rows, src->layer_rows, (size_t)L * sizeof(int64_t));
    memcpy(s->ent_min, src->ent_min, (size_t)L * sizeof(double));
    memcpy(s->ent_mean, src->ent_mean, (size_t)L * sizeof(double));
    memcpy(s->ent_max, src->ent_max, (size_t)L * sizeof(double));
    s->greedy = src->greedy;
    s->logits_rows = src->logits_rows > 0 ? 1 : 0;
    if (src->logits_rows > 0) {
        const float *sl = src->logits_ext ? src->logits_ext
                                          : src->logits + (src->logits_rows - 1) * e->cfg->vocab;
        memcpy(s->logits, sl, (size_t)e->cfg->vocab * sizeof(float));
    }
    int64_t total = uc_kv_seq_blocks(&src->kv), k = 0;
    dst_b = uc_malloc((size_t)(total + 1) * sizeof(int32_t));
    src_b = uc_malloc((size_t)(total + 1) * sizeof(int32_t));
    if (!dst_b || !src_b) {
        rc = UC_ERRF(UC_ERR_NOMEM, "fork block lists");
        goto out;
    }
    for (int64_t i = 0; i < L * hkv_l; i++) {
        const struct uc_kv_head *sh = &src->kv.heads[i];
        struct uc_kv_head *dh = &s->kv.heads[i];
        rc = uc_kv_head_reserve(&e->kv, dh, sh->n_tokens);
        if (rc == UC_ERR_KV_FULL) {
            UC_FATAL("kv pool exhausted forking seq=%lld (admission must reserve blocks)",
                     (long long)n->fork_of);
        }
        if (rc != UC_OK) {
            goto out;
        }
        dh->n_tokens = sh->n_tokens;
        for (int32_t b = 0; b < dh->n_blocks; b++) {
            dst_b[k] = dh->blocks[b];
            src_b[k++] = sh->blocks[b];
        }
    }
    UC_CHECK(e->be->ops->kv_copy_blocks(e->be, &e->kv.pool, dst_b, src_b, k), rc, out);
    if (src->rings) {
        s->rings = uc_calloc((size_t)(L * hkv_l), sizeof *s->rings);
        if (!s->rings) {
            rc = UC_ERRF(UC_ERR_NOMEM, "fork rings");
            goto out;
        }
        for (int64_t i = 0; i < L * hkv_l; i++) {
            s->rings[i] = src->rings[i];
            size_t bytes = (size_t)(s->cp.window * src->rings[i].cap) * sizeof(float);
            s->rings[i].rows = uc_malloc(bytes ? bytes : 1);
            if (!s->rings[i].rows) {
                rc = UC_ERRF(UC_ERR_NOMEM, "fork rings");
                goto out;
            }
            memcpy(s->rings[i].rows, src->rings[i].rows, bytes);
        }
    }
    UC_CHECK(seq_register(e, s), rc, out);
    s = NULL;
out:
    uc_free(dst_b);
    uc_free(src_b);
    seq_destroy(e, s);
    return rc;
}

/* ---- prefill: entropy ------------------------------------------------------------------- */

/* Spectra of this rank's query heads at the layer end, gathered so every rank holds all H. */
static uc_status query_spectra(struct uc_engine *e, struct seq *s)
{
    int64_t d = e->cfg->head_dim, hl = e->sh->n_heads;
    uc_status rc;
    UC_CHECK(e->be->ops->qcov(e->be, e->cov, s->qkv, e->sh->qkv_dim, s->n_rows, hl, d), rc, out);
    /* one small eigensolve per head: in parallel (LAPACK runs serially inside the region) */
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t h = 0; h < hl; h++) {
        failed |= uc_entropy_eigvals(e->spec_local + h * d, e->cov + h * d * d, d) != UC_OK;
    }
    if (failed) {
        rc = UC_ERRF(UC_ERR_INTERNAL, "eigensolver failed on a query head");
        goto out;
    }
    UC_CHECK(uc_comm_allgather(e->comm, e->spec_local, e->spec, (size_t)(hl * d) * sizeof(double)),
             rc, out);
out:
    return rc;
}

/* Spectrum of the layer's input hidden states: rank 0 computes, everyone receives. */
static uc_status hidden_spectrum(struct uc_engine *e, struct seq *s, double *out_eig)
{
    int64_t c = e->cfg->hidden, n = s->n_rows;
    uc_status rc = UC_OK;
    if (uc_comm_rank(e->comm) == 0) {
        size_t need = (size_t)(n * c);
        if (need > e->hid_cap) {
            float *h = uc_realloc(e->hid_host, need * sizeof(float));
            if (!h) {
                return UC_ERRF(UC_ERR_NOMEM, "hidden states rows=%lld", (long long)n);
            }
            e->hid_host = h;
            e->hid_cap = need;
        }
        double *cov = uc_malloc((size_t)(c * c) * sizeof(double));
        if (!cov) {
            return UC_ERRF(UC_ERR_NOMEM, "hidden covariance C=%lld", (long long)c);
        }
        rc = e->be->ops->download_f32(e->be, e->hid_host, s->x, n * c);
        if (rc == UC_OK) {
            rc = uc_entropy_cov(cov, e->hid_host, n, c, c);
        }
        if (rc == UC_OK) {
            rc = uc_entropy_eigvals(out_eig, cov, c);
        }
        uc_free(cov);
    }
    uc_status brc = uc_comm_bcast(e->comm, out_eig, (size_t)c * sizeof(double), 0);
    return rc != UC_OK ? rc : brc;
}

static uc_status layer_start(struct uc_engine *e, struct seq *s)
{
    int64_t l = s->layer;
    s->layer_rows[l] = s->n_rows;
    if (s->rows_at) {
        s->rows_at[l] = uc_malloc((size_t)s->n_rows * sizeof(int32_t));
        if (!s->rows_at[l]) {
            return UC_ERRF(UC_ERR_NOMEM, "rows record");
        }
        memcpy(s->rows_at[l], s->pos, (size_t)s->n_rows * sizeof(int32_t));
    }
    if (!(s->flags & (UC_SEQ_SPECTRA | UC_SEQ_CALIBRATE))) {
        return UC_OK;
    }
    int64_t c = e->cfg->hidden;
    double *eig = s->hspec ? s->hspec + l * c : NULL;
    double *tmp = NULL;
    if (!eig) {
        tmp = uc_malloc((size_t)c * sizeof(double));
        if (!tmp) {
            return UC_ERRF(UC_ERR_NOMEM, "hidden spectrum");
        }
        eig = tmp;
    }
    uc_status rc = hidden_spectrum(e, s, eig);
    if (rc == UC_OK && (s->flags & UC_SEQ_CALIBRATE)) {
        e->cal_hidden[l] += uc_entropy_truncated(eig, c, uc_entropy_default_k(c));
    }
    uc_free(tmp);
    return rc;
}

/* ---- prefill: layer end ----------------------------------------------------------------- */

static bool needs_window(enum uc_policy p)
{
    return p == UC_POLICY_SNAPKV || p == UC_POLICY_PYRAMIDKV || p == UC_POLICY_UNCOMP ||
           p == UC_POLICY_UNCOMP_STAGE;
}

static bool is_stage_start(const struct seq *s, int64_t layer, int32_t *stage_index)
{
    for (int32_t c = 0; c < s->plan.n_stage_starts; c++) {
        if (s->plan.stage_starts[c] == layer) {
            *stage_index = c + 1;
            return true;
        }
    }
    return false;
}

/* Entropies of every query head (gathered), their KV-head means, and the plan of this layer. */
static uc_status plan_layer(struct uc_engine *e, struct seq *s, double *kv_ent)
{
    int64_t l = s->layer, d = e->cfg->head_dim, H = e->cfg->n_heads, hkv = e->cfg->n_heads_kv;
    int64_t g = H / hkv;
    bool from_prompt = uc_policy_uses_entropy(s->cp.policy) && s->cp.grouping == UC_GROUPING_PROMPT;
    uc_status rc = UC_OK;
    if (from_prompt || (s->flags & (UC_SEQ_SPECTRA | UC_SEQ_CALIBRATE))) {
        UC_CHECK(query_spectra(e, s), rc, out);
        double ent[1024];
        int64_t k = s->cp.entropy_k > 0 ? s->cp.entropy_k : uc_entropy_default_k(d);
        for (int64_t h = 0; h < H && h < 1024; h++) {
            ent[h] = uc_entropy_truncated(e->spec + h * d, d, k);
            if (s->flags & UC_SEQ_CALIBRATE) {
                e->cal_head[l * H + h] += uc_entropy_truncated(e->spec + h * d, d,
                                                               uc_entropy_default_k(d));
            }
        }
        if (s->qspec) {
            memcpy(s->qspec + l * H * d, e->spec, (size_t)(H * d) * sizeof(double));
        }
        for (int64_t j = 0; j < hkv; j++) {
            double sum = 0;
            for (int64_t q = 0; q < g; q++) {
                sum += ent[j * g + q];
            }
            kv_ent[j] = sum / (double)g;
        }
    }
    if (uc_policy_uses_entropy(s->cp.policy) && !from_prompt) {
        memcpy(kv_ent, e->prof.kv_entropy + l * hkv, (size_t)hkv * sizeof(double));
    }
    uc_plan_set_layer(&s->plan, &s->cp, l, kv_ent);
    if (uc_policy_uses_entropy(s->cp.policy)) {
        double mn = INFINITY, mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < hkv; j++) {
            mn = kv_ent[j] < mn ? kv_ent[j] : mn;
            mx = kv_ent[j] > mx ? kv_ent[j] : mx;
            sum += kv_ent[j];
        }
        s->ent_min[l] = mn;
        s->ent_max[l] = mx;
        s->ent_mean[l] = sum / (double)hkv;
    }
out:
    return rc;
}

/* Kept tokens of one local KV head from the scores (UNCOMP.md sections 5 and 8). */
static int64_t select_head(struct uc_engine *e, struct seq *s, int64_t j, int64_t budget)
{
    int64_t n = s->n_rows;
    const double *score = e->colscore + j * n;
    switch (s->cp.policy) {
    case UC_POLICY_FULL: return uc_select_streaming(e->keep, n, n, 0);
    case UC_POLICY_STREAMINGLLM:
        return uc_select_streaming(e->keep, n, budget, s->cp.sink_tokens);
    case UC_POLICY_H2O: return uc_select_h2o(e->keep, score, n, budget, e->sel_scratch);
    default:
        return uc_select_snapkv(e->keep, score, n, budget, s->cp.window, s->cp.pool_kernel,
                                e->sel_scratch);
    }
}

/* Fills e->colscore (Hkv_local, n) with the scores the policy selects by, and e->rowscore (n)
 * with the stage row scores when `rows` is set. */
static uc_status compute_scores(struct uc_engine *e, struct seq *s, bool cols, bool rows)
{
    int64_t n = s->n_rows, hl = e->sh->n_heads, hkv_l = e->sh->n_heads_kv;
    int64_t d = e->cfg->head_dim, gl = hl / hkv_l, ld = e->sh->qkv_dim;
    const void *k = (char *)s->qkv + (size_t)(hl * d) * act_size(e);
    uc_status rc = UC_OK;
    if (s->cp.policy == UC_POLICY_H2O && cols) {
        double *acc = uc_malloc((size_t)(hl * n) * sizeof(double));
        if (!acc) {
            return UC_ERRF(UC_ERR_NOMEM, "h2o scores");
        }
        rc = e->be->ops->attn_colsum(e->be, acc, s->qkv, ld, k, ld, n, hl, hkv_l, d);
        for (int64_t j = 0; rc == UC_OK && j < hkv_l; j++) {
            for (int64_t i = 0; i < n; i++) {
                double sum = 0;
                for (int64_t q = 0; q < gl; q++) {
                    sum += acc[(j * gl + q) * n + i];
                }
                e->colscore[j * n + i] = sum;
            }
        }
        uc_free(acc);
        return rc;
    }
    int64_t w = s->cp.window < n ? s->cp.window : n;
    const void *qw = dev_row(e, s->qkv, n - w, ld);
    bool use_max = s->cp.row_score == UC_ROW_SCORE_MAX ||
                   s->cp.row_score == UC_ROW_SCORE_ACCUM_MAX;
    if (!s->rings) {
        /* reduced on the backend: only (Hkv + 1) x n scores cross to the host */
        UC_CHECK(e->be->ops->window_scores(e->be, e->colscore, rows ? e->rowscore : NULL, use_max,
                                           qw, ld, k, ld, w, n, hl, hkv_l, d),
                 rc, out);
    } else {
        /* evict mode keeps every window row: the probabilities come over whole */
        UC_CHECK(e->be->ops->window_probs(e->be, e->wprob, qw, ld, k, ld, w, n, hl, hkv_l, d), rc,
                 out);
        for (int64_t j = 0; j < hkv_l; j++) {
            double *cs = e->colscore + j * n;
            for (int64_t i = 0; i < n; i++) {
                cs[i] = 0.0;
            }
            for (int64_t q = 0; q < gl; q++) {
                for (int64_t i = 0; i < n; i++) {
                    double v = 0;
                    for (int64_t r = 0; r < w; r++) {
                        v += e->wprob[((j * gl + q) * w + r) * n + i];
                    }
                    cs[i] += v;
                    if (rows) {
                        double *rs = &e->rowscore[i];
                        *rs = j == 0 && q == 0 ? v : (use_max ? (v > *rs ? v : *rs) : *rs + v);
                    }
                }
            }
        }
    }
    if (rows) {
        rc = use_max ? uc_comm_allreduce_max(e->comm, e->rowscore, n, UC_COMM_F64)
                     : uc_comm_allreduce_sum(e->comm, e->rowscore, n, UC_COMM_F64);
    }
out:
    return rc;
}

/* Initialises a head's evict ring from the window probabilities restricted to kept slots. */
static uc_status ring_init(struct uc_engine *e, struct seq *s, int64_t j, int64_t n_keep,
                           int64_t budget)
{
    struct ring *rg = &s->rings[s->layer * e->sh->n_heads_kv + j];
    int64_t n = s->n_rows, w = s->cp.window < n ? s->cp.window : n;
    int64_t gl = e->sh->n_heads / e->sh->n_heads_kv;
    int64_t cap = (budget > n_keep ? budget : n_keep) + 2;
    rg->rows = uc_calloc((size_t)(s->cp.window * cap), sizeof(float));
    if (!rg->rows) {
        return UC_ERRF(UC_ERR_NOMEM, "evict ring");
    }
    rg->cap = (int32_t)cap;
    rg->n_rows = (int32_t)w;
    rg->next = (int32_t)(w % s->cp.window);
    bool have_probs = needs_window(s->cp.policy) || s->cp.policy == UC_POLICY_UNCOMP_STAGE;
    for (int64_t r = 0; r < w && have_probs; r++) {
        for (int64_t i = 0; i < n_keep; i++) {
            float v = 0;
            for (int64_t q = 0; q < gl; q++) {
                v += e->wprob[((j * gl + q) * w + r) * n + e->keep[i]];
            }
            rg->rows[r * cap + i] = v;
        }
    }
    return UC_OK;
}

static uc_status layer_end(struct uc_engine *e, struct seq *s)
{
    double t0 = uc_time_s();
    int64_t l = s->layer, n = s->n_rows, hkv_l = e->sh->n_heads_kv, hkv = e->cfg->n_heads_kv;
    int64_t d = e->cfg->head_dim;
    uc_status rc;
    double kv_ent[1024];
    UC_CHECK(ensure_layer_scratch(e, n, s->cp.window), rc, out);
    UC_CHECK(plan_layer(e, s, kv_ent), rc, out);
    int32_t stage_c = 0;
    bool prune = s->cp.policy == UC_POLICY_UNCOMP_STAGE && l + 1 < e->cfg->n_layers &&
                 is_stage_start(s, l + 1, &stage_c) && s->plan.stage_rows[stage_c] < n;
    bool any_cut = false;
    for (int64_t j = 0; j < hkv_l; j++) {
        any_cut = any_cut || s->plan.budget[l * hkv + e->sh->kv0 + j] < n;
    }
    bool cols = any_cut && (needs_window(s->cp.policy) || s->cp.policy == UC_POLICY_H2O);
    bool evict = s->rings != NULL;
    bool accum = s->cp.policy == UC_POLICY_UNCOMP_STAGE && s->plan.n_stage_starts > 0 &&
                 (s->cp.row_score == UC_ROW_SCORE_ACCUM ||
                  s->cp.row_score == UC_ROW_SCORE_ACCUM_MAX) &&
                 l + 1 < e->cfg->n_layers && l + 1 <= s->plan.stage_starts[s->plan.n_stage_starts - 1];
    bool rows = prune || accum;
    if (cols || rows || (evict && needs_window(s->cp.policy))) {
        UC_CHECK(compute_scores(e, s, cols || evict, rows), rc, out);
    }
    if (accum) {
        /* every layer before the last boundary adds its row scores */
        if (!s->row_acc) {
            s->row_acc = uc_calloc((size_t)s->n_prompt, sizeof(double));
            if (!s->row_acc) {
                rc = UC_ERRF(UC_ERR_NOMEM, "row scores");
                goto out;
            }
        }
        bool mx = s->cp.row_score == UC_ROW_SCORE_ACCUM_MAX;
        for (int64_t i = 0; i < n; i++) {
            double v = e->rowscore[i];
            s->row_acc[i] = mx ? (v > s->row_acc[i] ? v : s->row_acc[i]) : s->row_acc[i] + v;
        }
    }
    if (cols && e->sh->kv_replicated) {
        /* ranks sharing a KV head each summed only their query heads: add them up */
        double *all = uc_calloc((size_t)(hkv * n), sizeof(double));
        if (!all) {
            rc = UC_ERRF(UC_ERR_NOMEM, "replicated scores");
            goto out;
        }
        memcpy(all + e->sh->kv0 * n, e->colscore, (size_t)n * sizeof(double));
        rc = uc_comm_allreduce_sum(e->comm, all, hkv * n, UC_COMM_F64);
        memcpy(e->colscore, all + e->sh->kv0 * n, (size_t)n * sizeof(double));
        uc_free(all);
        if (rc != UC_OK) {
            goto out;
        }
    }
    /* kept tokens of each local KV head into the paged cache */
    int64_t hl = e->sh->n_heads;
    const void *kbase = (char *)s->qkv + (size_t)(hl * d) * act_size(e);
    const void *vbase = (char *)s->qkv + (size_t)((hl + hkv_l) * d) * act_size(e);
    for (int64_t j = 0; j < hkv_l; j++) {
        int64_t budget = s->plan.budget[l * hkv + e->sh->kv0 + j];
        int64_t nk = select_head(e, s, j, budget);
        struct uc_kv_head *h = uc_kv_seq_head(&s->kv, l, j);
        rc = uc_kv_head_reserve(&e->kv, h, nk);
        if (rc == UC_ERR_KV_FULL) {
            UC_FATAL("kv pool exhausted during prefill seq=%lld layer=%lld (admission must "
                     "reserve blocks)", (long long)s->id, (long long)l);
        }
        if (rc != UC_OK) {
            goto out;
        }
        UC_CHECK(ensure_scatter(e, nk), rc, out);
        for (int64_t i = 0; i < nk; i++) {
            e->sc_row[i] = e->keep[i];
            e->sc_head[i] = (int32_t)j;
            e->sc_slot[i] = uc_kv_head_slot(&e->kv, h, i);
        }
        UC_CHECK(e->be->ops->kv_scatter(e->be, &e->kv.pool, kbase, vbase, e->sh->qkv_dim,
                                        e->sc_row, e->sc_head, e->sc_slot, nk),
                 rc, out);
        h->n_tokens = (int32_t)nk;
        if (s->kept) {
            int32_t *kp = uc_malloc((size_t)(nk > 0 ? nk : 1) * sizeof(int32_t));
            if (!kp) {
                rc = UC_ERRF(UC_ERR_NOMEM, "kept record");
                goto out;
            }
            for (int64_t i = 0; i < nk; i++) {
                kp[i] = s->pos[e->keep[i]];
            }
            s->kept[l * hkv_l + j] = kp;
            s->n_kept[l * hkv_l + j] = nk;
        }
        if (evict) {
            UC_CHECK(ring_init(e, s, j, nk, budget), rc, out);
        }
    }
    if (prune) {
        int64_t keep_n = s->plan.stage_rows[stage_c];
        int64_t nr = uc_select_rows(e->keep, accum ? s->row_acc : e->rowscore, n, keep_n,
                                    s->cp.window, e->sel_scratch);
        void *nx = NULL;
        UC_CHECK(e->be->ops->alloc(e->be, &nx, (size_t)(nr * e->cfg->hidden) * act_size(e)), rc,
                 out);
        rc = e->be->ops->gather_rows(e->be, nx, s->x, e->keep, nr, e->cfg->hidden);
        if (rc != UC_OK) {
            e->be->ops->free(e->be, nx);
            goto out;
        }
        e->be->ops->free(e->be, s->x);
        s->x = nx;
        for (int64_t i = 0; i < nr; i++) {
            s->pos[i] = s->pos[e->keep[i]];
            if (s->row_acc) {
                s->row_acc[i] = s->row_acc[e->keep[i]];
            }
        }
        s->n_rows = nr;
        s->stage = stage_c;
    }
out:
    s->compress_ms += (uc_time_s() - t0) * 1e3;
    return rc;
}

/* With UC_SEQ_RECORD_KEPT: every rank's kept sets go to every rank, and the ranks check that
 * they computed the same plan and, for replicated KV heads, the same kept sets. */
static uc_status gather_kept(struct uc_engine *e, struct seq *s)
{
    int64_t L = e->cfg->n_layers, hkv = e->cfg->n_heads_kv, hkv_l = e->sh->n_heads_kv;
    int64_t np = s->n_prompt, per = np + 1, R = uc_comm_size(e->comm);
    int same = 1;
    uc_status rc = uc_comm_agree_u64(e->comm, uc_plan_checksum(&s->plan), "plan checksum", &same);
    if (rc != UC_OK) {
        return rc;
    }
    s->plan_agreed = same != 0;
    size_t local_n = (size_t)(L * hkv_l * per);
    int32_t *local = uc_calloc(local_n, sizeof(int32_t));
    int32_t *all = uc_malloc(local_n * (size_t)R * sizeof(int32_t));
    int64_t *kv0 = uc_malloc((size_t)R * sizeof(int64_t));
    s->kept_all = uc_calloc((size_t)(L * hkv), sizeof *s->kept_all);
    s->n_kept_all = uc_calloc((size_t)(L * hkv), sizeof *s->n_kept_all);
    if (!local || !all || !kv0 || !s->kept_all || !s->n_kept_all) {
        rc = UC_ERRF(UC_ERR_NOMEM, "kept-set gather");
        goto out;
    }
    for (int64_t i = 0; i < L * hkv_l; i++) {
        local[i * per] = (int32_t)s->n_kept[i];
        memcpy(local + i * per + 1, s->kept[i], (size_t)s->n_kept[i] * sizeof(int32_t));
    }
    UC_CHECK(uc_comm_allgather(e->comm, local, all, local_n * sizeof(int32_t)), rc, out);
    UC_CHECK(uc_comm_allgather(e->comm, &e->sh->kv0, kv0, sizeof(int64_t)), rc, out);
    for (int64_t r = 0; r < R; r++) {
        for (int64_t l = 0; l < L; l++) {
            for (int64_t j = 0; j < hkv_l; j++) {
                const int32_t *src = all + ((size_t)r * (size_t)(L * hkv_l) +
                                            (size_t)(l * hkv_l + j)) * (size_t)per;
                int64_t g = l * hkv + kv0[r] + j;
                if (s->kept_all[g]) { /* a replica: it must agree */
                    bool eq = s->n_kept_all[g] == src[0] &&
                              memcmp(s->kept_all[g], src + 1, (size_t)src[0] * 4) == 0;
                    if (!eq) {
                        UC_LOG_ERROR("engine: ranks disagree on the kept set of layer=%lld "
                                     "kv_head=%lld", (long long)l, (long long)(kv0[r] + j));
                        s->plan_agreed = false;
                    }
                    continue;
                }
                s->kept_all[g] = uc_malloc((size_t)(src[0] > 0 ? src[0] : 1) * sizeof(int32_t));
                if (!s->kept_all[g]) {
                    rc = UC_ERRF(UC_ERR_NOMEM, "kept-set gather");
                    goto out;
                }
                memcpy(s->kept_all[g], src + 1, (size_t)src[0] * sizeof(int32_t));
                s->n_kept_all[g] = src[0];
            }
        }
    }
out:
    uc_free(local);
    uc_free(all);
    uc_free(kv0);
    return rc;
}

/* Logits after the last layer: the last row, or every row with UC_SEQ_ALL_LOGITS. */
static uc_status prefill_finish(struct uc_engine *e, struct seq *s)
{
    int64_t v = e->cfg->vocab, c = e->cfg->hidden;
    uc_status rc = UC_OK;
    if (s->flags & UC_SEQ_ALL_LOGITS) {
        int64_t lr = e->ws.max_logit_rows;
        for (int64_t r0 = 0; r0 < s->n_rows && rc == UC_OK; r0 += lr) {
            int64_t t = s->n_rows - r0 < lr ? s->n_rows - r0 : lr;
            rc = uc_model_logits(e->m, &e->ws, s->logits + r0 * v, dev_row(e, s->x, r0, c), t);
        }
        s->logits_rows = s->n_rows;
    } else {
        rc = uc_model_logits(e->m, &e->ws, s->logits, dev_row(e, s->x, s->n_rows - 1, c), 1);
        s->logits_rows = 1;
    }
    if (rc != UC_OK) {
        return rc;
    }
    if (s->kept) {
        UC_CHECK(gather_kept(e, s), rc, out);
    }
    free_prefill_buffers(e, s);
    s->phase = UC_SEQ_DECODING;
    s->n_ctx = s->n_prompt;
    s->prefill_ms = (uc_time_s() - s->t_prefill_start) * 1e3;
    if (s->flags & UC_SEQ_CALIBRATE) {
        e->cal_windows++;
        e->cal_tokens += s->n_prompt;
    }
out:
    return rc;
}

/* Runs up to `budget` row-layers of a sequence's prefill (0 = all that remain). */
static uc_status prefill_run(struct uc_engine *e, struct seq *s, int64_t budget)
{
    int64_t L = e->cfg->n_layers, c = e->cfg->hidden, ld = e->sh->qkv_dim;
    int64_t hl = e->sh->n_heads, hkv_l = e->sh->n_heads_kv, d = e->cfg->head_dim;
    size_t a = act_size(e);
    if (budget <= 0) {
        budget = INT64_MAX;
    }
    uc_status rc = UC_OK;
    while (budget > 0 && s->layer < L) {
        if (s->t_done == 0) {
            UC_CHECK(layer_start(e, s), rc, out);
        }
        int64_t t = s->n_rows - s->t_done;
        t = t < e->ws.max_tok ? t : e->ws.max_tok;
        t = t < budget ? t : budget;
        void *qkv_rows = dev_row(e, s->qkv, s->t_done, ld);
        void *x_rows = dev_row(e, s->x, s->t_done, c);
        UC_CHECK(uc_model_qkv(e->m, &e->ws, s->layer, qkv_rows, ld, x_rows, s->pos + s->t_done, t),
                 rc, out);
        const void *k = (char *)s->qkv + (size_t)(hl * d) * a;
        const void *v = (char *)s->qkv + (size_t)((hl + hkv_l) * d) * a;
        UC_CHECK(e->be->ops->attn_prefill(e->be, e->ws.att, qkv_rows, ld, k, v, ld, t, s->t_done,
                                          hl, hkv_l, d),
                 rc, out);
        UC_CHECK(uc_model_finish_layer(e->m, &e->ws, s->layer, x_rows, t), rc, out);
        s->t_done += t;
        budget -= t;
        if (s->t_done == s->n_rows) {
            UC_CHECK(layer_end(e, s), rc, out);
            s->layer++;
            s->t_done = 0;
        }
    }
    if (s->layer == L) {
        rc = prefill_finish(e, s);
    }
out:
    return rc;
}

/* ---- decode ----------------------------------------------------------------------------- */

/* Evict mode, after the new token's attention: update the ring and drop the lowest slot. */
static uc_status evict_head(struct uc_engine *e, struct seq *s, int64_t l, int64_t j,
                            const float *prow)
{
    struct uc_kv_head *h = uc_kv_seq_head(&s->kv, l, j);
    struct ring *rg = &s->rings[l * e->sh->n_heads_kv + j];
    int64_t n = h->n_tokens, w = s->cp.window;
    int64_t budget = s->plan.budget[l * e->cfg->n_heads_kv + e->sh->kv0 + j];
    if (n > rg->cap) {
        int64_t cap = n + 8;
        float *r = uc_calloc((size_t)(w * cap), sizeof(float));
        if (!r) {
            return UC_ERRF(UC_ERR_NOMEM, "evict ring");
        }
        for (int64_t i = 0; i < w; i++) {
            memcpy(r + i * cap, rg->rows + i * rg->cap, (size_t)rg->cap * sizeof(float));
        }
        uc_free(rg->rows);
        rg->rows = r;
        rg->cap = (int32_t)cap;
    }
    /* the new query's row replaces the oldest */
    float *row = rg->rows + (int64_t)rg->next * rg->cap;
    memcpy(row, prow, (size_t)n * sizeof(float));
    for (int64_t i = n; i < rg->cap; i++) {
        row[i] = 0.0f;
    }
    rg->next = (int32_t)((rg->next + 1) % w);
    if (rg->n_rows < w) {
        rg->n_rows++;
    }
    if (n <= budget) {
        return UC_OK;
    }
    int64_t victim;
    if (s->cp.policy == UC_POLICY_STREAMINGLLM) {
        victim = s->cp.sink_tokens < n ? s->cp.sink_tokens : n - 1;
    } else {
        int64_t m = n - (w < n ? w : n);
        if (m <= 0) {
            return UC_OK;
        }
        double *sc = e->rowscore, *pooled = e->colscore;
        for (int64_t i = 0; i < m; i++) {
            double v = 0;
            for (int64_t r = 0; r < rg->n_rows; r++) {
                v += rg->rows[r * rg->cap + i];
            }
            sc[i] = v;
        }
        uc_maxpool1d(pooled, sc, m, s->cp.pool_kernel);
        victim = 0;
        for (int64_t i = 1; i < m; i++) {
            if (pooled[i] < pooled[victim]) {
                victim = i;
            }
        }
    }
    for (int64_t r = 0; r < w; r++) {
        float *rr = rg->rows + r * rg->cap;
        memmove(rr + victim, rr + victim + 1, (size_t)(rg->cap - victim - 1) * sizeof(float));
        rr[rg->cap - 1] = 0.0f;
    }
    return uc_kv_head_remove(&e->kv, h, victim);
}

/* The decode step's index arrays, for all layers at once: reserves each head's next slot and
 * lays out, in int32s, pos (B) | for each layer l: slot (E), n_tokens (E), offset (E) | the
 * block ids of every (layer, entry), offsets counted from the start of that last part; E = B Hkv.
 * The fixed part's addresses depend only on B, so a recorded step stays valid while the
 * buffer does. */
static uc_status decode_meta_build(struct uc_engine *e, struct seq **batch, int64_t nb,
                                   int64_t *n_ints)
{
    int64_t L = e->cfg->n_layers, hkv = e->sh->n_heads_kv, ent = nb * hkv;
    int64_t fixed = nb + 3 * L * ent, blocks = 0;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t l = 0; l < L; l++) {
            for (int64_t j = 0; j < hkv; j++) {
                struct uc_kv_head *h = uc_kv_seq_head(&batch[b]->kv, l, j);
                uc_status rc = uc_kv_head_reserve(&e->kv, h, h->n_tokens + 1);
                if (rc == UC_ERR_KV_FULL) {
                    UC_FATAL("kv pool exhausted in decode seq=%lld layer=%lld",
                             (long long)batch[b]->id, (long long)l);
                }
                if (rc != UC_OK) {
                    return rc;
                }
                blocks += h->n_blocks;
            }
        }
    }
    if (!grow((void **)&e->dm_host, &e->dm_cap, fixed + blocks, sizeof(int32_t))) {
        return UC_ERRF(UC_ERR_NOMEM, "decode index arrays");
    }
    int32_t *m = e->dm_host, *blk = m + fixed;
    int64_t used = 0;
    for (int64_t b = 0; b < nb; b++) {
        m[b] = (int32_t)batch[b]->n_ctx; /* RoPE position of the new token */
    }
    for (int64_t l = 0; l < L; l++) {
        int32_t *slot = m + nb + 3 * l * ent, *ntok = slot + ent, *off = ntok + ent;
        int64_t maxn = 0;
        for (int64_t b = 0; b < nb; b++) {
            for (int64_t j = 0; j < hkv; j++) {
                struct uc_kv_head *h = uc_kv_seq_head(&batch[b]->kv, l, j);
                int64_t x = b * hkv + j;
                slot[x] = uc_kv_head_slot(&e->kv, h, h->n_tokens);
                h->n_tokens++;
                ntok[x] = h->n_tokens;
                off[x] = (int32_t)used;
                memcpy(blk + used, h->blocks, (size_t)h->n_blocks * sizeof(int32_t));
                used += h->n_blocks;
                maxn = h->n_tokens > maxn ? h->n_tokens : maxn;
            }
        }
        e->dm_maxn[l] = maxn;
    }
    *n_ints = fixed + used;
    return UC_OK;
}

/* Layers [l0, l1) of a decode step of nb rows, from the embedded rows in dx to the last residual
 * add, reading the uploaded index arrays. Without eviction nothing crosses to the host (the
 * attention sizes its work by the batch alone), so the ops can be recorded into a graph and
 * replayed at any context length; eviction brings each layer's probabilities back. */
static uc_status decode_layers(struct uc_engine *e, struct seq **batch, int64_t nb, int64_t l0,
                               int64_t l1, bool any_evict)
{
    int64_t L = e->cfg->n_layers, hl = e->sh->n_heads, hkv = e->sh->n_heads_kv;
    int64_t ld = e->sh->qkv_dim, ent = nb * hkv, fixed = nb + 3 * L * ent;
    const int32_t *dm = e->dm_dev;
    uc_status rc;
    if (l0 == 0) {
        UC_CHECK(uc_model_attn_norm(e->m, &e->ws, 0, e->dx, nb), rc, out);
    }
    for (int64_t l = l0; l < l1; l++) {
        const int32_t *slot = dm + nb + 3 * l * ent, *ntok = slot + ent, *off = ntok + ent;
        UC_CHECK(uc_model_qkv_proj(e->m, &e->ws, l, e->dqkv, nb), rc, out);
        /* rotate, then append the new token's K/V to every head; attend over the whole cache */
        UC_CHECK(e->be->ops->rope_append(e->be, &e->kv.pool, e->dqkv, ld, hl, hkv,
                                         e->cfg->head_dim, dm, slot, nb),
                 rc, out);
        struct uc_kv_batch_view view = {ntok, off, dm + fixed, 0, any_evict ? e->dm_maxn[l] : 0,
                                        true};
        float *psum = NULL;
        if (any_evict) {
            int64_t maxn = e->dm_maxn[l];
            if (!grow((void **)&e->psum, &e->psum_cap, ent * maxn, sizeof(float))) {
                rc = UC_ERRF(UC_ERR_NOMEM, "evict probabilities");
                goto out;
            }
            psum = e->psum;
            UC_CHECK(ensure_layer_scratch(e, maxn, 8), rc, out);
        }
        UC_CHECK(e->be->ops->attn_decode(e->be, e->ws.att, e->dqkv, ld, &e->kv.pool, &view, nb, hl,
                                         hkv, psum),
                 rc, out);
        for (int64_t b = 0; any_evict && b < nb; b++) {
            if (!batch[b]->rings) {
                continue;
            }
            for (int64_t j = 0; j < hkv; j++) {
                UC_CHECK(evict_head(e, batch[b], l, j, psum + (b * hkv + j) * e->dm_maxn[l]), rc,
                         out);
            }
        }
        UC_CHECK(uc_model_finish_layer_norm_next(e->m, &e->ws, l, e->dx, nb), rc, out);
    }
out:
    return rc;
}

/* Runs decode_layers through recorded graphs where the backend has them: the first step of a
 * batch size runs the ops directly; a second one in a row records them, later ones replay. */
static uc_status decode_graphed(struct uc_engine *e, struct seq **batch, int64_t nb)
{
    struct uc_backend *be = e->be;
    int64_t L = e->cfg->n_layers;
    bool same_nb = e->last_nb == nb;
    e->last_nb = nb;
    if (!be->ops->graph_begin || uc_comm_size(e->comm) != 1 || nb > DECODE_GRAPH_MAX_ROWS) {
        return decode_layers(e, batch, nb, 0, L, false);
    }
    int64_t per = DECODE_GRAPH_LAYERS;
    if ((L + per - 1) / per > DECODE_GRAPH_MAX_PARTS) {
        per = (L + DECODE_GRAPH_MAX_PARTS - 1) / DECODE_GRAPH_MAX_PARTS;
    }
    uint64_t epoch = be->ops->graph_epoch ? be->ops->graph_epoch(be) : 0;
    struct decode_graph *g = NULL;
    for (int i = 0; i < DECODE_GRAPH_SLOTS && !g; i++) {
        struct decode_graph *c = &e->graphs[i];
        if (c->exec[0] && c->nb == nb && c->meta == e->dm_dev && c->epoch == epoch) {
            g = c;
        }
    }
    uc_status rc = UC_OK;
    if (g) {
        for (int64_t p = 0; rc == UC_OK && p * per < L; p++) {
            rc = be->ops->graph_launch(be, g->exec[p]);
        }
        return rc;
    }
    rc = decode_layers(e, batch, nb, 0, L, false);
    if (rc != UC_OK || !same_nb) {
        return rc;
    }
    /* record for the next steps (recording runs nothing); the oldest slot makes room */
    graph_drop(e, &e->graphs[DECODE_GRAPH_SLOTS - 1]);
    memmove(e->graphs + 1, e->graphs, (DECODE_GRAPH_SLOTS - 1) * sizeof e->graphs[0]);
    g = &e->graphs[0];
    memset(g, 0, sizeof *g);
    for (int64_t p = 0; p * per < L; p++) {
        int64_t l1 = (p + 1) * per < L ? (p + 1) * per : L;
        UC_CHECK(be->ops->graph_begin(be), rc, out);
        uc_status rr = decode_layers(e, batch, nb, p * per, l1, false);
        rc = be->ops->graph_end(be, &g->exec[p]);
        if (rr != UC_OK || rc != UC_OK) {
            rc = rr != UC_OK ? rr : rc;
            goto out;
        }
    }
    g->nb = nb;
    g->meta = e->dm_dev;
    g->epoch = be->ops->graph_epoch ? be->ops->graph_epoch(be) : 0;
out:
    if (rc != UC_OK) {
        graph_drop(e, g);
    }
    return rc;
}

static uc_status decode_run(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb)
{
    if (nb == 0) {
        return UC_OK;
    }
    struct seq **batch = e->batch;
    bool any_evict = false;
    uc_status rc;
    for (int64_t b = 0; b < nb; b++) {
        batch[b] = find_seq(e, dec[b].seq_id);
        e->d_tok[b] = dec[b].token;
        any_evict = any_evict || batch[b]->rings != NULL;
    }
    UC_CHECK(uc_model_embed(e->m, e->dx, e->d_tok, nb), rc, out);
    int64_t n_ints = 0;
    UC_CHECK(decode_meta_build(e, batch, nb, &n_ints), rc, out);
    if (n_ints > e->dm_dev_cap) {
        int64_t cap = n_ints + n_ints / 2;
        if (e->dm_dev) {
            e->be->ops->free(e->be, e->dm_dev);
            e->dm_dev = NULL;
            e->dm_dev_cap = 0;
        }
        UC_CHECK(e->be->ops->alloc(e->be, &e->dm_dev, (size_t)cap * sizeof(int32_t)), rc, out);
        e->dm_dev_cap = cap;
    }
    UC_CHECK(e->be->ops->upload(e->be, e->dm_dev, e->dm_host, (size_t)n_ints * sizeof(int32_t)),
             rc, out);
    if (any_evict) {
        e->last_nb = 0;
        rc = decode_layers(e, batch, nb, 0, e->cfg->n_layers, true);
    } else {
        rc = decode_graphed(e, batch, nb);
    }
    if (rc != UC_OK) {
        goto out;
    }
    bool greedy = uc_comm_size(e->comm) == 1 && e->be->ops->argmax;
    for (int64_t b = 0; b < nb; b++) {
        greedy = greedy && (dec[b].flags & UC_DECODE_GREEDY);
    }
    if (greedy) {
        rc = uc_model_argmax(e->m, &e->ws, e->dec_argmax, e->dx, nb);
    } else {
        rc = uc_model_logits(e->m, &e->ws, e->dec_logits, e->dx, nb);
    }
    for (int64_t b = 0; rc == UC_OK && b < nb; b++) {
        batch[b]->logits_ext = greedy ? NULL : e->dec_logits + b * e->cfg->vocab;
        batch[b]->logits_rows = greedy ? 0 : 1;
        batch[b]->greedy = greedy ? e->dec_argmax[b] : -1;
        batch[b]->n_ctx++;
    }
out:
    return rc;
}

/* ---- the step loop ---------------------------------------------------------------------- */

/* Checks a step before any of it runs; the same on every rank, so all ranks refuse together. */
static uc_status validate_step(struct uc_engine *e, const struct uc_step *s)
{
    char msg[256];
    for (int32_t i = 0; i < s->n_new; i++) {
        const struct uc_step_new *n = &s->news[i];
        if (find_seq(e, n->seq_id)) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld already exists",
                           (long long)n->seq_id);
        }
        for (int32_t k = 0; k < i; k++) {
            if (s->news[k].seq_id == n->seq_id) {
                return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld added twice",
                               (long long)n->seq_id);
            }
        }
        uc_status rc = uc_engine_check_new(e, n, msg, sizeof msg);
        if (rc != UC_OK) {
            return UC_ERRF(rc, "step: sequence %lld: %s", (long long)n->seq_id, msg);
        }
    }
    for (int32_t i = 0; i < s->n_prefill; i++) {
        struct seq *q = find_seq(e, s->prefills[i].seq_id);
        bool is_new = false;
        for (int32_t k = 0; k < s->n_new; k++) {
            is_new = is_new || s->news[k].seq_id == s->prefills[i].seq_id;
        }
        if (!is_new && (!q || q->phase != UC_SEQ_PREFILLING)) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld is not prefilling",
                           (long long)s->prefills[i].seq_id);
        }
    }
    if (s->n_decode > e->p.max_batch) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "step: %d decodes exceed max_batch %lld", s->n_decode,
                       (long long)e->p.max_batch);
    }
    for (int32_t i = 0; i < s->n_decode; i++) {
        const struct uc_step_decode *dd = &s->decodes[i];
        struct seq *q = find_seq(e, dd->seq_id);
        if (!q || q->phase != UC_SEQ_DECODING) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld is not decoding",
                           (long long)dd->seq_id);
        }
        if (q->n_ctx >= e->max_ctx) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld reached the context length",
                           (long long)dd->seq_id);
        }
        if (dd->token < 0 || dd->token >= e->cfg->vocab) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "step: token %d outside the vocabulary",
                           dd->token);
        }
        for (int32_t k = 0; k < i; k++) {
            if (s->decodes[k].seq_id == dd->seq_id) {
                return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld decoded twice",
                               (long long)dd->seq_id);
            }
        }
        for (int32_t k = 0; k < s->n_free; k++) {
            if (s->frees[k] == dd->seq_id) {
                return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld freed and decoded",
                               (long long)dd->seq_id);
            }
        }
    }
    return UC_OK;
}

static uc_status profile_finish(struct uc_engine *e, const struct uc_step *s)
{
    const struct uc_model_config *c = e->cfg;
    if (e->cal_windows == 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "calibration: no text was run");
    }
    struct uc_profile p;
    uc_status rc = uc_profile_init(&p, c->n_layers, c->n_heads, c->n_heads_kv, c->head_dim,
                                   c->hidden);
    if (rc != UC_OK) {
        return rc;
    }
    double w = (double)e->cal_windows;
    for (int64_t l = 0; l < c->n_layers; l++) {
        p.layer_entropy[l] = e->cal_hidden[l] / w;
        for (int64_t h = 0; h < c->n_heads; h++) {
            p.head_entropy[l * c->n_heads + h] = e->cal_head[l * c->n_heads + h] / w;
        }
    }
    p.entropy_k_head = (int32_t)uc_entropy_default_k(c->head_dim);
    p.entropy_k_hidden = (int32_t)uc_entropy_default_k(c->hidden);
    p.calib_tokens = e->cal_tokens;
    p.calib_windows = e->cal_windows;
    p.created_unix_ms = uc_wall_ms();
    p.model_hash = uc_model_hash(e->m);
    snprintf(p.source, sizeof p.source, "%s", s->profile_source);
    uc_profile_finish(&p, s->profile_groups > 0 ? s->profile_groups : 2,
                      s->profile_eps > 0 ? s->profile_eps : 1.0);
    if (e->have_prof) {
        uc_profile_fini(&e->prof);
    }
    e->prof = p;
    e->have_prof = true;
    if (uc_comm_rank(e->comm) == 0) {
        rc = uc_profile_save(&e->prof, e->profile_path);
        if (rc == UC_OK) {
            UC_LOG_NOTICE("engine: calibration profile saved to %s (%lld tokens, %lld windows, "
                          "%d stage boundaries)",
                          e->profile_path, (long long)e->cal_tokens, (long long)e->cal_windows,
                          e->prof.n_stage_starts);
        }
    }
    return rc;
}

static uc_status run_step(struct uc_engine *e, const struct uc_step *s)
{
    uc_comm_set_step(e->comm, e->step_no);
    switch (s->op) {
    case UC_STEP_HEARTBEAT:
    case UC_STEP_SHUTDOWN: return UC_OK;
    case UC_STEP_PROFILE_RESET:
        memset(e->cal_head, 0, (size_t)(e->cfg->n_layers * e->cfg->n_heads) * sizeof(double));
        memset(e->cal_hidden, 0, (size_t)e->cfg->n_layers * sizeof(double));
        e->cal_windows = 0;
        e->cal_tokens = 0;
        return UC_OK;
    case UC_STEP_PROFILE_FINISH: return profile_finish(e, s);
    case UC_STEP_RUN: break;
    default: return UC_ERRF(UC_ERR_FORMAT, "step: unknown op %d", (int)s->op);
    }
    uc_status rc = validate_step(e, s);
    if (rc != UC_OK) {
        return rc;
    }
    for (int32_t i = 0; i < s->n_free; i++) {
        remove_seq(e, s->frees[i]);
    }
    /* new sequences: agree that every rank could allocate them, or drop them everywhere */
    int64_t failed = 0;
    for (int32_t i = 0; i < s->n_new && !failed; i++) {
        failed = (s->news[i].flags & UC_SEQ_FORK ? seq_fork(e, &s->news[i])
                                                  : seq_create(e, &s->news[i])) != UC_OK;
    }
    if (uc_comm_size(e->comm) > 1) {
        UC_CHECK(uc_comm_allreduce_max(e->comm, &failed, 1, UC_COMM_I64), rc, out);
    }
    if (failed) {
        for (int32_t i = 0; i < s->n_new; i++) {
            remove_seq(e, s->news[i].seq_id);
        }
        return UC_ERRF(UC_ERR_NOMEM, "step: could not allocate new sequences on every rank");
    }
    UC_CHECK(decode_run(e, s->decodes, s->n_decode), rc, out);
    for (int32_t i = 0; i < s->n_prefill; i++) {
        struct seq *q = find_seq(e, s->prefills[i].seq_id);
        if (q->phase == UC_SEQ_PREFILLING) {
            UC_CHECK(prefill_run(e, q, s->prefills[i].budget_rows), rc, out);
        }
    }
out:
    if (rc != UC_OK && rc != UC_ERR_INVALID_ARG) {
        /* the ranks may now disagree about the sequences: TP cannot continue */
        UC_FATAL("step %lld failed during execution: %s", (long long)e->step_no,
                 uc_status_str(rc));
    }
    return rc;
}

uc_status uc_engine_step(struct uc_engine *e, const struct uc_step *step)
{
    e->step_no++;
    uc_status rc = encode_step(&e->wire, step, e->step_no);
    if (rc != UC_OK) {
        return rc;
    }
    if (uc_comm_size(e->comm) > 1) {
        UC_CHECK(broadcast_wire(e), rc, out);
    }
    rc = run_step(e, step);
out:
    return rc;
}

uc_status uc_engine_serve(struct uc_engine *e)
{
    for (;;) {
        uc_status rc = broadcast_wire(e);
        if (rc != UC_OK) {
            return rc;
        }
        struct decoded_step d;
        rc = decode_step(&d, e->wire.data, e->wire.len);
        if (rc != UC_OK) {
            UC_FATAL("rank %d: undecodable step from rank 0", uc_comm_rank(e->comm));
        }
        e->step_no = ((const struct wire_hdr *)(const void *)e->wire.data)->step_no;
        enum uc_step_op op = d.s.op;
        rc = run_step(e, &d.s);
        decoded_fini(&d);
        if (op == UC_STEP_SHUTDOWN) {
            return UC_OK;
        }
        (void)rc; /* refusals are rank 0's to report; execution failures abort in run_step */
    }
}

uc_status uc_engine_heartbeat(struct uc_engine *e)
{
    struct uc_step s = {.op = UC_STEP_HEARTBEAT};
    return uc_engine_step(e, &s);
}

uc_status uc_engine_shutdown(struct uc_engine *e)
{
    struct uc_step s = {.op = UC_STEP_SHUTDOWN};
    return uc_engine_step(e, &s);
}

/* ---- accessors -------------------------------------------------------------------------- */

enum uc_seq_phase uc_engine_seq_phase(const struct uc_engine *e, int64_t seq_id)
{
    const struct seq *s = find_seq(e, seq_id);
    return s ? s->phase : UC_SEQ_UNKNOWN;
}

const float *uc_engine_seq_logits(const struct uc_engine *e, int64_t seq_id, int64_t *n_rows)
{
    const struct seq *s = find_seq(e, seq_id);
    if (!s || s->logits_rows == 0) {
        *n_rows = 0;
        return NULL;
    }
    *n_rows = s->logits_rows;
    return s->logits_ext ? s->logits_ext : s->logits;
}

bool uc_engine_seq_greedy(const struct uc_engine *e, int64_t seq_id, int32_t *token)
{
    const struct seq *s = find_seq(e, seq_id);
    if (!s || s->greedy < 0 || s->logits_rows != 0) {
        return false;
    }
    *token = s->greedy;
    return true;
}

int64_t uc_engine_seq_len(const struct uc_engine *e, int64_t seq_id)
{
    const struct seq *s = find_seq(e, seq_id);
    return s ? s->n_ctx : -1;
}

const struct uc_plan *uc_engine_seq_plan(const struct uc_engine *e, int64_t seq_id)
{
    const struct seq *s = find_seq(e, seq_id);
    return s ? &s->plan : NULL;
}

const int32_t *uc_engine_seq_kept(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                  int64_t kv_head, int64_t *n)
{
    const struct seq *s = find_seq(e, seq_id);
    if (!s || !s->kept_all || kv_head < 0 || kv_head >= e->cfg->n_heads_kv || layer < 0 ||
        layer >= e->cfg->n_layers) {
        *n = 0;
        return NULL;
    }
    *n = s->n_kept_all[layer * e->cfg->n_heads_kv + kv_head];
    return s->kept_all[layer * e->cfg->n_heads_kv + kv_head];
}

bool uc_engine_seq_plan_agreed(const struct uc_engine *e, int64_t seq_id)
{
    const struct seq *s = find_seq(e, seq_id);
    return s && s->plan_agreed;
}

const int32_t *uc_engine_seq_rows(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                  int64_t *n)
{
    const struct seq *s = find_seq(e, seq_id);
    if (!s || !s->rows_at || layer < 0 || layer >= e->cfg->n_layers || !s->rows_at[layer]) {
        *n = 0;
        return NULL;
    }
    *n = s->layer_rows[layer];
    return s->rows_at[layer];
}

const double *uc_engine_seq_query_spectrum(const struct uc_engine *e, int64_t seq_id,
                                           int64_t layer, int64_t head)
{
    const struct seq *s = find_seq(e, seq_id);
    if (!s || !s->qspec) {
        return NULL;
    }
    return s->qspec + (layer * e->cfg->n_heads + head) * e->cfg->head_dim;
}

const double *uc_engine_seq_hidden_spectrum(const struct uc_engine *e, int64_t seq_id,
                                            int64_t layer)
{
    const struct seq *s = find_seq(e, seq_id);
    if (!s || !s->hspec) {
        return NULL;
    }
    return s->hspec + layer * e->cfg->hidden;
}

uc_status uc_engine_seq_report(const struct uc_engine *e, int64_t seq_id,
                               struct uc_compress_report *out)
{
    const struct seq *s = find_seq(e, seq_id);
    memset(out, 0, sizeof *out);
    if (!s) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "report: unknown sequence %lld", (long long)seq_id);
    }
    int64_t L = e->cfg->n_layers, hkv = e->cfg->n_heads_kv;
    const struct uc_plan *p = &s->plan;
    out->policy = s->cp.policy;
    out->kv_budget = s->cp.policy == UC_POLICY_FULL ? 0 : s->cp.kv_budget;
    out->kv_tokens_full = s->n_prompt * L * hkv;
    int64_t kept = 0;
    int64_t g_n[UC_MAX_HEAD_GROUPS] = {0};
    double g_sum[UC_MAX_HEAD_GROUPS] = {0};
    for (int64_t l = 0; l < L && s->phase == UC_SEQ_DECODING; l++) {
        int64_t rows = s->layer_rows[l];
        for (int64_t j = 0; j < hkv; j++) {
            int64_t b = p->budget[l * hkv + j];
            int64_t k = b < rows ? b : rows;
            kept += k;
            int32_t g = p->group[l * hkv + j];
            if (g >= 0 && g < UC_MAX_HEAD_GROUPS) {
                g_n[g]++;
                g_sum[g] += (double)k;
            }
        }
    }
    out->kv_tokens_kept = kept;
    size_t per = uc_engine_kv_bytes_per_token(e);
    out->kv_bytes_full = out->kv_tokens_full * (int64_t)per;
    out->kv_bytes_kept = kept * (int64_t)per;
    out->ratio = out->kv_tokens_full ? (double)kept / (double)out->kv_tokens_full : 1.0;
    out->n_stages = p->n_stage_starts + 1;
    for (int32_t c = 0; c <= p->n_stage_starts; c++) {
        out->stage_rows[c] = p->stage_rows[c];
        if (c < p->n_stage_starts) {
            out->stage_starts[c] = p->stage_starts[c];
        }
    }
    if (uc_policy_uses_entropy(s->cp.policy)) {
        out->n_groups = s->cp.head_groups;
        for (int32_t g = 0; g < s->cp.head_groups; g++) {
            out->group_budget[g] = uc_group_budget(s->cp.kv_budget, g, s->cp.head_groups,
                                                   s->cp.spread);
            out->group_mean_kept[g] = g_n[g] ? g_sum[g] / (double)g_n[g] : 0.0;
        }
    }
    out->n_layers = L;
    out->entropy_min = s->ent_min;
    out->entropy_mean = s->ent_mean;
    out->entropy_max = s->ent_max;
    out->compress_ms = s->compress_ms;
    out->prefill_ms = s->prefill_ms;
    out->plan_checksum = uc_plan_checksum(p);
    out->kv_tokens_held_local = uc_kv_seq_tokens(&s->kv);
    out->kv_blocks_held_local = uc_kv_seq_blocks(&s->kv);
    return UC_OK;
}
