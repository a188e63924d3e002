/* Layer ends finished after the next pass (what a layer end computes is prefill.c's).
 *
 * A layer end waits for the device: for the window scores its kept tokens are chosen by, and
 * with uncomp's prompt grouping for the query spectra; then the host picks the kept tokens,
 * and the device would idle meanwhile. Where the end needs nothing of the layer but its K/V
 * rows, those scores and the spectra, the sweep only begins it when the layer completes: the
 * scores are queued into a staging slot (their copy to the host behind them) and the K|V rows
 * copied aside, so the next pass may overwrite the prompt's Q/K/V buffer (the spectra, begun
 * on their own stream, are fenced and parked: prefill.c). The end is finished once the next
 * pass is queued, while the device runs it. Between the two halves nothing else of the prompt
 * changes: an end that cuts its rows (uncomp-stage) or keeps more than K/V (ThinK, LoRC,
 * MiniCache, KVSharer, evict rings, calibration) runs whole; a prompt's ends finish in the
 * order begun, before any later end of it; and no pending end outlives the sweep. Every rank
 * takes the same path, so the collectives of the ends come in the same order. */
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/util.h"
#include "internal.h"

bool eng_end_pipelined(const struct uc_engine *e, const struct seq *s, int64_t l)
{
    const int32_t whole = UC_SEQ_SPECTRA | UC_SEQ_CALIBRATE | UC_SEQ_KVSHARE_STATS |
                          UC_SEQ_MC_STATS;
    return e->pipe_ends && uc_policy_uses_window(s->cp.policy) && s->n_rows > s->cp.window &&
           !s->rings && !(s->flags & whole) && uc_policy_think_ratio(&s->cp) <= 0.0f &&
           !s->lorc_rank && s->mc_n_pairs == 0 && !s->src_kv && !eng_layer_shared(s, l) &&
           !eng_layer_prunes(s, l, e->cfg->n_layers, NULL) && !eng_layer_end_in_parts(s);
}

uc_status eng_end_begin(struct uc_engine *e, struct seq *s)
{
    double t0 = uc_time_s();
    int64_t l = s->layer, n = s->n_rows, hl = e->sh->n_heads, hkv_l = e->sh->n_heads_kv;
    int64_t d = e->cfg->head_dim, ld = e->sh->qkv_dim, w = s->cp.window, kvw = 2 * hkv_l * d;
    const void *k = eng_end_src_qkv(e, s).k;
    uc_status rc;
    if (s->end_pending) {
        return UC_ERRF(UC_ERR_INTERNAL, "seq=%lld: layer %lld's end is still pending",
                       (long long)s->id, (long long)s->end_layer);
    }
    if (!eng_grow((void **)&e->pend, &e->pend_cap, e->n_pend + 1, sizeof *e->pend)) {
        return UC_ERRF(UC_ERR_NOMEM, "pending layer ends=%lld", (long long)e->n_pend + 1);
    }
    if (!s->end_kv) {
        UC_CHECK(eng_pf_alloc(e, s, &s->end_kv, s->n_prompt * kvw * (int64_t)act_size(e)), rc,
                 out);
    }
    int32_t slot = (int32_t)e->n_pend;
    UC_CHECK(e->be->ops->window_scores_begin(e->be, slot,
                                             eng_layer_accumulates(s, l, e->cfg->n_layers),
                                             eng_row_score_max(s), dev_row(e, s->qkv, n - w, ld),
                                             ld, k, ld, w, n, hl, hkv_l, d),
             rc, out);
    UC_CHECK(e->be->ops->copy_rows(e->be, s->end_kv, kvw, k, ld, kvw, n), rc, out);
    s->end_pending = true;
    s->end_slot = slot;
    s->end_layer = l;
    e->pend[e->n_pend++] = s;
out:
    s->compress_ms += (uc_time_s() - t0) * 1e3;
    return rc;
}

uc_status eng_end_finish(struct uc_engine *e, struct seq *s)
{
    if (!s->end_pending) {
        return UC_OK;
    }
    int64_t kv = e->sh->n_heads_kv * e->cfg->head_dim;
    struct eng_end_src src = {.k = s->end_kv,
                              .v = (const char *)s->end_kv + (size_t)kv * act_size(e),
                              .ld = 2 * kv,
                              .slot = s->end_slot};
    s->end_pending = false;
    e->n_pipelined++;
    return eng_layer_end_from(e, s, s->end_layer, &src);
}

int64_t uc_engine_pipelined_ends(const struct uc_engine *e) { return e->n_pipelined; }

uc_status eng_end_finish_all(struct uc_engine *e)
{
    uc_status rc = UC_OK;
    for (int64_t i = 0; i < e->n_pend && rc == UC_OK; i++) {
        rc = eng_end_finish(e, e->pend[i]);
    }
    if (rc == UC_OK) {
        e->n_pend = 0;
    } /* else the sweep's error path drops the rest */
    return rc;
}

void eng_end_drop_all(struct uc_engine *e)
{
    for (int64_t i = 0; i < e->n_pend; i++) {
        e->pend[i]->end_pending = false;
        e->pend[i]->spec_parked = false;
    }
    e->n_pend = 0;
}
