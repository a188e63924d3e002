/* The engine's lifecycle (load, agree, allocate, free), its accessors and the compression
 * report of a sequence. */
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
#include "comm_nccl.h"
#include "comm_staged.h"
#include "compress/select.h"
#include "internal.h"
#include "compress/minicache.h"
#include "compress/think.h"

bool eng_grow(void **p, int64_t *cap, int64_t need, size_t elem)
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

/* Host scratch for layer-end work on n tokens. */
uc_status eng_layer_scratch(struct uc_engine *e, int64_t n, int64_t n_win)
{
    size_t need = (size_t)n;
    int64_t hl = e->sh->n_heads, hkv = e->cfg->n_heads_kv, hkv_l = e->sh->n_heads_kv;
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
    e->keep = uc_malloc(need * (size_t)hkv_l * sizeof(int32_t));
    e->sel_scratch = uc_malloc(uc_select_scratch_bytes((int64_t)need) * (size_t)hkv_l);
    if (!e->wprob || !e->colscore || !e->rowscore || !e->keep || !e->sel_scratch) {
        e->sel_cap = 0;
        return UC_ERRF(UC_ERR_NOMEM, "layer scratch tokens=%zu", need);
    }
    e->sel_cap = need;
    return UC_OK;
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

/* The GPU data plane under TP: NCCL, or with UC_CUDA_DATA_PLANE=mpi the activations through
 * pinned host memory over MPI (slower; lets ranks share one GPU). The ranks agree on the choice
 * first, so a rank started with another value (or one that is not nccl or mpi) fails them all
 * with the same message instead of leaving the others waiting in a collective. */
static uc_status attach_gpu_data_plane(struct uc_comm *comm, int device)
{
    const char *v = getenv("UC_CUDA_DATA_PLANE");
    uint64_t choice = !v || strcmp(v, "nccl") == 0 ? 0 : strcmp(v, "mpi") == 0 ? 1 : 2;
    int same = 1;
    uc_status rc = uc_comm_agree_u64(comm, choice, "UC_CUDA_DATA_PLANE", &same);
    if (rc != UC_OK) {
        return rc;
    }
    if (!same) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "ranks were started with different "
                       "UC_CUDA_DATA_PLANE values (this one: %s)", v ? v : "unset");
    }
    if (choice == 2) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "UC_CUDA_DATA_PLANE=%s: expected nccl or mpi", v);
    }
    return choice == 1 ? uc_comm_staged_attach(comm, device) : uc_comm_nccl_attach(comm, device);
}

/* A KV pool larger than the memory left after the weights and workspaces is refused up front,
 * named: on a GPU its allocation would fail with a bare out-of-memory, on a host the pages would
 * be promised and the process killed once a load touched them. */
static uc_status kv_pool_fits(struct uc_engine *e, int64_t blocks, size_t per_block)
{
    int64_t avail = 0;
    if (!e->be->ops->mem_available || e->be->ops->mem_available(e->be, &avail) != UC_OK) {
        return UC_OK; /* unknown: the allocation itself decides */
    }
    double want = (double)blocks * (double)per_block, gib = 1024.0 * 1024.0 * 1024.0;
    if (want <= (double)avail) {
        return UC_OK;
    }
    return UC_ERRF(e->be->kind == UC_BACKEND_CUDA ? UC_ERR_DEVICE_NOMEM : UC_ERR_NOMEM,
                   "the KV pool of %.2f GiB (uncompd --kv-memory) does not fit: %s has %.2f GiB "
                   "left after the model's weights and workspaces; ask for less, leaving room "
                   "for the prompts' prefill buffers",
                   want / gib, e->be->device_name[0] ? e->be->device_name : "the backend",
                   (double)avail / gib);
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
        UC_CHECK(attach_gpu_data_plane(comm, e->be->device_index), rc, out);
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
    const char *pipe = getenv("UC_PIPELINE_ENDS"); /* 0: every layer end whole, for comparison */
    e->pipe_ends = !(pipe && strcmp(pipe, "0") == 0);
    const char *pmin = getenv("UC_PARALLEL_MIN_HEADS");
    e->par_min_heads = pmin && atoll(pmin) > 0 ? atoll(pmin) : ENG_PARALLEL_MIN_HEADS;
    int64_t rows = e->p.max_batch + e->p.prefill_chunk; /* a sweep pass: decode rows + slices */
    UC_CHECK(uc_model_ws_init(e->m, &e->ws, rows, e->p.max_batch), rc, out);
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
    UC_CHECK(kv_pool_fits(e, blocks, per_block), rc, out);
    UC_CHECK(uc_kv_cache_init(&e->kv, e->be, blocks, e->p.block_tokens, d), rc, out);
    uc_kv_table_init(&e->bt, e->be);
    /* the table's look over a batch is lighter per head than the engine's loops: it pays the
     * threads' wake-up from 8 times as many heads (batch 128 of an 8B model) */
    e->bt.par_min_heads = 8 * e->par_min_heads;
    UC_CHECK(e->be->ops->alloc(e->be, &e->dx, (size_t)(rows * e->cfg->hidden) * a), rc, out);
    UC_CHECK(e->be->ops->alloc(e->be, &e->dqkv, (size_t)(rows * e->sh->qkv_dim) * a), rc, out);
    e->d_tok = uc_malloc((size_t)e->p.max_batch * sizeof(int32_t));
    e->batch = uc_malloc((size_t)e->p.max_batch * sizeof(struct seq *));
    e->dec_logits = uc_malloc((size_t)(e->p.max_batch * e->cfg->vocab) * sizeof(float));
    e->dec_argmax = uc_malloc((size_t)e->p.max_batch * sizeof(int32_t));
    e->nx.ids = uc_malloc((size_t)e->p.max_batch * sizeof(int64_t));
    e->nx.expect = uc_malloc((size_t)e->p.max_batch * sizeof(int32_t));
    e->nx.map = uc_malloc((size_t)e->p.max_batch * sizeof(int64_t));
    if (e->be->ops->argmax_keep) {
        for (int i = 0; i < 2; i++) {
            UC_CHECK(e->be->ops->alloc(e->be, (void **)&e->ids_dev[i],
                                       (size_t)e->p.max_batch * sizeof(int32_t)),
                     rc, out);
        }
    }
    e->dm_maxn = uc_malloc((size_t)e->cfg->n_layers * sizeof(int64_t));
    e->spec = uc_malloc((size_t)(e->cfg->n_heads * d) * sizeof(double));
    e->spec_local = uc_malloc((size_t)(e->sh->n_heads * d) * sizeof(double));
    e->cal_head = uc_calloc((size_t)(e->cfg->n_layers * e->cfg->n_heads), sizeof(double));
    e->cal_hidden = uc_calloc((size_t)e->cfg->n_layers, sizeof(double));
    if (!e->d_tok || !e->batch || !e->dec_logits || !e->dec_argmax || !e->dm_maxn ||
        !e->nx.ids || !e->nx.expect || !e->nx.map ||
        !e->spec || !e->spec_local || !e->cal_head ||
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
    if (e->be->kind == UC_BACKEND_CUDA) {
        /* cuBLAS loads a kernel and chooses its shape the first time it meets a row count:
         * a wave of 32 sequences' first decode step took 45 ms against 13 on the H200, and a
         * first 512-token prompt 112 ms against 11. Every decode batch size and the prefill
         * chunks' doublings go through the products once here (~0.1 s for batch 128). */
        double t0 = uc_time_s();
        UC_CHECK(uc_model_warm_products(e->m, &e->ws, e->p.prefill_chunk), rc, out);
        UC_LOG_INFO("engine: products warmed at 1-%lld rows and doublings to %lld in %.0f ms",
                    (long long)e->p.max_batch, (long long)e->p.prefill_chunk,
                    (uc_time_s() - t0) * 1e3);
    }
    UC_CHECK(eng_lorc_init(e), rc, out);
    /* in memory: the file gets it with the next calibration that writes it */
    UC_CHECK(eng_lorc_profile(e, false), rc, out);
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

void uc_engine_destroy(struct uc_engine *e)
{
    if (!e) {
        return;
    }
    for (int64_t i = 0; i < e->n_seqs; i++) {
        eng_seq_destroy(e, e->seqs[i]);
    }
    uc_free(e->seqs);
    eng_seq_map_fini(&e->seq_map);
    if (e->be) {
        for (int i = 0; i < DECODE_GRAPH_SLOTS; i++) {
            eng_graph_drop(e, &e->graphs[i]);
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
        for (int i = 0; i < 2; i++) {
            if (e->ids_dev[i]) {
                e->be->ops->free(e->be, e->ids_dev[i]);
            }
        }
        uc_kv_table_fini(&e->bt);
        uc_kv_cache_fini(&e->kv);
        eng_lorc_fini(e);
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
    void *host[] = {e->d_tok, e->sc_row, e->sc_head, e->sc_slot, e->dm_host, e->dm_maxn,
                    e->psum, e->wprob, e->colscore, e->rowscore, e->keep, e->sel_scratch,
                    e->spec, e->spec_local, e->cal_head, e->cal_hidden, e->model_dir,
                    e->profile_path, e->batch, e->sw_seq, e->sw_left, e->bt_seqs, e->dm_need,
                    e->dm_ids, e->dm_first, e->ah_batch, e->dec_logits, e->dec_argmax, e->ks_sum,
                    e->ks_dist, e->mc_sum, e->mc_cnt, e->pend, e->nx.ids, e->nx.expect,
                    e->nx.map};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) {
        uc_free(host[i]);
    }
    for (int i = 0; i < UC_QSPEC_BATCHES; i++) {
        uc_free(e->qsb[i].seq);
        uc_free(e->qsb[i].layer);
        uc_free(e->qsb[i].host);
    }
    uc_buf_fini(&e->wire);
    uc_free(e);
}

const struct uc_model_config *uc_engine_config(const struct uc_engine *e) { return e->cfg; }
const double *uc_engine_lorc_log_cond(const struct uc_engine *e)
{
    return e->lorc_ready ? e->lorc_log_cond : NULL;
}
struct uc_backend *uc_engine_backend(struct uc_engine *e) { return e->be; }
struct uc_comm *uc_engine_comm(struct uc_engine *e) { return e->comm; }
int64_t uc_engine_max_ctx(const struct uc_engine *e) { return e->max_ctx; }
size_t uc_engine_weight_bytes(const struct uc_engine *e) { return uc_model_weight_bytes(e->m); }
uint64_t uc_engine_model_hash(const struct uc_engine *e) { return uc_model_hash(e->m); }
const char *uc_engine_nonfinite_weights(const struct uc_engine *e)
{
    return uc_model_nonfinite_weights(e->m);
}
int64_t uc_engine_kv_blocks_total(const struct uc_engine *e) { return e->kv.n_blocks; }
int64_t uc_engine_kv_blocks_used(const struct uc_engine *e) { return uc_kv_used_blocks(&e->kv); }
int64_t uc_engine_kv_blocks_shared(const struct uc_engine *e)
{
    return uc_kv_shared_blocks(&e->kv);
}
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

/* ---- accessors -------------------------------------------------------------------------- */

enum uc_seq_phase uc_engine_seq_phase(const struct uc_engine *e, int64_t seq_id)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    return s ? s->phase : UC_SEQ_UNKNOWN;
}

bool uc_engine_seq_prefill_pos(const struct uc_engine *e, int64_t seq_id, int64_t *layer,
                               int64_t *row)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    bool on = s && s->phase == UC_SEQ_PREFILLING;
    *layer = on ? s->layer : 0;
    *row = on ? s->t_done : 0;
    return on;
}

#define BACKGROUND_SPAN_REF 1024

int64_t uc_engine_background_rows(const struct uc_engine *e, int64_t seq_id, int64_t rows)
{
    int64_t layer, t0;
    uc_engine_seq_prefill_pos(e, seq_id, &layer, &t0);
    double work = (double)rows * BACKGROUND_SPAN_REF;
    /* the largest r with r (t0 + r) <= work */
    int64_t r = (int64_t)((sqrt((double)t0 * (double)t0 + 4.0 * work) - (double)t0) / 2.0);
    r = r < rows ? r : rows;
    return r > 1 ? r : 1;
}

const float *uc_engine_seq_logits(const struct uc_engine *e, int64_t seq_id, int64_t *n_rows)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    if (!s || s->logits_rows == 0) {
        *n_rows = 0;
        return NULL;
    }
    *n_rows = s->logits_rows;
    return s->logits_ext ? s->logits_ext : s->logits;
}

bool uc_engine_seq_greedy(const struct uc_engine *e, int64_t seq_id, int32_t *token)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    if (!s || s->greedy < 0 || s->logits_rows != 0) {
        return false;
    }
    *token = s->greedy;
    return true;
}

int64_t uc_engine_seq_len(const struct uc_engine *e, int64_t seq_id)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    return s ? s->n_ctx : -1;
}

const struct uc_plan *uc_engine_seq_plan(const struct uc_engine *e, int64_t seq_id)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    return s ? &s->plan : NULL;
}

const int32_t *uc_engine_seq_kept(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                  int64_t kv_head, int64_t *n)
{
    const struct seq *s = eng_find_seq(e, seq_id);
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
    const struct seq *s = eng_find_seq(e, seq_id);
    return s && s->plan_agreed;
}

const int32_t *uc_engine_seq_rows(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                  int64_t *n)
{
    const struct seq *s = eng_find_seq(e, seq_id);
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
    const struct seq *s = eng_find_seq(e, seq_id);
    if (!s || !s->qspec) {
        return NULL;
    }
    return s->qspec + (layer * e->cfg->n_heads + head) * e->cfg->head_dim;
}

const double *uc_engine_seq_hidden_spectrum(const struct uc_engine *e, int64_t seq_id,
                                            int64_t layer)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    if (!s || !s->hspec) {
        return NULL;
    }
    return s->hspec + layer * e->cfg->hidden;
}

uc_status uc_engine_seq_report(const struct uc_engine *e, int64_t seq_id,
                               struct uc_compress_report *out)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    memset(out, 0, sizeof *out);
    if (!s) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "report: unknown sequence %lld", (long long)seq_id);
    }
    int64_t L = e->cfg->n_layers, hkv = e->cfg->n_heads_kv;
    const struct uc_plan *p = &s->plan;
    out->policy = s->cp.policy;
    out->stages = s->cp.stages;
    for (int64_t l = 0; l < L; l++) {
        out->n_shared_layers += p->share_src[l] != l;
    }
    out->kv_budget = s->cp.policy == UC_POLICY_FULL ? 0 : s->cp.kv_budget;
    out->kv_tokens_full = s->n_prompt * L * hkv;
    int64_t kept = 0;
    int64_t g_n[UC_MAX_HEAD_GROUPS] = {0};
    double g_sum[UC_MAX_HEAD_GROUPS] = {0};
    int64_t lorc_elems = 0; /* LoRC: the kept tokens' latent row elements */
    size_t asz = act_size(e);
    for (int64_t l = 0; l < L && s->phase == UC_SEQ_DECODING; l++) {
        int64_t rows = s->layer_rows[l];
        for (int64_t j = 0; j < hkv; j++) {
            int64_t b = p->budget[l * hkv + j];
            int64_t k = b < rows ? b : rows;
            kept += k;
            if (s->lorc_rank) {
                lorc_elems += k * uc_kv_latent_width(s->lorc_rank[l], asz);
            }
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
    /* ThinK: the kept tokens' keys hold key_channels of the D channels */
    int64_t d = e->cfg->head_dim;
    out->think_ratio = uc_policy_think_ratio(&s->cp);
    out->key_channels = out->think_ratio > 0.0f ? uc_think_kdim(out->think_ratio, d) : d;
    out->kv_bytes_kept = kept * (int64_t)per * (out->key_channels + d) / (2 * d);
    /* MiniCache: a merged token's two rows of 2 D values (one per layer) are one row of
     * 2 D + 4 (backend.h) */
    out->minicache_pairs = s->mc_n_pairs;
    /* the pairs' first layers, ascending (pair p is layers L + p's merged heads) */
    memset(out->minicache_first, 0, sizeof out->minicache_first);
    for (int64_t l = 0; l < L; l++) {
        if (s->mc_pair && s->mc_pair[l] >= 0 && s->mc_partner[l] > l) {
            out->minicache_first[s->mc_pair[l]] = (int16_t)l;
        }
    }
    out->minicache_start = s->mc_n_pairs > 0 ? out->minicache_first[0] : 0;
    out->minicache_merged = s->mc_merged_all;
    out->minicache_retained = s->mc_retained_all;
    out->kv_bytes_kept -= s->mc_merged_all * (2 * d - UC_KV_MERGED_EXTRA) * (int64_t)act_size(e);
    out->lorc_ratio = uc_policy_lorc_ratio(&s->cp);
    out->lorc_rank = s->lorc_rank;
    if (s->lorc_rank) {
        out->kv_bytes_kept = lorc_elems * (int64_t)asz;
        out->lorc_rank_first = s->lorc_rank[0];
        out->lorc_rank_last = s->lorc_rank[L - 1];
    }
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
    out->prefill_bytes_peak_local = s->pf_peak;
    out->kv_row_bytes_local = uc_kv_seq_row_bytes(&e->kv, &s->kv);
    return UC_OK;
}

const int32_t *uc_engine_seq_key_channels(const struct uc_engine *e, int64_t seq_id,
                                          int64_t layer, int64_t kv_head, int64_t *n)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    int64_t local = kv_head - e->sh->kv0;
    *n = 0;
    if (!s || s->phase != UC_SEQ_DECODING || layer < 0 || layer >= e->cfg->n_layers ||
        local < 0 || local >= e->sh->n_heads_kv) {
        return NULL;
    }
    const struct uc_kv_head *h = &s->kv.heads[layer * e->sh->n_heads_kv + local];
    *n = h->kdim;
    return h->chan;
}

const int32_t *uc_engine_seq_merged(const struct uc_engine *e, int64_t seq_id, int64_t layer,
                                    int64_t kv_head, int64_t *n)
{
    const struct seq *s = eng_find_seq(e, seq_id);
    int64_t local = kv_head - e->sh->kv0;
    *n = 0;
    if (!s || layer < 0 || layer >= e->cfg->n_layers || local < 0 ||
        local >= e->sh->n_heads_kv) {
        return NULL;
    }
    return eng_mc_merged_positions(s, layer, local, n);
}
