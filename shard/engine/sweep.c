/* One step as one sweep over the layers (SERVING.md). At each layer, the decode rows of every
 * running sequence and the slices of every prompt that is at that layer go through the same
 * norm, Q/K/V, O and MLP products (one all-reduce each under TP); only attention splits by kind:
 * paged decode attention for the decode rows, causal attention over the prompt's own Q/K/V buffer
 * for each slice. A slice that completes its prompt's layer runs that layer's compression at once
 * (eng_layer_end), and the prompt goes on to the next layer in the same sweep while its row budget
 * lasts: a short prompt passes every layer in one step, a long one a few layers per step. The
 * query spectra those layer ends need (uncomp with prompt grouping) are begun as soon as the
 * pass has written the queries, so the eigensolves run beside its attention and MLP. A
 * calibration window ends its layers in parts instead, one per step (eng_layer_end_part). Where
 * a layer end needs only the layer's K/V rows, window scores and spectra, it is begun when the
 * layer completes and finished after the next pass has been queued (pipeline.c), so the host
 * picks kept tokens while the device runs that pass.
 *
 * Rows are packed in e->dx and e->dqkv (max_batch + prefill_chunk rows): the decode rows first,
 * where they stay for the whole step, then the slices of the pass. A layer whose slices exceed
 * prefill_chunk rows takes further passes without the decode rows. */
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "internal.h"

/* One prompt's rows in a pass: rows [t0, t0 + n) of its layer, at packed row `row`. */
struct slice {
    struct seq *s;
    int32_t pf; /* index into the step's prefills */
    int64_t t0, n, row;
};

/* Runs layer l over packed rows [base, end): the decode rows [0, nb) when base is 0, and the
 * slices; `ends` is room for one sequence per slice. */
static uc_status sweep_pass(struct uc_engine *e, int64_t l, int64_t base, int64_t nb,
                            const struct slice *sl, int64_t n_sl, int64_t end, bool any_evict,
                            struct seq **ends)
{
    struct uc_backend *be = e->be;
    int64_t c = e->cfg->hidden, ld = e->sh->qkv_dim, d = e->cfg->head_dim;
    int64_t hl = e->sh->n_heads, hkv = e->sh->n_heads_kv, n = end - base;
    size_t a = act_size(e);
    uc_status rc;
    if (eng_spectra_unread(e)) {
        /* the pass may overwrite queries the spectra begun earlier have still to read */
        UC_CHECK(be->ops->qspec_fence(be), rc, out);
    }
    /* One prompt's slice alone (no decode rows in the pass) runs on the prompt's own rows: its
     * hidden states and Q/K/V buffer, with nothing packed or copied back. */
    const bool direct = n_sl == 1 && !(base == 0 && nb > 0);
    void *x = direct ? dev_row(e, sl[0].s->x, sl[0].t0, c) : dev_row(e, e->dx, base, c);
    void *qkv = direct ? dev_row(e, sl[0].s->qkv, sl[0].t0, ld) : dev_row(e, e->dqkv, base, ld);
    for (int64_t i = 0; i < n_sl && !direct; i++) {
        UC_CHECK(be->ops->copy_rows(be, dev_row(e, e->dx, sl[i].row, c), c,
                                    dev_row(e, sl[i].s->x, sl[i].t0, c), c, c, sl[i].n),
                 rc, out);
    }
    UC_CHECK(uc_model_attn_norm(e->m, &e->ws, l, x, n), rc, out);
    UC_CHECK(uc_model_qkv_proj(e->m, &e->ws, l, qkv, n), rc, out);
    if (base == 0 && nb > 0) {
        UC_CHECK(eng_decode_attend(e, nb, l, any_evict), rc, out);
    }
    int64_t n_end = 0; /* the prompts that end layer l here and want early query spectra */
    for (int64_t i = 0; i < n_sl; i++) {
        struct seq *s = sl[i].s;
        void *q = dev_row(e, s->qkv, sl[i].t0, ld);
        if (!direct) {
            UC_CHECK(be->ops->copy_rows(be, q, ld, dev_row(e, e->dqkv, sl[i].row, ld), ld, ld,
                                        sl[i].n),
                     rc, out);
        }
        /* q and k heads are adjacent in the fused row: rotate them in one pass */
        UC_CHECK(be->ops->rope(be, q, ld, hl + hkv, d, s->pos + sl[i].t0, sl[i].n), rc, out);
        if (sl[i].t0 + sl[i].n == s->n_rows && eng_spectra_early(s)) {
            ends[n_end++] = s;
        }
    }
    /* their eigensolves run beside this pass's attention and MLP */
    UC_CHECK(eng_spectra_begin(e, ends, n_end), rc, out);
    for (int64_t i = 0; i < n_sl; i++) {
        struct seq *s = sl[i].s;
        const void *q = dev_row(e, s->qkv, sl[i].t0, ld);
        const void *k = (char *)s->qkv + (size_t)(hl * d) * a;
        const void *v = (char *)s->qkv + (size_t)((hl + hkv) * d) * a;
        int64_t ld_kv = ld;
        if (eng_layer_shared(s, l)) {
            /* KVSharer: the source layer's K|V rows, kept since its layer end */
            k = s->src_kv[s->plan.share_src[l]];
            v = (const char *)k + (size_t)(hkv * d) * a;
            ld_kv = 2 * hkv * d;
        }
        UC_CHECK(be->ops->attn_prefill(be, dev_row(e, e->ws.att, sl[i].row - base, hl * d), q, ld,
                                       k, v, ld_kv, sl[i].n, sl[i].t0, hl, hkv, d),
                 rc, out);
    }
    UC_CHECK(uc_model_finish_layer(e->m, &e->ws, l, x, n), rc, out);
    for (int64_t i = 0; i < n_sl && !direct; i++) {
        UC_CHECK(be->ops->copy_rows(be, dev_row(e, sl[i].s->x, sl[i].t0, c), c,
                                    dev_row(e, e->dx, sl[i].row, c), c, c, sl[i].n),
                 rc, out);
    }
out:
    return rc;
}

/* The slices of layer l's next pass: every prompt at layer l with rows left there and budget
 * left, in the step's order, up to prefill_chunk rows in all. Starts the layer of a prompt whose
 * first slice this is. */
static uc_status gather_slices(struct uc_engine *e, const struct uc_step *st, int64_t l,
                               int64_t nb, struct slice *sl, int64_t *n_sl, int64_t *rows)
{
    uc_status rc = UC_OK;
    *n_sl = 0;
    *rows = 0;
    for (int32_t i = 0; i < st->n_prefill && *rows < e->p.prefill_chunk; i++) {
        struct seq *s = e->sw_seq[i];
        if (s->phase != UC_SEQ_PREFILLING || s->layer != l || e->sw_left[i] <= 0) {
            continue;
        }
        if (s->t_done == s->n_rows) { /* a layer end in parts: one part, and no more this step */
            bool finished;
            UC_CHECK(eng_layer_end_part(e, s, &finished), rc, out);
            e->sw_left[i] = 0;
            if (finished) {
                s->layer++;
                s->t_done = 0;
            }
            continue;
        }
        int64_t t = s->n_rows - s->t_done;
        t = t < e->sw_left[i] ? t : e->sw_left[i];
        t = t < e->p.prefill_chunk - *rows ? t : e->p.prefill_chunk - *rows;
        if (!s->x) {
            UC_CHECK(eng_prefill_buffers(e, s), rc, out);
        }
        if (s->t_done == 0) {
            UC_CHECK(eng_layer_start(e, s), rc, out);
        }
        UC_CHECK(eng_layer_rows(e, s, s->t_done, t), rc, out);
        sl[(*n_sl)++] = (struct slice){.s = s, .pf = i, .t0 = s->t_done, .n = t,
                                       .row = nb + *rows};
        *rows += t;
    }
out:
    return rc;
}

uc_status eng_sweep_run(struct uc_engine *e, const struct uc_step *st)
{
    int64_t L = e->cfg->n_layers, nb = st->n_decode, npf = st->n_prefill;
    bool any_evict = false;
    uc_status rc = UC_OK;
    struct slice *sl = NULL;
    struct seq **ends = NULL;
    if (!eng_grow((void **)&e->sw_seq, &e->sw_cap, npf, sizeof *e->sw_seq) ||
        !eng_grow((void **)&e->sw_left, &e->sw_left_cap, npf, sizeof *e->sw_left) ||
        !(sl = uc_malloc((size_t)(npf + 1) * sizeof *sl)) ||
        !(ends = uc_malloc((size_t)(npf + 1) * sizeof *ends))) {
        uc_free(sl);
        return UC_ERRF(UC_ERR_NOMEM, "sweep of %lld prefills", (long long)npf);
    }
    for (int64_t i = 0; i < npf; i++) {
        e->sw_seq[i] = eng_find_seq(e, st->prefills[i].seq_id);
        int64_t b = st->prefills[i].budget_rows;
        e->sw_left[i] = b > 0 ? b : INT64_MAX;
    }
    if (nb > 0) {
        UC_CHECK(eng_decode_begin(e, st->decodes, nb, &any_evict), rc, out);
    }
    for (int64_t l = 0; l < L; l++) {
        for (int64_t pass = 0;; pass++) {
            int64_t n_sl, rows;
            UC_CHECK(gather_slices(e, st, l, nb, sl, &n_sl, &rows), rc, out);
            int64_t base = pass == 0 ? 0 : nb; /* decode rows ride on the first pass only */
            if (n_sl == 0 && (pass > 0 || nb == 0)) {
                break;
            }
            UC_CHECK(sweep_pass(e, l, base, nb, sl, n_sl, nb + rows, any_evict, ends), rc, out);
            /* the ends begun after earlier passes, while the device runs this one */
            UC_CHECK(eng_end_finish_all(e), rc, out);
            for (int64_t i = 0; i < n_sl; i++) {
                struct seq *s = sl[i].s;
                s->t_done += sl[i].n;
                e->sw_left[sl[i].pf] -= sl[i].n;
                if (s->t_done == s->n_rows && !eng_layer_end_in_parts(s)) {
                    if (eng_end_pipelined(e, s, s->layer)) {
                        UC_CHECK(eng_end_begin(e, s), rc, out);
                    } else {
                        UC_CHECK(eng_layer_end(e, s), rc, out);
                    }
                    s->layer++;
                    s->t_done = 0;
                }
            }
            if (n_sl == 0) {
                break;
            }
        }
    }
    UC_CHECK(eng_end_finish_all(e), rc, out);
    if (nb > 0) {
        e->last_nb = 0; /* a mixed step breaks the run of equal decode-only batches */
        UC_CHECK(eng_decode_end(e, st->decodes, nb), rc, out);
    } else {
        int64_t n_end = 0;
        for (int64_t i = 0; i < npf; i++) {
            struct seq *s = e->sw_seq[i];
            if (s->phase == UC_SEQ_PREFILLING && s->layer == L) {
                ends[n_end++] = s;
            }
        }
        UC_CHECK(eng_decode_ahead_of_prefill(e, ends, n_end), rc, out);
    }
    for (int64_t i = 0; i < npf; i++) {
        struct seq *s = e->sw_seq[i];
        if (s->phase == UC_SEQ_PREFILLING && s->layer == L) {
            UC_CHECK(eng_prefill_finish(e, s), rc, out);
        }
    }
out:
    if (rc != UC_OK) {
        eng_end_drop_all(e);
    }
    uc_free(sl);
    uc_free(ends);
    return rc;
}
