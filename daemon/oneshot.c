/* One-shot mode: one request through the same scheduler the server uses, its completion
 * streamed to stdout, diagnostics and the compression report on stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "daemon.h"

struct oneshot {
    struct uc_sched *s;
    bool report;
    int exit_code;
};

static void print_report(const struct uc_gen_event *ev)
{
    const struct uc_compress_report *r = ev->report;
    fprintf(stderr, "\n--- uncomp report ---\n");
    fprintf(stderr, "finish=%s prompt_tokens=%lld completion_tokens=%lld\n",
            uc_finish_reason_name(ev->finish), (long long)ev->prompt_tokens,
            (long long)ev->completion_tokens);
    fprintf(stderr, "timing: queue=%.1fms ttft=%.1fms prefill=%.1fms decode=%.1fms total=%.1fms\n",
            ev->timing.queue_ms, ev->timing.ttft_ms, ev->timing.prefill_ms, ev->timing.decode_ms,
            ev->timing.total_ms);
    if (ev->completion_tokens > 1 && ev->timing.decode_ms > 0) {
        fprintf(stderr, "decode: %.1f tokens/s\n",
                (double)(ev->completion_tokens - 1) / (ev->timing.decode_ms / 1e3));
    }
    if (!r) {
        return;
    }
    fprintf(stderr, "compression: policy=%s kv_budget=%d decode_mode=%s grouping=%s\n",
            uc_policy_name(r->policy), r->kv_budget, uc_decode_mode_name(ev->compress.decode_mode),
            uc_grouping_name(ev->compress.grouping));
    fprintf(stderr, "kv_tokens: full=%lld kept=%lld ratio=%.4f  kv_bytes: full=%lld kept=%lld\n",
            (long long)r->kv_tokens_full, (long long)r->kv_tokens_kept, r->ratio,
            (long long)r->kv_bytes_full, (long long)r->kv_bytes_kept);
    fprintf(stderr, "prefill rows per stage:");
    for (int32_t c = 0; c < r->n_stages; c++) {
        fprintf(stderr, " %lld", (long long)r->stage_rows[c]);
    }
    if (r->n_stages > 1) {
        fprintf(stderr, " (stages start at layers");
        for (int32_t c = 0; c + 1 < r->n_stages; c++) {
            fprintf(stderr, " %d", r->stage_starts[c]);
        }
        fprintf(stderr, ")");
    }
    fprintf(stderr, "\n");
    for (int32_t g = 0; g < r->n_groups; g++) {
        fprintf(stderr, "group %d: budget=%d mean_kept=%.1f\n", g, r->group_budget[g],
                r->group_mean_kept[g]);
    }
    for (int64_t l = 0; l < r->n_layers && r->n_groups > 0; l++) {
        fprintf(stderr, "layer %2lld kv-head entropy min=%.4f mean=%.4f max=%.4f\n", (long long)l,
                r->entropy_min[l], r->entropy_mean[l], r->entropy_max[l]);
    }
    fprintf(stderr, "compress_ms=%.2f plan_checksum=%016llx\n", r->compress_ms,
            (unsigned long long)r->plan_checksum);
}

static void sink(void *user, const struct uc_gen_event *ev)
{
    struct oneshot *o = user;
    if (ev->kind == UC_EVENT_TOKENS) {
        fwrite(ev->text, 1, ev->text_len, stdout);
        fflush(stdout);
        return;
    }
    fputc('\n', stdout);
    fflush(stdout);
    if (ev->status != UC_OK) {
        fprintf(stderr, "uncompd: %s: %s\n", uc_status_str(ev->status), ev->message);
        o->exit_code = 1;
    }
    if (o->report) {
        print_report(ev);
    }
    uc_sched_stop(o->s);
}

/* The prompt: *len bytes (a file or stdin may hold NUL bytes, which are text like any other),
 * then a NUL; NULL when it cannot be read. */
static char *read_prompt(const struct uc_config *c, size_t *len)
{
    if (c->prompt[0]) {
        *len = strlen(c->prompt);
        return uc_strdup(c->prompt);
    }
    if (strcmp(c->prompt_file, "-") == 0) {
        struct uc_buf b;
        uc_buf_init(&b);
        char chunk[4096];
        size_t n;
        while ((n = fread(chunk, 1, sizeof chunk, stdin)) > 0) {
            uc_buf_append(&b, chunk, n);
        }
        *len = b.len;
        return b.oom ? (uc_buf_fini(&b), NULL) : uc_buf_take(&b);
    }
    char *text = NULL;
    return uc_file_read_all(&text, len, c->prompt_file) == UC_OK ? text : NULL;
}

int uc_oneshot_run(struct uc_sched *s, const struct uc_config *c, const struct uc_tokenizer *tok)
{
    struct oneshot o = {.s = s, .report = c->report};
    size_t text_len = 0;
    char *text = read_prompt(c, &text_len);
    if (!text) {
        fprintf(stderr, "uncompd: cannot read the prompt from %s\n", c->prompt_file);
        uc_sched_stop(s);
        uc_sched_run(s);
        return 1;
    }
    int32_t *ids = NULL;
    int64_t n = 0;
    char msg[512] = "";
    uc_status rc = uc_tokenizer_encode_msg(tok, text, text_len, true, &ids, &n, msg, sizeof msg);
    uc_free(text);
    if (rc == UC_OK) {
        struct uc_request r;
        uc_request_init(&r);
        r.prompt = ids;
        r.n_prompt = n;
        r.max_tokens = (int32_t)c->max_tokens;
        r.sampling.temperature = (float)c->temperature;
        r.sampling.top_k = (int32_t)c->top_k;
        r.sampling.top_p = (float)c->top_p;
        r.sampling.min_p = (float)c->min_p;
        r.sampling.repetition_penalty = (float)c->repetition_penalty;
        r.sampling.seed = (uint64_t)c->seed;
        r.sampling.has_seed = true;
        r.ignore_eos = c->ignore_eos;
        const char *stops[1] = {c->stop};
        if (c->stop[0]) {
            r.stop = stops;
            r.n_stop = 1;
        }
        rc = uc_sched_submit(s, &r, sink, &o, NULL, msg, sizeof msg);
    } else {
        /* the tokenizer's own reason (not valid UTF-8 at byte N, a regex limit, memory) */
        char why[sizeof msg];
        memcpy(why, msg, sizeof why);
        snprintf(msg, sizeof msg, "the prompt cannot be tokenized: %.400s",
                 why[0] ? why : uc_status_str(rc));
    }
    uc_free(ids);
    if (rc != UC_OK) {
        fprintf(stderr, "uncompd: %s\n", msg[0] ? msg : uc_status_str(rc));
        uc_sched_stop(s);
        o.exit_code = 1;
    }
    if (uc_sched_run(s) != UC_OK) {
        return 1;
    }
    return o.exit_code;
}
