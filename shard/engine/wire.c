/* The step descriptor on the wire: rank 0 encodes each uc_step and broadcasts it over the MPI
 * control plane; every other rank decodes and runs the same step. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "internal.h"

#define STEP_MAGIC 0x55435354u /* "UCST" */
#define STEP_INLINE 4096       /* bytes of a step sent in the first broadcast */

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

uc_status eng_wire_encode(struct uc_buf *b, const struct uc_step *s, int64_t step_no)
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
    put(b, &s->diag_seq, sizeof s->diag_seq);
    put(b, &s->ks_tokens, sizeof s->ks_tokens);
    put(b, &s->ks_n_pairs, sizeof s->ks_n_pairs);
    put(b, &s->ks_target, sizeof s->ks_target);
    put(b, &s->ks_threshold, sizeof s->ks_threshold);
    put(b, &s->ks_cosine, sizeof s->ks_cosine);
    put(b, s->ks_pairs, sizeof s->ks_pairs);
    put(b, &s->mc_n_pairs, sizeof s->mc_n_pairs);
    if (b->oom) {
        return UC_ERRF(UC_ERR_NOMEM, "step wire bytes=%zu", b->len);
    }
    ((struct wire_hdr *)(void *)b->data)->n_bytes = b->len - sizeof h;
    return UC_OK;
}

void eng_wire_fini(struct eng_wire_step *d)
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

uc_status eng_wire_decode(struct eng_wire_step *d, const char *buf, size_t len)
{
    memset(d, 0, sizeof *d);
    struct reader r = {buf, len, false};
    struct wire_hdr h;
    take(&r, &h, sizeof h);
    if (r.bad || h.magic != STEP_MAGIC) {
        return UC_ERRF(UC_ERR_FORMAT, "step wire: bad header");
    }
    d->s.op = (enum uc_step_op)h.op;
    d->step_no = h.step_no;
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
        eng_wire_fini(d);
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
            eng_wire_fini(d);
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
    take(&r, &d->s.diag_seq, sizeof d->s.diag_seq);
    take(&r, &d->s.ks_tokens, sizeof d->s.ks_tokens);
    take(&r, &d->s.ks_n_pairs, sizeof d->s.ks_n_pairs);
    take(&r, &d->s.ks_target, sizeof d->s.ks_target);
    take(&r, &d->s.ks_threshold, sizeof d->s.ks_threshold);
    take(&r, &d->s.ks_cosine, sizeof d->s.ks_cosine);
    take(&r, d->s.ks_pairs, sizeof d->s.ks_pairs);
    take(&r, &d->s.mc_n_pairs, sizeof d->s.mc_n_pairs);
    if (r.bad) {
        eng_wire_fini(d);
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
uc_status eng_wire_broadcast(struct uc_engine *e)
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
