/* The decoding sequences' block tables in backend memory (kv_table.h). */
#include "kv_table.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"

void uc_kv_table_init(struct uc_kv_table *t, struct uc_backend *be)
{
    memset(t, 0, sizeof *t);
    t->be = be;
    t->epoch = 1;
    t->merge_gap = UC_KV_TABLE_MERGE_GAP;
    t->par_min = UC_KV_TABLE_PAR_MIN;
    t->par_min_heads = UC_KV_TABLE_PAR_MIN_HEADS;
}

void uc_kv_table_fini(struct uc_kv_table *t)
{
    if (t->dev) {
        t->be->ops->free(t->be, t->dev);
    }
    uc_free(t->host);
    uc_free(t->span);
    uc_free(t->sc);
    memset(t, 0, sizeof *t);
}

void uc_kv_table_region_fini(struct uc_kv_table_region *r)
{
    UC_FREE(r->heads);
    memset(r, 0, sizeof *r);
}

static bool head_skipped(const struct uc_kv_table_seq *s, int64_t i)
{
    int64_t l = i / s->kv->n_heads_kv;
    return s->share_src && l < s->n_share && s->share_src[l] != l;
}

/* Room for a head of n blocks: a quarter more, and at least 8 (128 tokens at 16 a block). */
static int64_t room_for(int64_t n_blocks) { return n_blocks + n_blocks / 4 + 8; }

/* Ints a fresh region of s takes. */
static int64_t region_size(const struct uc_kv_table_seq *s)
{
    int64_t n = 0;
    for (int64_t i = 0; i < s->kv->n_layers * s->kv->n_heads_kv; i++) {
        const struct uc_kv_head *h = &s->kv->heads[i];
        n += head_skipped(s, i) ? 0 : room_for(h->n_blocks) + h->kdim;
    }
    return n;
}

/* Writes s's whole region into the mirror from `at` on (region_size(s) ints). Sequences write
 * their regions in parallel, each its own part of the mirror. */
static uc_status region_write(struct uc_kv_table *t, const struct uc_kv_table_seq *s, int64_t at)
{
    struct uc_kv_table_region *r = s->r;
    int64_t nh = s->kv->n_layers * s->kv->n_heads_kv;
    if (r->n_heads != nh) {
        struct uc_kv_table_head *h = uc_realloc(r->heads, (size_t)nh * sizeof *h);
        if (!h) {
            return UC_ERRF(UC_ERR_NOMEM, "kv table region heads=%lld", (long long)nh);
        }
        r->heads = h;
        r->n_heads = nh;
    }
    for (int64_t i = 0; i < nh; i++) {
        const struct uc_kv_head *h = &s->kv->heads[i];
        struct uc_kv_table_head *a = &r->heads[i];
        if (head_skipped(s, i)) {
            memset(a, 0, sizeof *a);
            continue;
        }
        a->off = (int32_t)at;
        a->cap = (int32_t)room_for(h->n_blocks);
        a->n_up = h->n_blocks;
        a->rewrites = h->rewrites;
        if (h->n_blocks > 0) { /* a head may hold none (an empty MiniCache merged head) */
            memcpy(t->host + a->off, h->blocks, (size_t)h->n_blocks * sizeof(int32_t));
        }
        if (h->kdim > 0) {
            memcpy(t->host + a->off + a->cap, h->chan, (size_t)h->kdim * sizeof(int32_t));
        }
        at += a->cap + h->kdim;
    }
    r->epoch = t->epoch;
    return UC_OK;
}

/* Adds [lo, hi) to the sync's spans, joined to the last one when it starts where that one
 * ends. Spans a gap apart stay apart: upload_spans merges them for copies, but counts only
 * what was written when it weighs a scatter (joining them here made a batch crossing a block
 * boundary look like a whole-arena write, and upload 21 MB where 64 KB had changed). */
static bool span_add(struct uc_kv_table *t, int64_t *n, int64_t lo, int64_t hi)
{
    if (*n > 0 && lo == t->span[2 * *n - 1]) {
        t->span[2 * *n - 1] = hi;
        return true;
    }
    if (*n == t->span_cap) {
        int64_t cap = t->span_cap ? 2 * t->span_cap : 256;
        int64_t *sp = uc_realloc(t->span, (size_t)(2 * cap) * sizeof *sp);
        if (!sp) {
            return false;
        }
        t->span = sp;
        t->span_cap = cap;
    }
    t->span[2 * *n] = lo;
    t->span[2 * *n + 1] = hi;
    (*n)++;
    return true;
}

/* Whether s's region was laid out in this arena for its heads as they are now counted. */
static bool region_current(const struct uc_kv_table *t, const struct uc_kv_table_seq *s)
{
    return s->r->epoch == t->epoch && s->r->n_heads == s->kv->n_layers * s->kv->n_heads_kv;
}

/* Whether the arena holds head h as it is (or h reads another layer's cache: 0 == 0). */
static bool head_unchanged(const struct uc_kv_head *h, const struct uc_kv_table_head *a)
{
    return h->n_blocks == a->n_up && h->rewrites == a->rewrites;
}

/* Whether s's region is current and none of its heads changed since the last sync: then a
 * sync has nothing of it to write (region_append would find nothing), which is most
 * sequences at most steps. Reads only; sequences are looked over in parallel. */
static bool region_unchanged(const struct uc_kv_table *t, const struct uc_kv_table_seq *s)
{
    if (!region_current(t, s)) {
        return false;
    }
    for (int64_t i = 0; i < s->r->n_heads; i++) {
        if (!head_unchanged(&s->kv->heads[i], &s->r->heads[i])) {
            return false;
        }
    }
    return true;
}

/* When s's region holds its heads up to appended ids: writes those ids into the mirror, adds
 * their spans and returns true. Otherwise (the region must be written whole) returns false with
 * the spans it added taken back. *rc is set on failure (spans out of memory). */
static bool region_append(struct uc_kv_table *t, const struct uc_kv_table_seq *s, int64_t *n_span,
                          uc_status *rc)
{
    struct uc_kv_table_region *r = s->r;
    int64_t n0 = *n_span;
    if (!region_current(t, s)) {
        return false;
    }
    for (int64_t i = 0; i < r->n_heads; i++) {
        const struct uc_kv_head *h = &s->kv->heads[i];
        struct uc_kv_table_head *a = &r->heads[i];
        if (head_unchanged(h, a)) {
            continue;
        }
        if (head_skipped(s, i)) {
            continue;
        }
        if (h->rewrites != a->rewrites || h->n_blocks > a->cap || h->n_blocks < a->n_up) {
            *n_span = n0; /* the ids written stay in the old region, which is left behind */
            return false;
        }
        if (h->n_blocks > a->n_up) {
            memcpy(t->host + a->off + a->n_up, h->blocks + a->n_up,
                   (size_t)(h->n_blocks - a->n_up) * sizeof(int32_t));
        }
        if (!span_add(t, n_span, a->off + a->n_up, a->off + h->n_blocks)) {
            *rc = UC_ERRF(UC_ERR_NOMEM, "kv table spans");
            return false;
        }
        a->n_up = h->n_blocks;
    }
    return true;
}

/* Room for cap ints in both copies (their contents are dropped: a compaction rewrites them). */
static uc_status arena_grow(struct uc_kv_table *t, int64_t cap)
{
    if (t->dev) {
        t->be->ops->free(t->be, t->dev);
        t->dev = NULL;
    }
    t->cap = 0;
    int32_t *h = uc_realloc(t->host, (size_t)cap * sizeof *h);
    if (!h) {
        return UC_ERRF(UC_ERR_NOMEM, "kv table arena ints=%lld", (long long)cap);
    }
    t->host = h;
    uc_status rc = t->be->ops->alloc(t->be, &t->dev, (size_t)cap * sizeof(int32_t));
    if (rc != UC_OK) {
        return rc;
    }
    t->cap = cap;
    return UC_OK;
}

static int cmp_span(const void *a, const void *b)
{
    int64_t x = ((const int64_t *)a)[0], y = ((const int64_t *)b)[0];
    return x < y ? -1 : x > y;
}

/* The n spans of t->span (sorted) as (position, value) pairs for the backend to scatter. */
static uc_status scatter_spans(struct uc_kv_table *t, int64_t n, int64_t written)
{
    if (written > t->sc_cap) {
        int32_t *sc = uc_realloc(t->sc, (size_t)(2 * written) * sizeof *sc);
        if (!sc) {
            return UC_ERRF(UC_ERR_NOMEM, "kv table scatter of %lld ints", (long long)written);
        }
        t->sc = sc;
        t->sc_cap = written;
    }
    int32_t *pos = t->sc, *val = t->sc + written;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t p = t->span[2 * i]; p < t->span[2 * i + 1]; p++, k++) {
            pos[k] = (int32_t)p;
            val[k] = t->host[p];
        }
    }
    t->ints_uploaded += 2 * written;
    t->n_uploads++;
    return t->be->ops->scatter_ints(t->be, t->dev, pos, val, written);
}

/* The merged span starting at span *i: [*lo, *hi) covers every span that begins within
 * merge_gap of the one before; *i moves past them and *written adds their lengths. */
static void merged_span(const struct uc_kv_table *t, int64_t n, int64_t *i, int64_t *lo,
                        int64_t *hi, int64_t *written)
{
    *lo = t->span[2 * *i];
    *hi = t->span[2 * *i + 1];
    *written += *hi - *lo;
    for ((*i)++; *i < n && t->span[2 * *i] <= *hi + t->merge_gap; (*i)++) {
        *written += t->span[2 * *i + 1] - t->span[2 * *i];
        *hi = t->span[2 * *i + 1] > *hi ? t->span[2 * *i + 1] : *hi;
    }
}

/* Uploads the n spans in t->span: nearby ones merged into one copy each, or all as one scatter
 * of (position, value) pairs where that moves fewer ints (counting a copy, or the scatter's
 * upload and kernel, as merge_gap ints each). */
static uc_status upload_spans(struct uc_kv_table *t, int64_t n)
{
    bool sorted = true; /* the usual case: regions and their heads are laid out in order */
    for (int64_t i = 1; i < n && sorted; i++) {
        sorted = t->span[2 * i] >= t->span[2 * i - 1];
    }
    if (!sorted) {
        qsort(t->span, (size_t)n, 2 * sizeof(int64_t), cmp_span);
    }
    int64_t written = 0, merged = 0, copies = 0, lo, hi;
    for (int64_t i = 0; i < n; copies++) {
        merged_span(t, n, &i, &lo, &hi, &written);
        merged += hi - lo;
    }
    if (t->be->ops->scatter_ints && written > 0 && written <= INT32_MAX &&
        2 * written + 2 * t->merge_gap < merged + copies * t->merge_gap) {
        return scatter_spans(t, n, written);
    }
    for (int64_t i = 0, ignored = 0; i < n;) {
        merged_span(t, n, &i, &lo, &hi, &ignored);
        uc_status rc = t->be->ops->upload(t->be, (int32_t *)t->dev + lo, t->host + lo,
                                          (size_t)(hi - lo) * sizeof(int32_t));
        if (rc != UC_OK) {
            return rc;
        }
        t->ints_uploaded += hi - lo;
        t->n_uploads++;
    }
    return UC_OK;
}

/* What a sync does with one of its sequences. */
struct sync_seq {
    bool same;    /* nothing of it changed since the last sync (region_unchanged) */
    bool whole;   /* its region is written whole (else its appended ids were) */
    int64_t at;   /* where, when whole */
    int64_t size; /* region_size, when whole */
    uc_status rc;
};

uc_status uc_kv_table_sync(struct uc_kv_table *t, const struct uc_kv_table_seq *seqs, int64_t n)
{
    t->n_syncs++;
    struct sync_seq *q = uc_calloc((size_t)(n > 0 ? n : 1), sizeof *q);
    if (!q) {
        return UC_ERRF(UC_ERR_NOMEM, "kv table sync of %lld", (long long)n);
    }
    /* appended ids where a region is current; the size of what must be written whole. At
     * batch 256 the batch has 65,536 heads and at most steps none changed: they are looked
     * over in parallel first, and only the sequences that changed are gone through in order */
    int64_t heads = 0;
    for (int64_t i = 0; i < n; i++) {
        heads += seqs[i].kv->n_layers * seqs[i].kv->n_heads_kv;
    }
#pragma omp parallel for schedule(static) if (heads >= t->par_min_heads)
    for (int64_t i = 0; i < n; i++) {
        q[i].same = region_unchanged(t, &seqs[i]);
    }
    uc_status rc = UC_OK;
    int64_t n_span = 0, fresh = 0;
    for (int64_t i = 0; i < n && rc == UC_OK; i++) {
        if (q[i].same) {
            continue; /* whole false, size 0: nothing to write */
        }
        q[i].whole = !region_append(t, &seqs[i], &n_span, &rc);
        q[i].size = q[i].whole ? region_size(&seqs[i]) : 0;
        fresh += q[i].size;
    }
    if (rc != UC_OK) {
        goto out;
    }
    if (t->used + fresh > t->cap) {
        /* compaction: everything of this sync is written again from the start */
        fresh = 0;
        for (int64_t i = 0; i < n; i++) {
            q[i].size = q[i].whole ? q[i].size : region_size(&seqs[i]);
            q[i].whole = true;
            fresh += q[i].size;
        }
        t->epoch++;
        t->used = 0;
        t->n_compactions++;
        n_span = 0;
        if (fresh > t->cap) {
            rc = arena_grow(t, 2 * fresh);
            if (rc != UC_OK) {
                goto out;
            }
        }
    }
    /* regions in sequence order, written in parallel (a batch of new 8K sequences writes 21 MB) */
    for (int64_t i = 0; i < n; i++) {
        q[i].at = t->used;
        t->used += q[i].size;
    }
#pragma omp parallel for schedule(dynamic) if (fresh >= t->par_min)
    for (int64_t i = 0; i < n; i++) {
        q[i].rc = q[i].whole ? region_write(t, &seqs[i], q[i].at) : UC_OK;
    }
    for (int64_t i = 0; i < n && rc == UC_OK; i++) {
        rc = q[i].rc;
        if (rc == UC_OK && q[i].size > 0 && !span_add(t, &n_span, q[i].at, q[i].at + q[i].size)) {
            rc = UC_ERRF(UC_ERR_NOMEM, "kv table spans");
        }
    }
    if (rc == UC_OK) {
        rc = upload_spans(t, n_span);
    }
out:
    uc_free(q);
    return rc;
}
