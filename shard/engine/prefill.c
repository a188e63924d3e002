/* A prompt's prefill, layer-major: the hidden-state spectrum (when asked) copied at each layer
 * start, accumulated slice by slice and solved at the layer end; at each layer end the
 * compression of UNCOMP.md (entropy, plan, kept tokens into the paged cache, stage pruning of
 * the rows), in parts over several steps for calibration windows; after the last layer the
 * logits. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "internal.h"
#include "compress/entropy.h"
#include "compress/select.h"
#include "compress/think.h"

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

/* ---- prefill: entropy ------------------------------------------------------------------- */

static bool wants_spectra(const struct seq *s)
{
    return (uc_policy_uses_entropy(s->cp.policy) && s->cp.grouping == UC_GROUPING_PROMPT) ||
           (s->flags & (UC_SEQ_SPECTRA | UC_SEQ_CALIBRATE));
}

/* How many of each query head's largest eigenvalues s's layer ends read: the whole spectrum
 * when the sequence keeps it (UC_SEQ_SPECTRA), else the truncations plan_layer takes (the
 * policy's k, and calibration's default k). */
static int64_t spectra_top(const struct uc_engine *e, const struct seq *s)
{
    int64_t d = e->cfg->head_dim;
    if (s->qspec) {
        return d;
    }
    int64_t top = s->cp.entropy_k > 0 ? s->cp.entropy_k : uc_entropy_default_k(d);
    if (s->flags & UC_SEQ_CALIBRATE) {
        int64_t k = uc_entropy_default_k(d);
        top = k > top ? k : top;
    }
    return top < d ? top : d;
}

bool eng_spectra_early(const struct seq *s)
{
    return wants_spectra(s) && !eng_layer_end_in_parts(s); /* those have theirs in parts */
}

/* The query spectra batches in flight, a ring of UC_QSPEC_BATCHES, oldest first: batch k (0:
 * the oldest). The backend hands batches back oldest first, so fetching one fetches those
 * before it. */
static struct qs_batch *qs_at(struct uc_engine *e, int k)
{
    return &e->qsb[(e->qs_first + k) % UC_QSPEC_BATCHES];
}

static uc_status qs_fetch(struct uc_engine *e, int k)
{
    for (int i = 0; i <= k; i++) {
        struct qs_batch *b = qs_at(e, i);
        if (!b->fetched) {
            uc_status rc = e->be->ops->qspec_end(e->be, b->host);
            if (rc != UC_OK) {
                return rc;
            }
            b->fetched = true;
        }
    }
    return UC_OK;
}

/* Retires the oldest batch to make room: the spectra that pending layer ends still need are
 * parked in their sequences (waiting for them if need be); the rest were taken by their layer
 * ends, or an error came on the way. */
static uc_status qs_retire(struct uc_engine *e)
{
    int64_t per = e->sh->n_heads * e->cfg->head_dim;
    struct qs_batch *b = qs_at(e, 0);
    uc_status rc = qs_fetch(e, 0);
    for (int64_t i = 0; rc == UC_OK && i < b->count; i++) {
        struct seq *s = eng_find_seq(e, b->seq[i]);
        if (!s || !s->end_pending || s->end_layer != b->layer[i]) {
            continue;
        }
        if (!s->qspec_local && !(s->qspec_local = uc_malloc((size_t)per * sizeof(double)))) {
            rc = UC_ERRF(UC_ERR_NOMEM, "query spectra");
            break;
        }
        memcpy(s->qspec_local, b->host + i * per, (size_t)per * sizeof(double));
        s->spec_parked = true;
    }
    b->count = 0;
    e->qs_first = (e->qs_first + 1) % UC_QSPEC_BATCHES;
    e->qs_n--;
    return rc;
}

bool eng_spectra_unread(const struct uc_engine *e)
{
    for (int k = 0; k < e->qs_n; k++) {
        if (!e->qsb[(e->qs_first + k) % UC_QSPEC_BATCHES].fetched) {
            return true;
        }
    }
    return false;
}

uc_status eng_spectra_begin(struct uc_engine *e, struct seq *const *seqs, int64_t n)
{
    int64_t hl = e->sh->n_heads, d = e->cfg->head_dim;
    uc_status rc = UC_OK;
    if (n == 0) {
        return UC_OK;
    }
    if (e->qs_n == UC_QSPEC_BATCHES) {
        UC_CHECK(qs_retire(e), rc, out);
    }
    struct qs_batch *b = &e->qsb[(e->qs_first + e->qs_n) % UC_QSPEC_BATCHES];
    const void **q = uc_malloc((size_t)n * sizeof *q);
    int64_t *rows = uc_malloc((size_t)n * sizeof *rows);
    if (!q || !rows || !eng_grow((void **)&b->seq, &b->seq_cap, n, sizeof *b->seq) ||
        !eng_grow((void **)&b->layer, &b->layer_cap, n, sizeof *b->layer) ||
        !eng_grow((void **)&b->host, &b->host_cap, n * hl * d, sizeof *b->host)) {
        rc = UC_ERRF(UC_ERR_NOMEM, "query spectra of %lld prompts", (long long)n);
    } else {
        int64_t top = 0; /* the batch's eigenvalues go as far as any of its sequences reads */
        for (int64_t i = 0; i < n; i++) {
            q[i] = seqs[i]->qkv;
            rows[i] = seqs[i]->n_rows;
            b->seq[i] = seqs[i]->id;
            b->layer[i] = seqs[i]->layer;
            int64_t t = spectra_top(e, seqs[i]);
            top = t > top ? t : top;
        }
        rc = e->be->ops->qspec_begin(e->be, q, rows, n, e->sh->qkv_dim, hl, d, top);
        if (rc == UC_OK) {
            b->count = n;
            b->fetched = false;
            e->qs_n++;
        }
    }
    uc_free(q);
    uc_free(rows);
out:
    return rc;
}

/* Spectra of this rank's query heads at the end of layer l (eigenvalues computed where the
 * queries are: begun early in the sweep pass when they could be; already there when the layer
 * end came in parts or its batch was retired while the end was pending), gathered so every
 * rank holds all H. */
static uc_status query_spectra(struct uc_engine *e, struct seq *s, int64_t l)
{
    int64_t d = e->cfg->head_dim, hl = e->sh->n_heads;
    const double *local = s->end_part > 0 || s->spec_parked ? s->qspec_local : e->spec_local;
    uc_status rc = UC_OK;
    int k = -1; /* the batch holding (s, l), and its row i there */
    int64_t i = -1;
    for (int kb = 0; kb < e->qs_n && k < 0; kb++) {
        const struct qs_batch *b = qs_at(e, kb);
        for (int64_t j = 0; j < b->count; j++) {
            if (b->seq[j] == s->id && b->layer[j] == l) {
                k = kb;
                i = j;
                break;
            }
        }
    }
    if (s->end_part > 0 || s->spec_parked) {
        /* computed a few heads at a time by the earlier parts, or parked */
        s->spec_parked = false;
    } else if (k >= 0) {
        UC_CHECK(qs_fetch(e, k), rc, out);
        memcpy(e->spec_local, qs_at(e, k)->host + i * hl * d, (size_t)(hl * d) * sizeof(double));
    } else {
        UC_CHECK(e->be->ops->qspec(e->be, e->spec_local, s->qkv, e->sh->qkv_dim, s->n_rows, hl,
                                   d, spectra_top(e, s)),
                 rc, out);
    }
    UC_CHECK(uc_comm_allgather(e->comm, local, e->spec, (size_t)(hl * d) * sizeof(double)), rc,
             out);
out:
    return rc;
}

/* The spectrum of the layer's input hidden states is rank 0's work, spread over the layer's
 * slices: the rows are copied and their mean taken at the first slice, each slice adds its rows'
 * share of the covariance before it runs (at most a slice's rows x C^2 per step, beside the
 * slice's own prefill), and the layer end solves and broadcasts it. */
static bool wants_hidden_spectrum(const struct seq *s)
{
    return (s->flags & (UC_SEQ_SPECTRA | UC_SEQ_CALIBRATE)) != 0;
}

uc_status eng_layer_start(struct uc_engine *e, struct seq *s)
{
    int64_t l = s->layer, c = e->cfg->hidden, n = s->n_rows;
    s->layer_rows[l] = s->n_rows;
    if (s->rows_at) {
        s->rows_at[l] = uc_malloc((size_t)s->n_rows * sizeof(int32_t));
        if (!s->rows_at[l]) {
            return UC_ERRF(UC_ERR_NOMEM, "rows record");
        }
        memcpy(s->rows_at[l], s->pos, (size_t)s->n_rows * sizeof(int32_t));
    }
    if (!wants_hidden_spectrum(s) || uc_comm_rank(e->comm) != 0) {
        return UC_OK;
    }
    if (n * c > s->hid_cap) {
        float *h = uc_realloc(s->hid_rows, (size_t)(n * c) * sizeof(float));
        if (!h) {
            return UC_ERRF(UC_ERR_NOMEM, "hidden states rows=%lld", (long long)n);
        }
        s->hid_rows = h;
        s->hid_cap = n * c;
    }
    uc_status rc = e->be->ops->download_f32(e->be, s->hid_rows, s->x, n * c);
    if (rc == UC_OK) {
        rc = uc_entropy_acc_begin(&s->hacc, s->hid_rows, n, c, c);
    }
    return rc;
}

uc_status eng_layer_rows(struct uc_engine *e, struct seq *s, int64_t t0, int64_t n)
{
    if (!wants_hidden_spectrum(s) || uc_comm_rank(e->comm) != 0) {
        return UC_OK;
    }
    return uc_entropy_acc_add(&s->hacc, s->hid_rows, e->cfg->hidden, t0, n);
}

/* At the layer end: rank 0 solves the accumulated spectrum and broadcasts it; every rank adds
 * it to the calibration sums and the sequence's record. */
static uc_status hidden_spectrum(struct uc_engine *e, struct seq *s)
{
    int64_t l = s->layer, c = e->cfg->hidden;
    double *eig = s->hspec ? s->hspec + l * c : NULL;
    double *tmp = NULL;
    if (!eig) {
        tmp = uc_malloc((size_t)c * sizeof(double));
        if (!tmp) {
            return UC_ERRF(UC_ERR_NOMEM, "hidden spectrum");
        }
        eig = tmp;
    }
    uc_status rc = uc_comm_rank(e->comm) == 0 ? uc_entropy_acc_eigvals(&s->hacc, eig) : UC_OK;
    uc_status brc = uc_comm_bcast(e->comm, eig, (size_t)c * sizeof(double), 0);
    rc = rc != UC_OK ? rc : brc;
    if (rc == UC_OK && (s->flags & UC_SEQ_CALIBRATE)) {
        e->cal_hidden[l] += uc_entropy_truncated(eig, c, uc_entropy_default_k(c));
    }
    uc_free(tmp);
    return rc;
}

/* ---- prefill: a calibration window's layer end, in parts -------------------------------- */

/* A calibration window is background work that shares steps with requests, so no step of it
 * may hold a request up for long: its rows come in thin slices (uc_engine_background_rows)
 * and the work at the end of each of its layers is spread over steps too, one part per step:
 * the query spectra of CALIB_END_ROWS x H_local / n_rows heads at a time (at least one head),
 * then the hidden-state eigensolve, then the rest of eng_layer_end. The layer's Q/K/V stay in
 * the prefill buffer until then. */
#define CALIB_END_ROWS 1024

bool eng_layer_end_in_parts(const struct seq *s)
{
    return (s->flags & UC_SEQ_CALIBRATE) != 0;
}

uc_status eng_layer_end_part(struct uc_engine *e, struct seq *s, bool *finished)
{
    int64_t hl = e->sh->n_heads, d = e->cfg->head_dim;
    int64_t per = CALIB_END_ROWS * hl / s->n_rows;
    per = per > 1 ? per : 1;
    int64_t groups = (hl + per - 1) / per;
    uc_status rc = UC_OK;
    *finished = false;
    if (s->end_part < groups) {
        if (!s->qspec_local) {
            s->qspec_local = uc_malloc((size_t)(hl * d) * sizeof(double));
            if (!s->qspec_local) {
                return UC_ERRF(UC_ERR_NOMEM, "query spectra");
            }
        }
        int64_t h0 = s->end_part * per, nh = hl - h0 < per ? hl - h0 : per;
        const void *q = (const char *)s->qkv + (size_t)(h0 * d) * act_size(e);
        rc = e->be->ops->qspec(e->be, s->qspec_local + h0 * d, q, e->sh->qkv_dim, s->n_rows, nh,
                               d, spectra_top(e, s));
    } else if (s->end_part == groups && wants_hidden_spectrum(s)) {
        rc = hidden_spectrum(e, s);
        s->hid_done = true;
    } else {
        rc = eng_layer_end(e, s);
        s->end_part = 0;
        s->hid_done = false;
        *finished = true;
        return rc;
    }
    s->end_part++;
    return rc;
}

/* ---- prefill: layer end ----------------------------------------------------------------- */

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

bool eng_layer_prunes(const struct seq *s, int64_t l, int64_t n_layers, int32_t *stage_index)
{
    int32_t c = 0;
    bool prune = uc_policy_cuts_rows(s->cp.policy) && l + 1 < n_layers &&
                 is_stage_start(s, l + 1, &c) && s->plan.stage_rows[c] < s->n_rows;
    if (stage_index) {
        *stage_index = c;
    }
    return prune;
}

bool eng_row_score_max(const struct seq *s)
{
    return s->cp.row_score == UC_ROW_SCORE_MAX || s->cp.row_score == UC_ROW_SCORE_ACCUM_MAX;
}

bool eng_layer_accumulates(const struct seq *s, int64_t l, int64_t n_layers)
{
    return uc_policy_cuts_rows(s->cp.policy) && s->plan.n_stage_starts > 0 &&
           (s->cp.row_score == UC_ROW_SCORE_ACCUM || s->cp.row_score == UC_ROW_SCORE_ACCUM_MAX) &&
           l + 1 < n_layers && l + 1 <= s->plan.stage_starts[s->plan.n_stage_starts - 1];
}

/* Entropies of every query head (gathered), their KV-head means, and the plan of this layer. */
static uc_status plan_layer(struct uc_engine *e, struct seq *s, int64_t l, double *kv_ent)
{
    int64_t d = e->cfg->head_dim, H = e->cfg->n_heads, hkv = e->cfg->n_heads_kv;
    int64_t g = H / hkv;
    bool from_prompt = uc_policy_uses_entropy(s->cp.policy) && s->cp.grouping == UC_GROUPING_PROMPT;
    uc_status rc = UC_OK;
    if (wants_spectra(s)) {
        UC_CHECK(query_spectra(e, s, l), rc, out);
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

/* The kept rows of local KV head j: its row of e->keep. */
static int32_t *head_keep(struct uc_engine *e, struct seq *s, int64_t j)
{
    return e->keep + j * s->n_rows;
}

/* Kept tokens of local KV head j from the scores (UNCOMP.md sections 5 and 8), into its row of
 * e->keep with its own scratch, so the heads can be selected in parallel. */
static int64_t select_head(struct uc_engine *e, struct seq *s, int64_t j, int64_t budget)
{
    int64_t n = s->n_rows;
    const double *score = e->colscore + j * n;
    int32_t *keep = head_keep(e, s, j);
    void *scratch = (char *)e->sel_scratch + (size_t)j * uc_select_scratch_bytes(n);
    switch (s->cp.policy) {
    case UC_POLICY_FULL: return uc_select_streaming(keep, n, n, 0);
    case UC_POLICY_STREAMINGLLM: return uc_select_streaming(keep, n, budget, s->cp.sink_tokens);
    case UC_POLICY_H2O: return uc_select_h2o(keep, score, n, budget, scratch);
    default:
        return uc_select_snapkv(keep, score, n, budget, s->cp.window, s->cp.pool_kernel, scratch);
    }
}

/* Fills e->colscore (Hkv_local, n) with the scores the policy selects by, and e->rowscore (n)
 * with the stage row scores when `rows` is set; from the staging slot where src has them
 * begun. */
static uc_status compute_scores(struct uc_engine *e, struct seq *s, bool cols, bool rows,
                                const struct eng_end_src *src)
{
    int64_t n = s->n_rows, hl = e->sh->n_heads, hkv_l = e->sh->n_heads_kv;
    int64_t d = e->cfg->head_dim, gl = hl / hkv_l, ld = e->sh->qkv_dim;
    const void *k = (char *)s->qkv + (size_t)(hl * d) * act_size(e);
    uc_status rc = UC_OK;
    if (uc_policy_scores(s->cp.policy) == UC_SCORES_COLSUM && cols) {
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
    bool use_max = eng_row_score_max(s);
    if (src->slot >= 0) {
        UC_CHECK(e->be->ops->window_scores_end(e->be, src->slot, e->colscore,
                                               rows ? e->rowscore : NULL),
                 rc, out);
    } else if (!s->rings) {
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
    bool have_probs = uc_policy_uses_window(s->cp.policy);
    for (int64_t r = 0; r < w && have_probs; r++) {
        for (int64_t i = 0; i < n_keep; i++) {
            float v = 0;
            for (int64_t q = 0; q < gl; q++) {
                v += e->wprob[((j * gl + q) * w + r) * n + head_keep(e, s, j)[i]];
            }
            rg->rows[r * cap + i] = v;
        }
    }
    return UC_OK;
}

/* ThinK, before the kept tokens go into the cache: the query part of every local KV head's
 * channel scores (hkv_l, D) from the window's last rows; ranks that share a replicated KV head
 * hold some of its query heads each, so their parts are summed. */
static uc_status think_query_parts(struct uc_engine *e, struct seq *s, double *qpart)
{
    int64_t n = s->n_rows, hl = e->sh->n_heads, hkv_l = e->sh->n_heads_kv;
    int64_t hkv = e->cfg->n_heads_kv, d = e->cfg->head_dim, gl = hl / hkv_l;
    int64_t w = s->cp.window < n ? s->cp.window : n;
    uc_status rc = UC_OK;
    double *qsq = uc_malloc((size_t)(hl * d) * sizeof(double));
    int32_t *rows = uc_malloc((size_t)w * sizeof(int32_t));
    double *all = e->sh->kv_replicated ? uc_calloc((size_t)(hkv * d), sizeof(double)) : NULL;
    if (!qsq || !rows || (e->sh->kv_replicated && !all)) {
        rc = UC_ERRF(UC_ERR_NOMEM, "think query norms heads=%lld", (long long)hl);
        goto out;
    }
    for (int64_t r = 0; r < w; r++) {
        rows[r] = (int32_t)(n - w + r);
    }
    UC_CHECK(e->be->ops->chan_sumsq(e->be, qsq, s->qkv, e->sh->qkv_dim, rows, w, hl * d), rc,
             out);
    for (int64_t j = 0; j < hkv_l; j++) {
        uc_think_query_part(qpart + j * d, qsq + j * gl * d, gl, d);
    }
    if (all) {
        memcpy(all + e->sh->kv0 * d, qpart, (size_t)d * sizeof(double));
        UC_CHECK(uc_comm_allreduce_sum(e->comm, all, hkv * d, UC_COMM_F64), rc, out);
        memcpy(qpart, all + e->sh->kv0 * d, (size_t)d * sizeof(double));
    }
out:
    uc_free(qsq);
    uc_free(rows);
    uc_free(all);
    return rc;
}

/* ThinK for local KV head j keeping the first nk rows of its keep row: its kept channels. */
static uc_status think_head(struct uc_engine *e, struct seq *s, int64_t j, int64_t nk,
                            const double *qpart, int32_t *chan, int64_t kdim)
{
    int64_t d = e->cfg->head_dim, hl = e->sh->n_heads;
    double ksq[1024];
    const void *k = (char *)s->qkv + (size_t)((hl + j) * d) * act_size(e);
    uc_status rc = e->be->ops->chan_sumsq(e->be, ksq, k, e->sh->qkv_dim, head_keep(e, s, j), nk,
                                          d);
    if (rc == UC_OK) {
        uc_think_select(chan, qpart + j * d, ksq, d, kdim);
    }
    return rc;
}

uc_status eng_layer_end(struct uc_engine *e, struct seq *s)
{
    uc_status rc = eng_end_finish(e, s); /* its earlier layer's pending end, first */
    if (rc == UC_OK) {
        struct eng_end_src src = eng_end_src_qkv(e, s);
        rc = eng_layer_end_from(e, s, s->layer, &src);
    }
    return rc;
}

struct eng_end_src eng_end_src_qkv(const struct uc_engine *e, const struct seq *s)
{
    int64_t hl = e->sh->n_heads, hkv_l = e->sh->n_heads_kv, d = e->cfg->head_dim;
    return (struct eng_end_src){
        .k = (const char *)s->qkv + (size_t)(hl * d) * act_size(e),
        .v = (const char *)s->qkv + (size_t)((hl + hkv_l) * d) * act_size(e),
        .ld = e->sh->qkv_dim,
        .slot = -1};
}

uc_status eng_layer_end_from(struct uc_engine *e, struct seq *s, int64_t l,
                             const struct eng_end_src *src)
{
    double t0 = uc_time_s();
    int64_t n = s->n_rows, hkv_l = e->sh->n_heads_kv, hkv = e->cfg->n_heads_kv;
    int64_t d = e->cfg->head_dim;
    uc_status rc;
    double kv_ent[1024];
    double *qpart = NULL; /* ThinK's query parts (hkv_l, D) */
    int32_t *lpos = NULL; /* LoRC: the scattered rows' positions */
    if (wants_hidden_spectrum(s) && !s->hid_done) {
        UC_CHECK(hidden_spectrum(e, s), rc, out);
    }
    UC_CHECK(eng_layer_scratch(e, n, s->cp.window), rc, out);
    UC_CHECK(plan_layer(e, s, l, kv_ent), rc, out);
    UC_CHECK(eng_kvshare_layer_end(e, s), rc, out);
    if (eng_layer_shared(s, l)) {
        /* KVSharer: the layer keeps nothing; its attention reads its source layer's cache */
        for (int64_t j = 0; s->kept && j < hkv_l; j++) {
            s->kept[l * hkv_l + j] = uc_malloc(sizeof(int32_t));
            if (!s->kept[l * hkv_l + j]) {
                rc = UC_ERRF(UC_ERR_NOMEM, "kept record");
                goto out;
            }
            s->n_kept[l * hkv_l + j] = 0;
        }
        goto out;
    }
    int32_t stage_c = 0;
    bool prune = eng_layer_prunes(s, l, e->cfg->n_layers, &stage_c);
    bool any_cut = false;
    for (int64_t j = 0; j < hkv_l; j++) {
        any_cut = any_cut || s->plan.budget[l * hkv + e->sh->kv0 + j] < n;
    }
    bool cols = any_cut && uc_policy_scores(s->cp.policy) != UC_SCORES_NONE;
    bool evict = s->rings != NULL;
    bool accum = eng_layer_accumulates(s, l, e->cfg->n_layers);
    bool rows = prune || accum;
    if (cols || rows || (evict && uc_policy_uses_window(s->cp.policy))) {
        UC_CHECK(compute_scores(e, s, cols || evict, rows, src), rc, out);
    } else if (src->slot >= 0) { /* begun, and no head is cut after all */
        UC_CHECK(e->be->ops->window_scores_end(e->be, src->slot, e->colscore, NULL), rc, out);
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
    /* kept tokens of each local KV head (selected in parallel: at 32K tokens one head takes
     * about a millisecond), then into the paged cache with one scatter; with ThinK their kept
     * key channels only (packed heads, a scatter each) */
    float think = uc_policy_think_ratio(&s->cp);
    int64_t kdim = think > 0.0f ? uc_think_kdim(think, d) : d;
    int32_t chan[1024];
    if (kdim < d && d > 1024) {
        rc = UC_ERRF(UC_ERR_UNSUPPORTED, "think: head_dim=%lld above 1024", (long long)d);
        goto out;
    }
    if (kdim < d) {
        qpart = uc_malloc((size_t)(hkv_l * d) * sizeof(double));
        if (!qpart) {
            rc = UC_ERRF(UC_ERR_NOMEM, "think scores");
            goto out;
        }
        UC_CHECK(think_query_parts(e, s, qpart), rc, out);
    }
    const void *kbase = src->k, *vbase = src->v;
    int64_t nks[1024], n_sc = 0;
    int64_t lrank = s->lorc_rank ? s->lorc_rank[l] : 0;
#pragma omp parallel for schedule(dynamic, 1) if (n >= 4096 && hkv_l > 1)
    for (int64_t j = 0; j < hkv_l; j++) {
        nks[j] = select_head(e, s, j, s->plan.budget[l * hkv + e->sh->kv0 + j]);
    }
    /* MiniCache: the calibration's distances to the previous layer; the second layer of a pair
     * merges the tokens both keep and scatters the rest */
    UC_CHECK(eng_mc_stats_layer_end(e, s, kbase, vbase), rc, out);
    UC_CHECK(eng_mc_layer_end(e, s, e->keep, n, nks, kbase, vbase), rc, out);
    for (int64_t j = 0; j < hkv_l; j++) {
        n_sc += nks[j];
    }
    UC_CHECK(ensure_scatter(e, n_sc), rc, out);
    n_sc = 0;
    for (int64_t j = 0; j < hkv_l; j++) {
        int64_t budget = s->plan.budget[l * hkv + e->sh->kv0 + j];
        int64_t nk = nks[j];
        const int32_t *keep = head_keep(e, s, j);
        struct uc_kv_head *h = uc_kv_seq_head(&s->kv, l, j);
        if (qpart) {
            UC_CHECK(think_head(e, s, j, nk, qpart, chan, kdim), rc, out);
            UC_CHECK(uc_kv_head_set_packed(&e->kv, h, kdim, chan), rc, out);
        }
        if (lrank > 0) {
            UC_CHECK(uc_kv_head_set_latent(&e->kv, h, lrank), rc, out);
        }
        rc = uc_kv_head_reserve(&e->kv, h, nk);
        if (rc == UC_ERR_KV_FULL) {
            UC_FATAL("kv pool exhausted during prefill seq=%lld layer=%lld (admission must "
                     "reserve blocks)", (long long)s->id, (long long)l);
        }
        if (rc != UC_OK) {
            goto out;
        }
        for (int64_t i = 0; i < nk; i++) {
            e->sc_row[n_sc + i] = keep[i];
            e->sc_head[n_sc + i] = (int32_t)j;
            e->sc_slot[n_sc + i] = uc_kv_head_slot(&e->kv, h, i);
        }
        if (qpart) {
            UC_CHECK(e->be->ops->kv_scatter_packed(e->be, &e->kv.pool, kbase, vbase,
                                                   src->ld, e->sc_row + n_sc,
                                                   e->sc_head + n_sc, e->sc_slot + n_sc, nk, kdim,
                                                   h->chan),
                     rc, out);
        }
        n_sc += nk;
        if (s->kept) {
            int32_t *kp = uc_malloc((size_t)(nk > 0 ? nk : 1) * sizeof(int32_t));
            if (!kp) {
                rc = UC_ERRF(UC_ERR_NOMEM, "kept record");
                goto out;
            }
            for (int64_t i = 0; i < nk; i++) {
                kp[i] = s->pos[keep[i]];
            }
            s->kept[l * hkv_l + j] = kp;
            s->n_kept[l * hkv_l + j] = nk;
        }
        if (evict) {
            UC_CHECK(ring_init(e, s, j, nk, budget), rc, out);
        }
    }
    if (lrank > 0) {
        /* LoRC: the kept rows' latents, each row's key rotated back from its position first */
        lpos = uc_malloc((size_t)(n_sc > 0 ? n_sc : 1) * sizeof(int32_t));
        if (!lpos) {
            rc = UC_ERRF(UC_ERR_NOMEM, "lorc positions");
            goto out;
        }
        for (int64_t i = 0; i < n_sc; i++) {
            lpos[i] = s->pos[e->sc_row[i]];
        }
        UC_CHECK(e->be->ops->kv_scatter_latent(e->be, &e->kv.pool, kbase, vbase, src->ld,
                                               e->sc_row, e->sc_head, lpos, e->sc_slot, n_sc,
                                               lrank, eng_lorc_basis(e, l)),
                 rc, out);
    } else if (!qpart) {
        UC_CHECK(e->be->ops->kv_scatter(e->be, &e->kv.pool, kbase, vbase, src->ld, e->sc_row,
                                        e->sc_head, e->sc_slot, n_sc),
                 rc, out);
    }
    for (int64_t j = 0; j < hkv_l; j++) {
        uc_kv_seq_head(&s->kv, l, j)->n_tokens = (int32_t)nks[j];
    }
    if (prune) {
        int64_t keep_n = s->plan.stage_rows[stage_c];
        int64_t nr = uc_select_rows(e->keep, accum ? s->row_acc : e->rowscore, n, keep_n,
                                    s->cp.window, e->sel_scratch);
        void *nx = NULL;
        UC_CHECK(eng_pf_alloc(e, s, &nx, nr * e->cfg->hidden * (int64_t)act_size(e)), rc, out);
        rc = e->be->ops->gather_rows(e->be, nx, s->x, e->keep, nr, e->cfg->hidden);
        if (rc != UC_OK) {
            eng_pf_free(e, s, &nx);
            goto out;
        }
        eng_pf_free(e, s, &s->x);
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
    uc_free(qpart);
    uc_free(lpos);
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
    /* with MiniCache's pairs, which the plan does not hold */
    uint64_t sum = uc_plan_checksum(&s->plan);
    if (s->mc_n_pairs > 0) {
        sum = uc_fnv1a(sum, s->mc_partner, (size_t)L * sizeof *s->mc_partner);
    }
    uc_status rc = uc_comm_agree_u64(e->comm, sum, "plan checksum", &same);
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
uc_status eng_prefill_finish(struct uc_engine *e, struct seq *s)
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
    if ((s->flags & UC_SEQ_HIDDEN) && uc_comm_rank(e->comm) == 0) {
        s->hidden = uc_malloc((size_t)(s->n_rows * c) * sizeof(float));
        if (!s->hidden) {
            rc = UC_ERRF(UC_ERR_NOMEM, "hidden states rows=%lld", (long long)s->n_rows);
            goto out;
        }
        UC_CHECK(e->be->ops->download_f32(e->be, s->hidden, s->x, s->n_rows * c), rc, out);
        s->hidden_rows = s->n_rows;
    }
    if (s->flags & UC_SEQ_KVSHARE_STATS) {
        e->ks_windows++;
    }
    eng_free_prefill_buffers(e, s);
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
