/* The decode step in flight. Between two decode steps of the same batch the device used to wait
 * for the host: the step's argmax came to the host, the scheduler sent the tokens and built the
 * next step, and only then did that step's layers go out (~0.2 ms a step on an 8B model, every
 * step). When the scheduler says its next step will decode the same sequences again
 * (uc_step.decode_again) and every row is greedy, a step instead keeps its argmax in backend
 * memory and, before reading it, launches the next step for the same batch: that step embeds
 * the kept tokens on the device, its blocks were taken by the lookahead, and its index arrays
 * are laid out for the positions after this step's. The host then reads this step's tokens
 * while the device runs the next one.
 *
 * When the scheduler's next step comes it is checked against the step in flight: the same
 * sequences in the same order, fed the tokens the host read (any of them may be left out: a
 * sequence that stopped). Then the step in flight is taken as that step (its tokens read; the
 * sequences left out go back a token), and the step after it is launched the same way. Any other
 * step first waits for the step in flight and discards it (its sequences go back a token: each
 * head's count, so the slot it wrote is written again by the step that decodes it).
 *
 * Positions: a sequence's n_ctx counts the tokens whose step the host has taken; its heads'
 * n_tokens count those launched (meta_layer takes a head's slot when it lays out a step). */
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "internal.h"

static bool next_ops(const struct uc_engine *e)
{
    const struct uc_backend_ops *o = e->be->ops;
    return o->argmax_keep && o->embed_ids && o->ids_fetch_begin && o->ids_fetch_end;
}

/* Whether sequence s may decode one more token after the one this step feeds: its position
 * inside the context, and inside what admission reserved for it (a sequence decodes at most
 * max_new - 1 tokens after its first). n_ctx already counts this step's token. */
static bool next_fits(const struct uc_engine *e, const struct seq *s)
{
    return s->n_ctx < e->max_ctx && s->max_new > 0 && s->n_ctx - s->n_prompt < s->max_new - 1;
}

bool eng_next_wanted(const struct uc_engine *e, const struct uc_step *st)
{
    if (!st->decode_again || e->p.no_overlap || uc_comm_size(e->comm) != 1 || !next_ops(e) ||
        (e->be->kind == UC_BACKEND_CPU && !e->p.overlap_sync) ||
        st->n_decode > e->ws.max_logit_rows) {
        return false;
    }
    for (int32_t b = 0; b < st->n_decode; b++) {
        if (!(st->decodes[b].flags & UC_DECODE_GREEDY)) {
            return false;
        }
    }
    return true;
}

/* Heads of s back a token: the step in flight took each one's next slot. */
static void next_rollback(struct uc_engine *e, struct seq *s)
{
    int64_t L = e->cfg->n_layers, hkv = e->sh->n_heads_kv;
    for (int64_t l = 0; l < L; l++) {
        for (int64_t j = 0; j < hkv && !eng_layer_shared(s, l); j++) {
            uc_kv_seq_head(&s->kv, l, j)->n_tokens--;
        }
    }
}

/* Launches the step after e->step_no for e->batch's nb sequences (their n_ctx counting the
 * step before it), fed by the argmax in ids_dev[in]; nothing when a sequence has no room for
 * it or the lookahead (the caller's) did not ready the batch. The step's info is kept for when
 * it is taken. */
static uc_status next_launch(struct uc_engine *e, int64_t nb, int in)
{
    struct seq **batch = e->batch;
    int64_t step = e->step_no + 1;
    e->nx.live = false;
    for (int64_t b = 0; b < nb; b++) {
        if (!next_fits(e, batch[b])) {
            return UC_OK;
        }
    }
    if (!eng_decode_ahead_done(e, batch, nb, step)) {
        return UC_OK; /* the lookahead found no room: the step runs when it comes */
    }
    if (eng_decode_records(e, nb) || e->info.graph == UC_STEP_GRAPH_RECORDED) {
        /* its graphs would be recorded now, or this step just recorded them (its replay would
         * queue behind their first launch): either held this step's tokens for two steps'
         * time on the H100 (calls Q4, Q5, R1), so the next step runs when it comes */
        return UC_OK;
    }
    struct uc_engine_step_info mine = e->info;
    memset(&e->info, 0, sizeof e->info);
    int out = in ^ 1;
    uc_status rc;
    e->dm_t0 = uc_time_s();
    UC_CHECK(uc_model_embed_kept(e->m, e->dx, e->ids_dev[in], nb), rc, out);
    UC_CHECK(eng_decode_meta_prep(e, batch, nb, step), rc, out);
    UC_CHECK(eng_decode_graphed(e, nb), rc, out);
    UC_CHECK(uc_model_argmax_keep(e->m, &e->ws, e->ids_dev[out], e->dx, nb), rc, out);
    UC_CHECK(e->be->ops->ids_fetch_begin(e->be, out, e->ids_dev[out], nb), rc, out);
    e->nx.live = true;
    e->nx.step = step;
    e->nx.nb = nb;
    e->nx.slot = out;
    for (int64_t b = 0; b < nb; b++) {
        e->nx.ids[b] = batch[b]->id;
    }
    e->nx.info = e->info;
out:
    e->info = mine;
    return rc;
}

/* Reads the tokens of the step whose argmax went to slot `slot` into e->dec_argmax (row b from
 * its row map[b], or row b without a map). */
static uc_status next_fetch(struct uc_engine *e, int slot, int64_t n, const int64_t *map,
                            int64_t nb)
{
    uc_status rc = e->be->ops->ids_fetch_end(e->be, slot, e->d_tok, n);
    for (int64_t b = 0; rc == UC_OK && b < nb; b++) {
        e->dec_argmax[b] = e->d_tok[map ? map[b] : b];
    }
    return rc;
}

uc_status eng_next_end(struct uc_engine *e, int64_t nb)
{
    const int slot = 0; /* nothing is in flight here: both slots are free */
    uc_status rc;
    UC_CHECK(uc_model_argmax_keep(e->m, &e->ws, e->ids_dev[slot], e->dx, nb), rc, out);
    UC_CHECK(e->be->ops->ids_fetch_begin(e->be, slot, e->ids_dev[slot], nb), rc, out);
    for (int64_t b = 0; b < nb; b++) {
        e->batch[b]->n_ctx++;
    }
    UC_CHECK(next_launch(e, nb, slot), rc, out);
    UC_CHECK(next_fetch(e, slot, nb, NULL, nb), rc, out);
    eng_decode_results(e, nb, true);
    memcpy(e->nx.expect, e->dec_argmax, (size_t)nb * sizeof(int32_t));
out:
    return rc;
}

bool eng_next_covers(struct uc_engine *e, const struct uc_step_decode *dec, int64_t nb)
{
    if (!e->nx.live || e->nx.step != e->step_no || nb > e->nx.nb) {
        return false;
    }
    int64_t k = 0;
    for (int64_t b = 0; b < nb; b++) { /* row b of this step is row map[b] of the one in flight */
        while (k < e->nx.nb && e->nx.ids[k] != dec[b].seq_id) {
            k++;
        }
        if (k == e->nx.nb || dec[b].token != e->nx.expect[k] ||
            !(dec[b].flags & UC_DECODE_GREEDY)) {
            return false;
        }
        e->nx.map[b] = k++;
    }
    return true;
}

/* The step in flight ends (taken for rows map[0, nb), or discarded with nb 0): its other
 * sequences that still exist go back a token (left out but not ended: each decodes that token
 * in a later step). */
static void next_retire(struct uc_engine *e, const int64_t *map, int64_t nb)
{
    for (int64_t k = 0, b = 0; k < e->nx.nb; k++) {
        if (b < nb && map[b] == k) {
            b++;
            continue;
        }
        struct seq *gone = eng_find_seq(e, e->nx.ids[k]);
        if (gone) {
            next_rollback(e, gone);
        }
    }
    e->nx.live = false;
}

uc_status eng_next_take(struct uc_engine *e, const struct uc_step *st)
{
    const struct uc_step_decode *dec = st->decodes;
    int64_t nb = st->n_decode, n = e->nx.nb;
    int slot = e->nx.slot;
    const int64_t *map = e->nx.map; /* eng_next_covers' */
    for (int64_t b = 0; b < nb; b++) {
        e->batch[b] = eng_find_seq(e, dec[b].seq_id);
        e->batch[b]->n_ctx++;
    }
    next_retire(e, map, nb);
    struct uc_engine_step_info in = e->nx.info;
    in.free_ms = e->info.free_ms;
    in.new_ms = e->info.new_ms;
    in.overlapped = true;
    e->info = in;
    uc_status rc;
    if (nb == n && eng_next_wanted(e, st)) {
        /* the same batch again: the step after it launched behind it, its blocks taken first.
         * Taken here, not when the step in flight was launched: a table write that waits for
         * the stream (a compaction's whole arena goes through the driver's staging) then waits
         * for the step whose tokens this step reads anyway, not for the one behind it too (on
         * the H100 that held two steps' tokens of b for 34 ms, every 16 tokens' block turn) */
        UC_CHECK(eng_decode_ahead(e, e->batch, nb, e->step_no), rc, out);
        UC_CHECK(next_launch(e, nb, slot), rc, out);
    }
    UC_CHECK(next_fetch(e, slot, n, map, nb), rc, out);
    eng_decode_results(e, nb, true);
    if (e->nx.live) {
        memcpy(e->nx.expect, e->dec_argmax, (size_t)nb * sizeof(int32_t));
    }
out:
    return rc;
}

uc_status eng_next_settle(struct uc_engine *e)
{
    if (!e->nx.live) {
        return UC_OK;
    }
    e->ah_nb = 0; /* its lookahead was for the step after it */
    uc_status rc = e->be->ops->ids_fetch_end(e->be, e->nx.slot, e->d_tok, e->nx.nb);
    next_retire(e, NULL, 0);
    return rc;
}

bool uc_engine_decode_in_flight(const struct uc_engine *e) { return e->nx.live; }
