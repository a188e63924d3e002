/* Weights of one rank and the pieces of the forward pass. Loading validates every tensor of the
 * checkpoint against the config before converting anything, then converts only this rank's
 * slices (rows of column-parallel weights, columns of row-parallel ones). */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "safetensors.h"

struct layer_w {
    void *attn_norm; /* (1, C) */
    void *wqkv;      /* (qkv_dim, C) */
    void *bqkv;      /* (1, qkv_dim) or NULL */
    void *wo;        /* (C, H_local D) */
    void *bo;        /* (1, C) or NULL; added on rank 0 only */
    void *ffn_norm;  /* (1, C) */
    void *wgu;       /* (2 F_local, C): gate rows then up rows */
    void *wdown;     /* (C, F_local) */
};

struct uc_model {
    struct uc_model_config cfg;
    struct uc_model_shard sh;
    struct uc_backend *be;
    struct uc_comm *comm;
    struct layer_w *layers;
    void *embed;      /* (V, C) */
    void *final_norm; /* (1, C) */
    void *lm_head;    /* (V_local, C) */
    size_t weight_bytes;
    uint64_t hash;
    int64_t loading;      /* the layer being loaded (-1: embedding, lm head, final norm) */
    char nonfinite[96];   /* where the first non-finite weight is ("" if none) */
};

/* ---- sharding -------------------------------------------------------------------------- */

uc_status uc_model_tp_check(const struct uc_model_config *cfg, int n_ranks, char *msg,
                            size_t msg_size)
{
    int64_t r = n_ranks;
    if (r < 1) {
        snprintf(msg, msg_size, "tp=%d must be at least 1", n_ranks);
        return UC_ERR_INVALID_ARG;
    }
    if (cfg->n_heads % r != 0) {
        snprintf(msg, msg_size, "tp=%d does not divide num_attention_heads=%lld", n_ranks,
                 (long long)cfg->n_heads);
        return UC_ERR_INVALID_ARG;
    }
    if (cfg->n_heads_kv % r != 0 && r % cfg->n_heads_kv != 0) {
        snprintf(msg, msg_size,
                 "tp=%d: num_key_value_heads=%lld must be a multiple of tp, or tp a multiple of "
                 "it (then KV heads are replicated)",
                 n_ranks, (long long)cfg->n_heads_kv);
        return UC_ERR_INVALID_ARG;
    }
    if (cfg->ffn % r != 0) {
        snprintf(msg, msg_size, "tp=%d does not divide intermediate_size=%lld", n_ranks,
                 (long long)cfg->ffn);
        return UC_ERR_INVALID_ARG;
    }
    return UC_OK;
}

void uc_model_shard_of(struct uc_model_shard *s, const struct uc_model_config *cfg, int rank,
                       int n_ranks)
{
    memset(s, 0, sizeof *s);
    int64_t r = n_ranks;
    s->rank = rank;
    s->n_ranks = n_ranks;
    s->group = cfg->n_heads / cfg->n_heads_kv;
    s->n_heads = cfg->n_heads / r;
    s->h0 = rank * s->n_heads;
    if (cfg->n_heads_kv >= r) {
        s->n_heads_kv = cfg->n_heads_kv / r;
        s->kv0 = rank * s->n_heads_kv;
    } else {
        s->n_heads_kv = 1;
        s->kv0 = s->h0 / s->group;
        s->kv_replicated = true;
    }
    s->n_ffn = cfg->ffn / r;
    s->f0 = rank * s->n_ffn;
    s->n_vocab_pad = (cfg->vocab + r - 1) / r;
    s->v0 = rank * s->n_vocab_pad;
    int64_t end = s->v0 + s->n_vocab_pad < cfg->vocab ? s->v0 + s->n_vocab_pad : cfg->vocab;
    s->n_vocab = end > s->v0 ? end - s->v0 : 0;
    s->qkv_dim = (s->n_heads + 2 * s->n_heads_kv) * cfg->head_dim;
}

/* ---- loading --------------------------------------------------------------------------- */

static uc_status expect2(const struct uc_st *st, const char *name, int64_t a, int64_t b)
{
    int64_t shape[2] = {a, b};
    return uc_st_expect(st, name, 2, shape);
}

static uc_status expect1(const struct uc_st *st, const char *name, int64_t a)
{
    return uc_st_expect(st, name, 1, &a);
}

/* Every tensor the config implies must be present with its exact shape. */
static uc_status validate(const struct uc_model_config *c, const struct uc_st *st)
{
    char n[160];
    uc_status rc;
    int64_t hd = c->n_heads * c->head_dim, kvd = c->n_heads_kv * c->head_dim;
    UC_CHECK(expect2(st, "model.embed_tokens.weight", c->vocab, c->hidden), rc, out);
    UC_CHECK(expect1(st, "model.norm.weight", c->hidden), rc, out);
    if (!c->tie_embeddings) {
        UC_CHECK(expect2(st, "lm_head.weight", c->vocab, c->hidden), rc, out);
    }
    for (int64_t l = 0; l < c->n_layers; l++) {
#define LN(suffix) (snprintf(n, sizeof n, "model.layers.%lld.%s", (long long)l, suffix), n)
        UC_CHECK(expect1(st, LN("input_layernorm.weight"), c->hidden), rc, out);
        UC_CHECK(expect1(st, LN("post_attention_layernorm.weight"), c->hidden), rc, out);
        UC_CHECK(expect2(st, LN("self_attn.q_proj.weight"), hd, c->hidden), rc, out);
        UC_CHECK(expect2(st, LN("self_attn.k_proj.weight"), kvd, c->hidden), rc, out);
        UC_CHECK(expect2(st, LN("self_attn.v_proj.weight"), kvd, c->hidden), rc, out);
        UC_CHECK(expect2(st, LN("self_attn.o_proj.weight"), c->hidden, hd), rc, out);
        UC_CHECK(expect2(st, LN("mlp.gate_proj.weight"), c->ffn, c->hidden), rc, out);
        UC_CHECK(expect2(st, LN("mlp.up_proj.weight"), c->ffn, c->hidden), rc, out);
        UC_CHECK(expect2(st, LN("mlp.down_proj.weight"), c->hidden, c->ffn), rc, out);
        if (c->qkv_bias) {
            UC_CHECK(expect1(st, LN("self_attn.q_proj.bias"), hd), rc, out);
            UC_CHECK(expect1(st, LN("self_attn.k_proj.bias"), kvd), rc, out);
            UC_CHECK(expect1(st, LN("self_attn.v_proj.bias"), kvd), rc, out);
        }
        if (c->o_bias) {
            UC_CHECK(expect1(st, LN("self_attn.o_proj.bias"), c->hidden), rc, out);
        }
        if (c->mlp_bias) {
            rc = UC_ERRF(UC_ERR_UNSUPPORTED, "config field=mlp_bias=true is not supported");
            goto out;
        }
#undef LN
    }
out:
    return rc;
}

/* A float32 staging buffer reused across tensors. */
struct stage {
    float *buf;
    size_t cap;
};

static float *stage_get(struct stage *s, int64_t n)
{
    if ((size_t)n > s->cap) {
        float *b = uc_realloc(s->buf, (size_t)n * sizeof(float));
        if (!b) {
            return NULL;
        }
        s->buf = b;
        s->cap = (size_t)n;
    }
    return s->buf;
}

/* Part of a weight: `n_rows` rows from `row0` and columns [col0, col0+n_cols) of tensor `name`,
 * written at row `dst_row0` of the staging buffer (which has n_cols columns). */
static uc_status read_part(const struct uc_st *st, const char *name, int64_t row0, int64_t n_rows,
                           int64_t col0, int64_t n_cols, float *dst)
{
    const struct uc_st_tensor *t = uc_st_find(st, name);
    if (!t) {
        return UC_ERRF(UC_ERR_FORMAT, "tensor=%s is missing", name);
    }
    return uc_st_read_f32(t, row0, n_rows, col0, n_cols, dst);
}

/* Remembers the first weight with a NaN or Inf, so a request that then gets non-finite logits
 * can name the layer (a plain pass over the staging buffer, cheap next to the conversion). */
static void note_nonfinite(struct uc_model *m, const float *host, int64_t n)
{
    if (m->nonfinite[0]) {
        return;
    }
    int64_t bad = -1;
    for (int64_t i = 0; i < n && bad < 0; i++) {
        bad = isfinite(host[i]) ? -1 : i;
    }
    if (bad < 0) {
        return;
    }
    if (m->loading >= 0) {
        snprintf(m->nonfinite, sizeof m->nonfinite, "layer %lld", (long long)m->loading);
    } else {
        snprintf(m->nonfinite, sizeof m->nonfinite, "the embedding, lm head or final norm");
    }
    UC_LOG_WARN("model: non-finite weight (%g) in %s: requests will end with INTERNAL",
                (double)host[bad], m->nonfinite);
}

static uc_status upload(struct uc_model *m, void **out, const float *host, int64_t rows,
                        int64_t cols)
{
    note_nonfinite(m, host, rows * cols);
    uc_status rc = m->be->ops->weight_create(m->be, out, host, rows, cols);
    if (rc == UC_OK) {
        m->weight_bytes += (size_t)(rows * cols) * m->be->ops->act_size(m->be);
    }
    return rc;
}

static uc_status load_vector(struct uc_model *m, const struct uc_st *st, struct stage *sg,
                             const char *name, int64_t n, void **out)
{
    float *b = stage_get(sg, n);
    if (!b) {
        return UC_ERRF(UC_ERR_NOMEM, "tensor=%s", name);
    }
    uc_status rc = read_part(st, name, 0, 1, 0, n, b);
    return rc == UC_OK ? upload(m, out, b, 1, n) : rc;
}

static uc_status load_layer(struct uc_model *m, const struct uc_st *st, struct stage *sg,
                            int64_t l)
{
    const struct uc_model_config *c = &m->cfg;
    const struct uc_model_shard *s = &m->sh;
    struct layer_w *w = &m->layers[l];
    int64_t d = c->head_dim, cdim = c->hidden;
    char n[160];
    uc_status rc;
#define LN(suffix) (snprintf(n, sizeof n, "model.layers.%lld.%s", (long long)l, suffix), n)
    UC_CHECK(load_vector(m, st, sg, LN("input_layernorm.weight"), cdim, &w->attn_norm), rc, out);
    UC_CHECK(load_vector(m, st, sg, LN("post_attention_layernorm.weight"), cdim, &w->ffn_norm), rc,
             out);
    /* fused QKV: this rank's query heads, then its KV heads' K rows, then V rows */
    float *b = stage_get(sg, s->qkv_dim * cdim);
    if (!b) {
        rc = UC_ERRF(UC_ERR_NOMEM, "layer=%lld qkv", (long long)l);
        goto out;
    }
    int64_t qrows = s->n_heads * d, kvrows = s->n_heads_kv * d;
    UC_CHECK(read_part(st, LN("self_attn.q_proj.weight"), s->h0 * d, qrows, 0, cdim, b), rc, out);
    UC_CHECK(read_part(st, LN("self_attn.k_proj.weight"), s->kv0 * d, kvrows, 0, cdim,
                       b + qrows * cdim),
             rc, out);
    UC_CHECK(read_part(st, LN("self_attn.v_proj.weight"), s->kv0 * d, kvrows, 0, cdim,
                       b + (qrows + kvrows) * cdim),
             rc, out);
    UC_CHECK(upload(m, &w->wqkv, b, s->qkv_dim, cdim), rc, out);
    if (c->qkv_bias) {
        UC_CHECK(read_part(st, LN("self_attn.q_proj.bias"), 0, 1, s->h0 * d, qrows, b), rc, out);
        UC_CHECK(read_part(st, LN("self_attn.k_proj.bias"), 0, 1, s->kv0 * d, kvrows, b + qrows),
                 rc, out);
        UC_CHECK(read_part(st, LN("self_attn.v_proj.bias"), 0, 1, s->kv0 * d, kvrows,
                           b + qrows + kvrows),
                 rc, out);
        UC_CHECK(upload(m, &w->bqkv, b, 1, s->qkv_dim), rc, out);
    }
    UC_CHECK(read_part(st, LN("self_attn.o_proj.weight"), 0, cdim, s->h0 * d, qrows, b), rc, out);
    UC_CHECK(upload(m, &w->wo, b, cdim, qrows), rc, out);
    if (c->o_bias && s->rank == 0) {
        UC_CHECK(load_vector(m, st, sg, LN("self_attn.o_proj.bias"), cdim, &w->bo), rc, out);
    }
    b = stage_get(sg, 2 * s->n_ffn * cdim);
    if (!b) {
        rc = UC_ERRF(UC_ERR_NOMEM, "layer=%lld mlp", (long long)l);
        goto out;
    }
    UC_CHECK(read_part(st, LN("mlp.gate_proj.weight"), s->f0, s->n_ffn, 0, cdim, b), rc, out);
    UC_CHECK(read_part(st, LN("mlp.up_proj.weight"), s->f0, s->n_ffn, 0, cdim, b + s->n_ffn * cdim),
             rc, out);
    UC_CHECK(upload(m, &w->wgu, b, 2 * s->n_ffn, cdim), rc, out);
    UC_CHECK(read_part(st, LN("mlp.down_proj.weight"), 0, cdim, s->f0, s->n_ffn, b), rc, out);
    UC_CHECK(upload(m, &w->wdown, b, cdim, s->n_ffn), rc, out);
#undef LN
out:
    return rc;
}

static uint64_t checkpoint_hash(const struct uc_model_config *c, const struct uc_st *st)
{
    uint64_t h = uc_model_config_hash(c);
    for (int64_t i = 0; i < uc_st_count(st); i++) {
        const struct uc_st_tensor *t = uc_st_at(st, i);
        h = uc_fnv1a(h, t->name, strlen(t->name));
        h = uc_fnv1a(h, &t->dtype, sizeof t->dtype);
        h = uc_fnv1a(h, t->shape, sizeof t->shape[0] * (size_t)t->n_dims);
        h = uc_fnv1a(h, t->data, t->size_bytes < 64 ? t->size_bytes : 64);
    }
    return h;
}

/* RoPE inverse frequencies in float32 as transformers computes them, with llama3 or linear
 * scaling applied. */
static void rope_inv_freq(const struct uc_model_config *c, float *inv)
{
    int64_t d = c->head_dim;
    for (int64_t i = 0; i < d / 2; i++) {
        float e = (float)(2 * i) / (float)d;
        float f = 1.0f / powf((float)c->rope_theta, e);
        if (c->rope_kind == UC_ROPE_LINEAR) {
            f = (float)(f / c->rope_factor);
        } else if (c->rope_kind == UC_ROPE_LLAMA3) {
            double lo_wl = c->rope_orig_max_ctx / c->rope_low_freq_factor;
            double hi_wl = c->rope_orig_max_ctx / c->rope_high_freq_factor;
            double wl = 2.0 * M_PI / f;
            double g = f;
            if (wl > lo_wl) {
                g = f / c->rope_factor;
            } else if (wl >= hi_wl) {
                double smooth = (c->rope_orig_max_ctx / wl - c->rope_low_freq_factor) /
                                (c->rope_high_freq_factor - c->rope_low_freq_factor);
                g = (1.0 - smooth) * f / c->rope_factor + smooth * f;
            }
            f = (float)g;
        }
        inv[i] = f;
    }
}

/* Synthetic weights: each tensor's slice generated on the backend from a seed derived from the
 * tensor name and the slice, with the init scale of a trained model (std 0.02, norms 1). */
static uc_status random_weight(struct uc_model *m, void **out, const char *name, int64_t part,
                               int64_t rows, int64_t cols, float mean, float std)
{
    uint64_t seed = uc_fnv1a(UC_FNV_INIT, name, strlen(name)) ^ (uint64_t)part * 0x9e3779b9ULL;
    uc_status rc = m->be->ops->weight_random(m->be, out, rows, cols, seed, mean, std);
    if (rc == UC_OK) {
        m->weight_bytes += (size_t)(rows * cols) * m->be->ops->act_size(m->be);
    }
    return rc;
}

static uc_status create_synthetic(struct uc_model *m)
{
    const struct uc_model_config *c = &m->cfg;
    const struct uc_model_shard *s = &m->sh;
    uc_status rc;
    const float sd = 0.02f;
    UC_CHECK(random_weight(m, &m->embed, "embed", 0, c->vocab, c->hidden, 0.0f, sd), rc, out);
    if (s->n_vocab > 0) {
        UC_CHECK(random_weight(m, &m->lm_head, "lm_head", s->v0, s->n_vocab, c->hidden, 0.0f, sd),
                 rc, out);
    }
    UC_CHECK(random_weight(m, &m->final_norm, "norm", 0, 1, c->hidden, 1.0f, 0.0f), rc, out);
    for (int64_t l = 0; l < c->n_layers; l++) {
        struct layer_w *w = &m->layers[l];
        int64_t base = l * 1000003 + s->rank * 7919;
        UC_CHECK(random_weight(m, &w->attn_norm, "attn_norm", l, 1, c->hidden, 1.0f, 0.0f), rc,
                 out);
        UC_CHECK(random_weight(m, &w->ffn_norm, "ffn_norm", l, 1, c->hidden, 1.0f, 0.0f), rc,
                 out);
        UC_CHECK(random_weight(m, &w->wqkv, "wqkv", base, s->qkv_dim, c->hidden, 0.0f, sd), rc,
                 out);
        UC_CHECK(random_weight(m, &w->wo, "wo", base, c->hidden, s->n_heads * c->head_dim, 0.0f,
                               sd),
                 rc, out);
        UC_CHECK(random_weight(m, &w->wgu, "wgu", base, 2 * s->n_ffn, c->hidden, 0.0f, sd), rc,
                 out);
        UC_CHECK(random_weight(m, &w->wdown, "wdown", base, c->hidden, s->n_ffn, 0.0f, sd), rc,
                 out);
    }
out:
    return rc;
}

uc_status uc_model_kv_proj_f32(struct uc_model *m, int64_t layer, int which, int64_t j,
                               float *out)
{
    const struct uc_model_shard *s = &m->sh;
    int64_t d = m->cfg.head_dim, c = m->cfg.hidden;
    if (layer < 0 || layer >= m->cfg.n_layers || which < 0 || which > 1 || j < 0 ||
        j >= s->n_heads_kv) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "kv projection layer=%lld which=%d head=%lld",
                       (long long)layer, which, (long long)j);
    }
    int64_t row = (s->n_heads + which * s->n_heads_kv + j) * d;
    const char *w = (const char *)m->layers[layer].wqkv +
                    (size_t)(row * c) * m->be->ops->act_size(m->be);
    return m->be->ops->download_f32(m->be, out, w, d * c);
}

uc_status uc_model_create(struct uc_model **out, const struct uc_model_params *p)
{
    *out = NULL;
    uc_status rc;
    struct uc_st *st = NULL;
    struct stage sg = {0};
    float *inv = NULL;
    struct uc_model *m = uc_calloc(1, sizeof *m);
    if (!m) {
        return UC_ERRF(UC_ERR_NOMEM, "model");
    }
    m->be = p->be;
    m->comm = p->comm;
    m->loading = -1;
    bool synthetic = uc_model_is_synthetic(p->model_dir);
    if (synthetic) {
        UC_CHECK(uc_model_config_synthetic(&m->cfg, p->model_dir), rc, out_destroy);
    } else {
        UC_CHECK(uc_model_config_load(&m->cfg, p->model_dir), rc, out_destroy);
    }
    int rank = uc_comm_rank(p->comm), n_ranks = uc_comm_size(p->comm);
    char msg[256];
    if (uc_model_tp_check(&m->cfg, n_ranks, msg, sizeof msg) != UC_OK) {
        rc = UC_ERRF(UC_ERR_INVALID_ARG, "model=%s: %s", p->model_dir, msg);
        goto out_destroy;
    }
    uc_model_shard_of(&m->sh, &m->cfg, rank, n_ranks);
    const struct uc_model_config *c = &m->cfg;
    if (synthetic) {
        m->hash = uc_model_config_hash(c);
        m->layers = uc_calloc((size_t)c->n_layers, sizeof *m->layers);
        if (!m->layers) {
            rc = UC_ERRF(UC_ERR_NOMEM, "layers=%lld", (long long)c->n_layers);
            goto out_destroy;
        }
        UC_CHECK(create_synthetic(m), rc, out_destroy);
        goto rope;
    }
    UC_CHECK(uc_st_open(&st, p->model_dir), rc, out_destroy);
    UC_CHECK(validate(&m->cfg, st), rc, out_destroy);
    m->hash = checkpoint_hash(&m->cfg, st);
    m->layers = uc_calloc((size_t)m->cfg.n_layers, sizeof *m->layers);
    if (!m->layers) {
        rc = UC_ERRF(UC_ERR_NOMEM, "layers=%lld", (long long)m->cfg.n_layers);
        goto out_destroy;
    }
    float *b = stage_get(&sg, c->vocab * c->hidden);
    if (!b) {
        rc = UC_ERRF(UC_ERR_NOMEM, "embedding V=%lld", (long long)c->vocab);
        goto out_destroy;
    }
    UC_CHECK(read_part(st, "model.embed_tokens.weight", 0, c->vocab, 0, c->hidden, b), rc,
             out_destroy);
    UC_CHECK(upload(m, &m->embed, b, c->vocab, c->hidden), rc, out_destroy);
    const char *head = c->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    if (m->sh.n_vocab > 0) {
        UC_CHECK(read_part(st, head, m->sh.v0, m->sh.n_vocab, 0, c->hidden, b), rc, out_destroy);
        UC_CHECK(upload(m, &m->lm_head, b, m->sh.n_vocab, c->hidden), rc, out_destroy);
    }
    UC_CHECK(load_vector(m, st, &sg, "model.norm.weight", c->hidden, &m->final_norm), rc,
             out_destroy);
    for (int64_t l = 0; l < c->n_layers; l++) {
        m->loading = l;
        UC_CHECK(load_layer(m, st, &sg, l), rc, out_destroy);
    }
    m->loading = -1;
rope:
    inv = uc_malloc((size_t)(c->head_dim / 2) * sizeof *inv);
    if (!inv) {
        rc = UC_ERRF(UC_ERR_NOMEM, "rope");
        goto out_destroy;
    }
    rope_inv_freq(c, inv);
    UC_CHECK(m->be->ops->rope_init(m->be, inv, c->head_dim / 2, c->max_ctx), rc, out_destroy);
    *out = m;
    m = NULL;
out_destroy:
    uc_model_destroy(m);
    uc_free(inv);
    uc_free(sg.buf);
    uc_st_destroy(st);
    return rc;
}

void uc_model_destroy(struct uc_model *m)
{
    if (!m) {
        return;
    }
    struct uc_backend *be = m->be;
    if (m->layers) {
        for (int64_t l = 0; l < m->cfg.n_layers; l++) {
            struct layer_w *w = &m->layers[l];
            void *ws[] = {w->attn_norm, w->wqkv, w->bqkv, w->wo, w->bo, w->ffn_norm, w->wgu,
                          w->wdown};
            for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) {
                if (ws[i]) {
                    be->ops->weight_free(be, ws[i]);
                }
            }
        }
    }
    void *g[] = {m->embed, m->final_norm, m->lm_head};
    for (size_t i = 0; i < 3; i++) {
        if (g[i]) {
            be->ops->weight_free(be, g[i]);
        }
    }
    uc_free(m->layers);
    uc_free(m);
}

const struct uc_model_config *uc_model_cfg(const struct uc_model *m) { return &m->cfg; }
const struct uc_model_shard *uc_model_shard(const struct uc_model *m) { return &m->sh; }
size_t uc_model_weight_bytes(const struct uc_model *m) { return m->weight_bytes; }
uint64_t uc_model_hash(const struct uc_model *m) { return m->hash; }
const char *uc_model_nonfinite_weights(const struct uc_model *m)
{
    return m->nonfinite[0] ? m->nonfinite : NULL;
}

/* ---- workspace ------------------------------------------------------------------------- */

uc_status uc_model_ws_init(struct uc_model *m, struct uc_model_ws *ws, int64_t max_tok,
                           int64_t max_logit_rows)
{
    memset(ws, 0, sizeof *ws);
    struct uc_backend *be = m->be;
    size_t a = be->ops->act_size(be);
    const struct uc_model_shard *s = &m->sh;
    int64_t cdim = m->cfg.hidden;
    uc_status rc;
    ws->max_tok = max_tok;
    ws->max_logit_rows = max_logit_rows;
    UC_CHECK(be->ops->alloc(be, &ws->xn, (size_t)(max_tok * cdim) * a), rc, out);
    UC_CHECK(be->ops->alloc(be, &ws->tmp, (size_t)(max_tok * cdim) * a), rc, out);
    UC_CHECK(be->ops->alloc(be, &ws->att, (size_t)(max_tok * s->n_heads * m->cfg.head_dim) * a), rc,
             out);
    UC_CHECK(be->ops->alloc(be, &ws->gu, (size_t)(max_tok * 2 * s->n_ffn) * a), rc, out);
    UC_CHECK(be->ops->alloc(be, &ws->act, (size_t)(max_tok * s->n_ffn) * a), rc, out);
    int64_t lr = max_logit_rows;
    UC_CHECK(be->ops->alloc(be, &ws->logits, (size_t)(lr * s->n_vocab_pad) * a), rc, out);
    ws->logits_host = uc_calloc((size_t)(lr * s->n_vocab_pad), sizeof(float));
    ws->gather_host = uc_malloc((size_t)(lr * s->n_vocab_pad * s->n_ranks) * sizeof(float));
    if (!ws->logits_host || !ws->gather_host) {
        rc = UC_ERRF(UC_ERR_NOMEM, "logits rows=%lld", (long long)max_tok);
        goto out;
    }
    return UC_OK;
out:
    uc_model_ws_fini(m, ws);
    return rc;
}

void uc_model_ws_fini(struct uc_model *m, struct uc_model_ws *ws)
{
    struct uc_backend *be = m->be;
    void *d[] = {ws->xn, ws->tmp, ws->att, ws->gu, ws->act, ws->logits};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++) {
        if (d[i]) {
            be->ops->free(be, d[i]);
        }
    }
    uc_free(ws->logits_host);
    uc_free(ws->gather_host);
    memset(ws, 0, sizeof *ws);
}

/* ---- forward pieces -------------------------------------------------------------------- */

uc_status uc_model_embed(struct uc_model *m, void *x, const int32_t *ids, int64_t n_tok)
{
    for (int64_t i = 0; i < n_tok; i++) {
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "token id %d outside vocab %lld", ids[i],
                           (long long)m->cfg.vocab);
        }
    }
    return m->be->ops->gather_rows(m->be, x, m->embed, ids, n_tok, m->cfg.hidden);
}

uc_status uc_model_attn_norm(struct uc_model *m, struct uc_model_ws *ws, int64_t layer,
                             const void *x, int64_t n_tok)
{
    return m->be->ops->rmsnorm(m->be, ws->xn, x, m->layers[layer].attn_norm, n_tok,
                               m->cfg.hidden, (float)m->cfg.norm_eps);
}

uc_status uc_model_qkv_proj(struct uc_model *m, struct uc_model_ws *ws, int64_t layer, void *qkv,
                            int64_t n_tok)
{
    struct uc_backend *be = m->be;
    const struct layer_w *w = &m->layers[layer];
    uc_status rc = be->ops->matmul(be, qkv, ws->xn, w->wqkv, n_tok, m->sh.qkv_dim, m->cfg.hidden);
    if (rc == UC_OK && w->bqkv) {
        rc = be->ops->add_bias(be, qkv, w->bqkv, n_tok, m->sh.qkv_dim);
    }
    return rc;
}

uc_status uc_model_qkv(struct uc_model *m, struct uc_model_ws *ws, int64_t layer, void *qkv,
                       int64_t ld, const void *x, const int32_t *pos, int64_t n_tok)
{
    struct uc_backend *be = m->be;
    const struct uc_model_shard *s = &m->sh;
    uc_status rc;
    if (ld != s->qkv_dim) {
        return UC_ERRF(UC_ERR_INTERNAL, "qkv stride %lld != %lld", (long long)ld,
                       (long long)s->qkv_dim);
    }
    UC_CHECK(uc_model_attn_norm(m, ws, layer, x, n_tok), rc, out);
    UC_CHECK(uc_model_qkv_proj(m, ws, layer, qkv, n_tok), rc, out);
    /* q and k heads are adjacent in the fused row: rotate them in one pass */
    UC_CHECK(be->ops->rope(be, qkv, ld, s->n_heads + s->n_heads_kv, m->cfg.head_dim, pos, n_tok),
             rc, out);
out:
    return rc;
}

/* Whether a residual product (with this bias) goes to the backend's matmul_residual, which
 * fuses the product and the add where it pays: one rank without a bias. Under TP the ranks'
 * partial products are summed between the product and the add. */
static bool residual_in_backend(const struct uc_model *m, const void *bias)
{
    return m->sh.n_ranks == 1 && !bias;
}

/* A residual branch's end: x += a w^T (then y = norm(x) * norm_w when norm_w is non-NULL). */
static uc_status residual_product(struct uc_model *m, struct uc_model_ws *ws, void *x,
                                  const void *a, const void *w, const void *bias,
                                  const void *norm_w, int64_t n_tok, int64_t n_in)
{
    struct uc_backend *be = m->be;
    int64_t cdim = m->cfg.hidden;
    float eps = (float)m->cfg.norm_eps;
    enum uc_comm_dtype dt = be->ops->act_size(be) == 4 ? UC_COMM_F32 : UC_COMM_BF16;
    uc_status rc;
    if (residual_in_backend(m, bias)) {
        return be->ops->matmul_residual(be, x, ws->xn, ws->tmp, a, w, norm_w, n_tok, cdim, n_in,
                                        eps);
    }
    UC_CHECK(be->ops->matmul(be, ws->tmp, a, w, n_tok, cdim, n_in), rc, out);
    if (bias) {
        UC_CHECK(be->ops->add_bias(be, ws->tmp, bias, n_tok, cdim), rc, out);
    }
    UC_CHECK(uc_comm_dp_allreduce_sum(m->comm, ws->tmp, n_tok * cdim, dt, be->stream), rc, out);
    rc = norm_w ? be->ops->add_rmsnorm(be, ws->xn, x, ws->tmp, norm_w, n_tok, cdim, eps)
                : be->ops->add(be, x, ws->tmp, n_tok * cdim);
out:
    return rc;
}

/* The layer after attention; with `next_norm` the last residual add is fused with the next
 * layer's attention norm (into ws->xn). */
static uc_status finish_layer(struct uc_model *m, struct uc_model_ws *ws, int64_t layer, void *x,
                              int64_t n_tok, bool next_norm)
{
    struct uc_backend *be = m->be;
    const struct layer_w *w = &m->layers[layer];
    const struct uc_model_shard *s = &m->sh;
    int64_t cdim = m->cfg.hidden;
    uc_status rc;
    UC_CHECK(residual_product(m, ws, x, ws->att, w->wo, w->bo, w->ffn_norm, n_tok,
                              s->n_heads * m->cfg.head_dim),
             rc, out);
    UC_CHECK(be->ops->matmul_swiglu(be, ws->act, ws->gu, ws->xn, w->wgu, n_tok, s->n_ffn, cdim), rc,
             out);
    rc = residual_product(m, ws, x, ws->act, w->wdown, NULL,
                          next_norm ? m->layers[layer + 1].attn_norm : NULL, n_tok, s->n_ffn);
out:
    return rc;
}

uc_status uc_model_finish_layer(struct uc_model *m, struct uc_model_ws *ws, int64_t layer, void *x,
                                int64_t n_tok)
{
    return finish_layer(m, ws, layer, x, n_tok, false);
}

uc_status uc_model_finish_layer_norm_next(struct uc_model *m, struct uc_model_ws *ws,
                                          int64_t layer, void *x, int64_t n_tok)
{
    return finish_layer(m, ws, layer, x, n_tok, layer + 1 < m->cfg.n_layers);
}

/* A residual product as residual_product runs it (the add and norm in the backend's product or
 * not), into scratch: ws->tmp, with ws->gu as the product's scratch. */
static uc_status warm_residual(struct uc_model *m, struct uc_model_ws *ws, const void *a,
                               const void *w, const void *bias, int64_t t, int64_t n_in)
{
    struct uc_backend *be = m->be;
    int64_t c = m->cfg.hidden;
    if (residual_in_backend(m, bias)) {
        return be->ops->matmul_residual(be, ws->tmp, ws->xn, ws->gu, a, w, NULL, t, c, n_in,
                                        (float)m->cfg.norm_eps);
    }
    return be->ops->matmul(be, ws->tmp, a, w, t, c, n_in);
}

/* Layer 0's products and (up to max_logit_rows) the LM head at t rows, outputs into scratch. */
static uc_status warm_at(struct uc_model *m, struct uc_model_ws *ws, int64_t t)
{
    struct uc_backend *be = m->be;
    const struct layer_w *w = &m->layers[0];
    const struct uc_model_shard *s = &m->sh;
    int64_t c = m->cfg.hidden;
    uc_status rc;
    UC_CHECK(be->ops->matmul(be, ws->gu, ws->xn, w->wqkv, t, s->qkv_dim, c), rc, out);
    UC_CHECK(warm_residual(m, ws, ws->att, w->wo, w->bo, t, s->n_heads * m->cfg.head_dim), rc,
             out);
    UC_CHECK(be->ops->matmul_swiglu(be, ws->act, ws->gu, ws->xn, w->wgu, t, s->n_ffn, c), rc, out);
    UC_CHECK(warm_residual(m, ws, ws->act, w->wdown, NULL, t, s->n_ffn), rc, out);
    if (t <= ws->max_logit_rows) {
        rc = be->ops->matmul(be, ws->logits, ws->xn, m->lm_head, t, s->n_vocab, c);
    }
out:
    return rc;
}

uc_status uc_model_warm_products(struct uc_model *m, struct uc_model_ws *ws, int64_t max_rows)
{
    int64_t top = max_rows < ws->max_tok ? max_rows : ws->max_tok;
    uc_status rc = UC_OK;
    int64_t last = 0;
    for (int64_t t = 1; t <= top && rc == UC_OK; t = t < ws->max_logit_rows ? t + 1 : 2 * t) {
        rc = warm_at(m, ws, t);
        last = t;
    }
    if (rc == UC_OK && last < top) { /* the top itself, where the doublings stepped over it */
        rc = warm_at(m, ws, top);
    }
    return rc == UC_OK ? m->be->ops->sync(m->be) : rc;
}

/* The argmax of rows x's logits by `pick` (argmax to the host, or argmax_keep). */
static uc_status argmax_by(struct uc_model *m, struct uc_model_ws *ws, int32_t *out,
                           const void *x, int64_t n_tok,
                           uc_status (*pick)(struct uc_backend *, int32_t *, const void *,
                                             int64_t, int64_t))
{
    struct uc_backend *be = m->be;
    const struct uc_model_shard *s = &m->sh;
    int64_t cdim = m->cfg.hidden;
    uc_status rc;
    if (s->n_ranks != 1 || !pick || n_tok > ws->max_logit_rows) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "device argmax needs one rank");
    }
    UC_CHECK(be->ops->rmsnorm(be, ws->xn, x, m->final_norm, n_tok, cdim, (float)m->cfg.norm_eps),
             rc, out);
    UC_CHECK(be->ops->matmul(be, ws->logits, ws->xn, m->lm_head, n_tok, s->n_vocab, cdim), rc, out);
    rc = pick(be, out, ws->logits, n_tok, s->n_vocab);
out:
    return rc;
}

uc_status uc_model_argmax(struct uc_model *m, struct uc_model_ws *ws, int32_t *out, const void *x,
                          int64_t n_tok)
{
    return argmax_by(m, ws, out, x, n_tok, m->be->ops->argmax);
}

uc_status uc_model_argmax_keep(struct uc_model *m, struct uc_model_ws *ws, int32_t *dev_out,
                               const void *x, int64_t n_tok)
{
    return argmax_by(m, ws, dev_out, x, n_tok, m->be->ops->argmax_keep);
}

uc_status uc_model_embed_kept(struct uc_model *m, void *x, const int32_t *dev_ids, int64_t n_tok)
{
    if (!m->be->ops->embed_ids) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "embedding kept ids: not on this backend");
    }
    return m->be->ops->embed_ids(m->be, x, m->embed, dev_ids, n_tok, m->cfg.vocab,
                                 m->cfg.hidden);
}

uc_status uc_model_logits(struct uc_model *m, struct uc_model_ws *ws, float *out, const void *x,
                          int64_t n_tok)
{
    struct uc_backend *be = m->be;
    const struct uc_model_shard *s = &m->sh;
    int64_t cdim = m->cfg.hidden, vp = s->n_vocab_pad, v = m->cfg.vocab;
    uc_status rc;
    UC_CHECK(be->ops->rmsnorm(be, ws->xn, x, m->final_norm, n_tok, cdim, (float)m->cfg.norm_eps),
             rc, out);
    if (s->n_vocab > 0) {
        UC_CHECK(be->ops->matmul(be, ws->logits, ws->xn, m->lm_head, n_tok, s->n_vocab, cdim), rc,
                 out);
        /* (T, n_vocab) -> (T, vp) padded rows on the host */
        float *lh = ws->logits_host;
        UC_CHECK(be->ops->download_f32(be, lh, ws->logits, n_tok * s->n_vocab), rc, out);
        if (s->n_vocab != vp) {
            for (int64_t t = n_tok - 1; t >= 0; t--) {
                memmove(lh + t * vp, lh + t * s->n_vocab, (size_t)s->n_vocab * sizeof(float));
                for (int64_t j = s->n_vocab; j < vp; j++) {
                    lh[t * vp + j] = 0.0f;
                }
            }
        }
    }
    if (s->n_ranks == 1) {
        memcpy(out, ws->logits_host, (size_t)(n_tok * v) * sizeof(float));
        return UC_OK;
    }
    UC_CHECK(uc_comm_allgather(m->comm, ws->logits_host, ws->gather_host,
                               (size_t)(n_tok * vp) * sizeof(float)),
             rc, out);
    for (int r = 0; r < s->n_ranks; r++) {
        int64_t v0 = r * vp;
        int64_t nv = v0 + vp <= v ? vp : (v > v0 ? v - v0 : 0);
        for (int64_t t = 0; t < n_tok; t++) {
            memcpy(out + t * v + v0, ws->gather_host + ((int64_t)r * n_tok + t) * vp,
                   (size_t)nv * sizeof(float));
        }
    }
out:
    return rc;
}
