/* LoRC in the engine (compress/lorc.h): at engine creation each rank decomposes the key and value
 * projection slices of its own KV heads (read again from the checkpoint as float32), keeps their
 * left singular bases on the backend for the latent ops (a synthetic model's: its random weights
 * as the backend holds them), and adds each layer's log condition
 * numbers into sums that are all-reduced over the ranks (a replicated KV head counted once), so
 * every rank holds the same sensitivities and derives the same ranks for any ratio. They are
 * recorded in the calibration profile's "lorc" object. A sequence with the lorc stage gets its
 * per-layer ranks at creation; its heads become latent heads at each layer end (prefill.c). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "compress/lorc.h"
#include "compress/profile.h"
#include "internal.h"
#include "safetensors.h"

/* Why lorc cannot run on this engine, or NULL when it can (before eng_lorc_init decides). */
static const char *lorc_unsupported(const struct uc_engine *e)
{
    const struct uc_model_config *c = e->cfg;
    if (c->qkv_bias) {
        return "the model has K/V biases (the latent of a biased projection is not exact)";
    }
    if (c->n_layers > UC_LORC_MAX_LAYERS || c->head_dim > UC_LATENT_MAX_D || c->head_dim % 2) {
        return "the model has more than 1024 layers, or an odd head_dim or one above 512";
    }
    if (e->be->kind == UC_BACKEND_CUDA &&
        (c->head_dim > UC_LATENT_CUDA_MAX_D || c->head_dim % 32)) {
        return "the CUDA latent decode takes head_dim a multiple of 32 up to 128";
    }
    return NULL;
}

/* The bases and the log condition sums of layer l's local heads: bases (Hkv_local, 2, D, D);
 * the weights from the checkpoint (st), or from the backend for a synthetic model (st NULL). */
static uc_status layer_bases(struct uc_engine *e, const struct uc_st *st, int64_t l, float *w,
                             float *bases, double *sv, double *cond_sum)
{
    const struct uc_model_shard *sh = e->sh;
    int64_t d = e->cfg->head_dim, cdim = e->cfg->hidden;
    /* a replicated KV head counts on the first rank that holds it */
    bool owner = !sh->kv_replicated || sh->h0 == sh->kv0 * sh->group;
    const char *proj[2] = {"k_proj", "v_proj"};
    char name[160];
    uc_status rc = UC_OK;
    for (int p = 0; p < 2; p++) {
        snprintf(name, sizeof name, "model.layers.%lld.self_attn.%s.weight", (long long)l, proj[p]);
        const struct uc_st_tensor *t = st ? uc_st_find(st, name) : NULL;
        if (st && !t) {
            return UC_ERRF(UC_ERR_FORMAT, "lorc: tensor %s missing", name);
        }
        for (int64_t j = 0; j < sh->n_heads_kv; j++) {
            if (t) {
                UC_CHECK(uc_st_read_f32(t, (sh->kv0 + j) * d, d, 0, cdim, w), rc, out);
            } else {
                UC_CHECK(uc_model_kv_proj_f32(e->m, l, p, j, w), rc, out);
            }
            UC_CHECK(uc_lorc_basis(bases + (j * 2 + p) * d * d, sv, w, d, cdim), rc, out);
            if (owner) {
                *cond_sum += uc_lorc_log_cond(sv, d);
            }
        }
    }
out:
    return rc;
}

uc_status eng_lorc_init(struct uc_engine *e)
{
    const char *why = lorc_unsupported(e);
    if (why) {
        UC_LOG0(UC_LOG_LEVEL_INFO, "engine: lorc unavailable: %s", why);
        return UC_OK;
    }
    int64_t L = e->cfg->n_layers, d = e->cfg->head_dim, hkv_l = e->sh->n_heads_kv;
    int64_t per_layer = hkv_l * 2 * d * d;
    double t0 = uc_time_s();
    struct uc_st *st = NULL;
    float *w = uc_malloc((size_t)(d * e->cfg->hidden) * sizeof(float));
    float *bases = uc_malloc((size_t)(L * per_layer) * sizeof(float));
    double *sv = uc_malloc((size_t)d * sizeof(double));
    double *cond = uc_calloc((size_t)L, sizeof(double));
    uc_status rc = UC_OK;
    if (!w || !bases || !sv || !cond) {
        rc = UC_ERRF(UC_ERR_NOMEM, "lorc bases L=%lld D=%lld", (long long)L, (long long)d);
        goto out;
    }
    if (!uc_model_is_synthetic(e->model_dir)) {
        UC_CHECK(uc_st_open(&st, e->model_dir), rc, out);
    }
    for (int64_t l = 0; l < L; l++) {
        UC_CHECK(layer_bases(e, st, l, w, bases + l * per_layer, sv, cond + l), rc, out);
    }
    /* the sensitivities over every KV head of the model: one sum per layer over the ranks */
    UC_CHECK(uc_comm_allreduce_sum(e->comm, cond, L, UC_COMM_F64), rc, out);
    for (int64_t l = 0; l < L; l++) {
        cond[l] /= (double)e->cfg->n_heads_kv;
    }
    UC_CHECK(e->be->ops->alloc(e->be, &e->lorc_basis, (size_t)(L * per_layer) * act_size(e)), rc,
             out);
    UC_CHECK(e->be->ops->upload_f32(e->be, e->lorc_basis, bases, L * per_layer), rc, out);
    e->lorc_log_cond = cond;
    cond = NULL;
    e->lorc_ready = true;
    UC_LOG0(UC_LOG_LEVEL_INFO, "engine: lorc bases of %lld layers in %.0f ms (log cond layer 0 "
            "%.3f, last %.3f)", (long long)L, (uc_time_s() - t0) * 1e3, e->lorc_log_cond[0],
            e->lorc_log_cond[L - 1]);
out:
    uc_st_destroy(st);
    uc_free(w);
    uc_free(bases);
    uc_free(sv);
    uc_free(cond);
    return rc;
}

uc_status eng_lorc_profile(struct uc_engine *e, bool save)
{
    /* (the engine records them in memory at creation; the calibration that writes the file
     * writes them with it) */
    if (!e->lorc_ready || !e->have_prof) {
        return UC_OK;
    }
    struct uc_profile *p = &e->prof;
    bool same = p->has_lorc && p->lorc_ratio == (double)UC_LORC_DEFAULT_RATIO;
    for (int64_t l = 0; same && l < e->cfg->n_layers; l++) {
        same = fabs(p->lorc_log_cond[l] - e->lorc_log_cond[l]) <=
               1e-6 * (1.0 + fabs(e->lorc_log_cond[l]));
    }
    if (same) {
        return UC_OK;
    }
    uc_status rc = uc_profile_set_lorc(p, e->lorc_log_cond, UC_LORC_DEFAULT_RATIO);
    if (rc == UC_OK && save && uc_comm_rank(e->comm) == 0) {
        rc = uc_profile_save(p, e->profile_path);
        if (rc == UC_OK) {
            UC_LOG_NOTICE("engine: lorc sensitivities and ranks recorded in %s", e->profile_path);
        }
    }
    return rc;
}

bool eng_lorc_check(const struct uc_engine *e, const struct uc_compress_params *cp, char *msg,
                    size_t msg_size)
{
    if (!(cp->stages & UC_STAGE_LORC) || e->lorc_ready) {
        return true;
    }
    const char *why = lorc_unsupported(e);
    snprintf(msg, msg_size, "compression.policy: lorc is unavailable on this model (%s)",
             why ? why : "its bases were not computed");
    return false;
}

uc_status eng_lorc_seq_init(struct uc_engine *e, struct seq *s)
{
    float rho = uc_policy_lorc_ratio(&s->cp);
    if (rho <= 0.0f) {
        return UC_OK;
    }
    if (!e->lorc_ready) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "lorc: no bases on this engine");
    }
    s->lorc_rank = uc_malloc((size_t)e->cfg->n_layers * sizeof(int32_t));
    if (!s->lorc_rank) {
        return UC_ERRF(UC_ERR_NOMEM, "lorc ranks");
    }
    uc_lorc_ranks(s->lorc_rank, e->lorc_log_cond, e->cfg->n_layers, e->cfg->head_dim, rho);
    return UC_OK;
}

void eng_lorc_ranks_for(const struct uc_engine *e, const struct uc_compress_params *cp,
                        int32_t *rank)
{
    float rho = uc_policy_lorc_ratio(cp);
    int64_t L = e->cfg->n_layers;
    if (rho <= 0.0f || !e->lorc_ready) {
        for (int64_t l = 0; l < L; l++) {
            rank[l] = 0;
        }
        return;
    }
    uc_lorc_ranks(rank, e->lorc_log_cond, L, e->cfg->head_dim, rho);
}

const void *eng_lorc_basis(const struct uc_engine *e, int64_t layer)
{
    int64_t d = e->cfg->head_dim;
    return (const char *)e->lorc_basis +
           (size_t)(layer * e->sh->n_heads_kv * 2 * d * d) * act_size(e);
}

void eng_lorc_fini(struct uc_engine *e)
{
    if (e->lorc_basis && e->be) {
        e->be->ops->free(e->be, e->lorc_basis);
    }
    e->lorc_basis = NULL;
    UC_FREE(e->lorc_log_cond);
    e->lorc_ready = false;
}
