/* The step loop: validation (the same on every rank, so all refuse together), frees, new
 * sequences, the work of the step, and calibration's profile steps. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "internal.h"
#include "compress/entropy.h"

/* ---- the step loop ---------------------------------------------------------------------- */

/* Checks a step before any of it runs; the same on every rank, so all ranks refuse together. */
static uc_status validate_step(struct uc_engine *e, const struct uc_step *s)
{
    char msg[256];
    for (int32_t i = 0; i < s->n_new; i++) {
        const struct uc_step_new *n = &s->news[i];
        if (eng_find_seq(e, n->seq_id)) {
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
        struct seq *q = eng_find_seq(e, s->prefills[i].seq_id);
        bool is_new = false;
        for (int32_t k = 0; k < s->n_new; k++) {
            is_new = is_new || s->news[k].seq_id == s->prefills[i].seq_id;
        }
        for (int32_t k = 0; k < i; k++) {
            if (s->prefills[k].seq_id == s->prefills[i].seq_id) {
                return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld prefilled twice",
                               (long long)s->prefills[i].seq_id);
            }
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
        struct seq *q = eng_find_seq(e, dd->seq_id);
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
        if (q->decode_mark == e->step_no) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "step: sequence %lld decoded twice",
                           (long long)dd->seq_id);
        }
        q->decode_mark = e->step_no; /* a refused step leaves marks no later step matches */
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
    rc = eng_lorc_profile(e, false); /* the new file keeps LoRC's record */
    if (rc != UC_OK) {
        return rc;
    }
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
    if (s->op != UC_STEP_RUN) {
        uc_status rs = eng_next_settle(e); /* the decode step in flight is not this one */
        if (rs != UC_OK) {
            UC_FATAL("step %lld: the decode step in flight failed: %s", (long long)e->step_no,
                     uc_status_str(rs));
        }
    }
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
    case UC_STEP_DIAGNOSE: return eng_diagnose(e, s);
    case UC_STEP_KVSHARE_RESET:
    case UC_STEP_KVSHARE_DIST:
    case UC_STEP_KVSHARE_SET: return eng_kvshare_step(e, s);
    case UC_STEP_MC_RESET:
    case UC_STEP_MC_SET: return eng_mc_step(e, s);
    case UC_STEP_RUN: break;
    default: return UC_ERRF(UC_ERR_FORMAT, "step: unknown op %d", (int)s->op);
    }
    uc_status rc = validate_step(e, s);
    if (rc != UC_OK) {
        return rc;
    }
    if (s->n_new > 0 || s->n_prefill > 0 || s->n_decode == 0) {
        /* the decode step in flight can cover only a step of decode rows alone */
        UC_CHECK(eng_next_settle(e), rc, out);
    }
    memset(&e->info, 0, sizeof e->info);
    double t0 = uc_time_s();
    for (int32_t i = 0; i < s->n_free; i++) {
        eng_seq_remove(e, s->frees[i]);
    }
    double t1 = uc_time_s();
    /* new sequences: agree that every rank could allocate them, or drop them everywhere */
    int64_t failed = 0;
    for (int32_t i = 0; i < s->n_new && !failed; i++) {
        failed = (s->news[i].flags & UC_SEQ_FORK ? eng_seq_fork(e, &s->news[i])
                                                  : eng_seq_create(e, &s->news[i])) != UC_OK;
    }
    e->info.free_ms = (t1 - t0) * 1e3;
    e->info.new_ms = (uc_time_s() - t1) * 1e3;
    if (uc_comm_size(e->comm) > 1) {
        UC_CHECK(uc_comm_allreduce_max(e->comm, &failed, 1, UC_COMM_I64), rc, out);
    }
    if (failed) {
        for (int32_t i = 0; i < s->n_new; i++) {
            eng_seq_remove(e, s->news[i].seq_id);
        }
        return UC_ERRF(UC_ERR_NOMEM, "step: could not allocate new sequences on every rank");
    }
    /* decode rows alone keep their recorded graphs; prompts to prefill make it a sweep */
    rc = s->n_prefill > 0 ? eng_sweep_run(e, s) : eng_decode_run(e, s);
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
    uc_status rc = eng_wire_encode(&e->wire, step, e->step_no);
    if (rc != UC_OK) {
        return rc;
    }
    if (uc_comm_size(e->comm) > 1) {
        UC_CHECK(eng_wire_broadcast(e), rc, out);
    }
    rc = run_step(e, step);
out:
    return rc;
}

uc_status uc_engine_serve(struct uc_engine *e)
{
    for (;;) {
        uc_status rc = eng_wire_broadcast(e);
        if (rc != UC_OK) {
            return rc;
        }
        struct eng_wire_step d;
        rc = eng_wire_decode(&d, e->wire.data, e->wire.len);
        if (rc != UC_OK) {
            UC_FATAL("rank %d: undecodable step from rank 0", uc_comm_rank(e->comm));
        }
        e->step_no = d.step_no;
        enum uc_step_op op = d.s.op;
        rc = run_step(e, &d.s);
        eng_wire_fini(&d);
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
