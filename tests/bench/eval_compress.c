/* Compression quality evaluation on uncomp-tiny: needle-in-a-haystack accuracy over context
 * length x depth (held-out Paul Graham essays as haystack, held-out keys, RULER-style needles),
 * perplexity of held-out text continued from a compressed prefix, and next-token agreement with
 * the full cache, for every policy at several budgets. Prints a table and writes CSV.
 *
 * Usage: eval_compress [--shared DIR] [--model DIR] [--lengths 1024,2048,3072,4000]
 *   [--depths 0,0.25,0.5,0.75,1] [--trials N] [--policies full,snapkv,...] [--budgets 64,128,...]
 *   [--ppl-segments N] [--ppl-prefix N] [--ppl-tokens N] [--stage-starts 6,7] [--r-min X]
 *   [--row-score sum|max|accum|accum-max] [--grouping profile|prompt] [--seed S] [--csv FILE]
 *   [--backend cpu|cuda] [--fp32 0|1] [--check] [--calibrate TEXT_FILE]
 *   [--kvsharer-threshold T] [--kvsharer-layers RATIO] [--think-ratio X]
 *   [--minicache-t X] [--minicache-gamma X] [--minicache-start L]
 * Policies are specs: a token policy with stages ("snapkv+kvsharer", "kvsharer" = full +
 * sharing, "snapkv+think": ThinK's key channel pruning at --think-ratio, default 0.4,
 * "snapkv+minicache": MiniCache's cross-layer merging, defaults t 0.6, gamma 0.05, start L/2).
 *   [--kvsharer-threshold T] [--kvsharer-layers RATIO] [--think-ratio X] [--lorc-ratio X]
 * Policies are specs: a token policy with stages ("snapkv+kvsharer", "kvsharer" = full +
 * sharing, "snapkv+think": ThinK's key channel pruning at --think-ratio, default 0.4,
 * "snapkv+lorc": LoRC's low-rank latents keeping --lorc-ratio of the K/V dimensions, 0.5).
 * --calibrate runs, before the evaluation, the entropy calibration when the model has no
 * profile, KVSharer's layer-pair search and MiniCache's merge-set calibration on TEXT_FILE,
 * into a temporary copy of the profile (the model's file is left alone; without --calibrate
 * minicache merges the model profile's calibrated pairs if it has them, else the paper's). The table gives KV bytes per prompt token (whole model, K
 * and V, as the cache holds them: fewer with ThinK's packed rows) so policies compare at equal
 * bytes.
 * --check exits 1 unless uncomp at budget 128 is at least snapkv at 128 and within 5 points
 * of full (the gate of the UNComp issue); the test suite runs a small subset with it. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "comm.h"
#include "engine.h"
#include "test_util.h"
#include "tokenizer.h"

#define MAX_LIST 32

struct opts {
    const char *shared, *model, *csv;
    int64_t lengths[MAX_LIST];
    int n_lengths;
    double depths[MAX_LIST];
    int n_depths;
    int trials;
    struct uc_compress_params policies[MAX_LIST]; /* policy and stages of each spec */
    int n_policies;
    const char *calib_text;
    struct uc_kvsharer_params kvsharer;
    int32_t budgets[MAX_LIST];
    int n_budgets;
    int ppl_segments, ppl_prefix, ppl_tokens;
    struct uc_compress_params base;
    uint64_t seed;
    bool check;
    struct uc_backend_params backend;
};

struct needle {
    int32_t *ids;
    int64_t n;
    char value[16];
    int64_t length;
    double depth;
};

struct result {
    enum uc_policy policy;
    char name[48];
    int32_t budget;
    int64_t hits, total;
    int64_t hits_len[MAX_LIST], total_len[MAX_LIST];
    double nll;
    int64_t nll_n;
    int64_t agree, agree_n;
    double kv_ratio_sum;
    double kv_bytes_tok_sum; /* KV bytes kept per prompt token (all layers and heads) */
    int64_t kv_n;
    double *prefill_ms;
    int64_t n_prefill;
};

/* ---- inputs ----------------------------------------------------------------------------- */

static int parse_list_i(const char *s, int64_t *out)
{
    int n = 0;
    while (*s && n < MAX_LIST) {
        char *end;
        out[n++] = strtoll(s, &end, 10);
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') {
            break;
        }
    }
    return n;
}

static char *read_haystack(const char *shared, const cJSON *essays)
{
    struct uc_buf b;
    uc_buf_init(&b);
    const cJSON *it;
    cJSON_ArrayForEach(it, essays)
    {
        char path[4096];
        snprintf(path, sizeof path, "%s/data/pg-essays/%s", shared, it->valuestring);
        char *t = NULL;
        if (uc_file_read_all(&t, NULL, path) != UC_OK) {
            fprintf(stderr, "eval: cannot read %s\n", path);
            exit(1);
        }
        if (b.len) {
            uc_buf_puts(&b, "\n\n");
        }
        uc_buf_puts(&b, t);
        uc_free(t);
    }
    return uc_buf_take(&b);
}

/* Moves i back to the start of a UTF-8 character. */
static size_t char_start(const char *s, size_t i)
{
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80) {
        i--;
    }
    return i;
}

/* A needle prompt as train_tiny.py builds them: a window of the haystack, the needle inserted
 * at a sentence boundary near `depth`, the question appended. */
static char *needle_text(const char *hay, size_t hay_len, size_t nchars, double depth,
                         struct uc_rng *rng, const char *key, const char *value)
{
    size_t start = hay_len > nchars ? (size_t)(uc_rng_next(rng) % (hay_len - nchars)) : 0;
    start = char_start(hay, start);
    size_t len = start + nchars <= hay_len ? nchars : hay_len - start;
    len = char_start(hay + start, len);
    const char *w = hay + start;
    size_t cut = (size_t)((double)len * depth);
    size_t dot = SIZE_MAX;
    for (size_t i = 0; i < cut; i++) {
        if (w[i] == '.') {
            dot = i;
        }
    }
    cut = dot != SIZE_MAX ? dot + 1 : char_start(w, cut);
    struct uc_buf b;
    uc_buf_init(&b);
    uc_buf_append(&b, w, cut);
    uc_buf_printf(&b, " One of the special magic numbers for %s is: %s. ", key, value);
    uc_buf_append(&b, w + cut, len - cut);
    uc_buf_printf(&b, " What is the special magic number for %s mentioned in the provided text? "
                      "The special magic number for %s mentioned in the provided text is",
                  key, key);
    return uc_buf_take(&b);
}

static int64_t make_needles(const struct opts *o, const struct uc_tokenizer *tok,
                            const char *hay, const cJSON *keys, struct needle **out)
{
    int64_t total = (int64_t)o->n_lengths * o->n_depths * o->trials, k = 0;
    struct needle *v = uc_calloc((size_t)total, sizeof *v);
    struct uc_rng rng;
    uc_rng_seed(&rng, o->seed);
    size_t hay_len = strlen(hay);
    int n_keys = cJSON_GetArraySize(keys);
    for (int li = 0; li < o->n_lengths; li++) {
        for (int di = 0; di < o->n_depths; di++) {
            for (int t = 0; t < o->trials; t++) {
                struct needle *nd = &v[k++];
                const char *key =
                    cJSON_GetArrayItem(keys, (int)(uc_rng_next(&rng) % (uint64_t)n_keys))
                        ->valuestring;
                snprintf(nd->value, sizeof nd->value, "%llu",
                         (unsigned long long)(100000 + uc_rng_next(&rng) % 9899999ULL));
                size_t nchars = (size_t)o->lengths[li] * 4;
                uint64_t state = uc_rng_next(&rng);
                for (;;) {
                    struct uc_rng r2;
                    uc_rng_seed(&r2, state);
                    char *text = needle_text(hay, hay_len, nchars, o->depths[di], &r2, key,
                                             nd->value);
                    uc_free(nd->ids);
                    nd->ids = NULL;
                    uc_tokenizer_encode(tok, text, strlen(text), true, &nd->ids, &nd->n);
                    uc_free(text);
                    if (nd->n <= o->lengths[li] || nchars < 200) {
                        break;
                    }
                    nchars = (size_t)((double)nchars * 0.9);
                }
                nd->length = li;
                nd->depth = o->depths[di];
            }
        }
    }
    *out = v;
    return total;
}

/* ---- runs ------------------------------------------------------------------------------- */

static struct uc_compress_params params_for(const struct opts *o,
                                            const struct uc_compress_params *spec, int32_t budget)
{
    struct uc_compress_params cp = o->base;
    cp.policy = spec->policy;
    cp.stages = spec->stages;
    cp.kv_budget = budget;
    return cp;
}

/* Greedy answer of one needle prompt; returns whether it starts with the value. */
static bool run_needle(struct uc_engine *e, const struct uc_tokenizer *tok,
                       const struct needle *nd, const struct uc_compress_params *cp,
                       struct result *r)
{
    double t0 = uc_time_s();
    if (tu_prefill(e, 1, nd->ids, nd->n, 0, cp, 8) != UC_OK) {
        fprintf(stderr, "eval: prefill failed\n");
        exit(1);
    }
    r->prefill_ms[r->n_prefill++] = (uc_time_s() - t0) * 1e3;
    struct uc_compress_report rep;
    if (uc_engine_seq_report(e, 1, &rep) == UC_OK) {
        r->kv_ratio_sum += rep.ratio;
        r->kv_bytes_tok_sum += (double)rep.kv_bytes_kept / (double)nd->n;
        r->kv_n++;
    }
    int32_t out[8];
    int64_t n = tu_greedy(e, 1, 8, out);
    tu_free(e, 1);
    char *text = NULL;
    size_t len = 0;
    uc_tokenizer_decode(tok, out, n, true, &text, &len);
    const char *p = text;
    while (*p == ' ' || *p == '\n') {
        p++;
    }
    bool ok = strncmp(p, nd->value, strlen(nd->value)) == 0;
    uc_free(text);
    return ok;
}

/* Teacher-forced continuation of a compressed prefix: NLL of each next token and the argmax. */
static void run_ppl(struct uc_engine *e, const int32_t *ids, int64_t prefix, int64_t n_eval,
                    const struct uc_compress_params *cp, double *nll, int32_t *argmax)
{
    int64_t v = uc_engine_config(e)->vocab, rows;
    tu_prefill(e, 2, ids, prefix, 0, cp, (int32_t)n_eval);
    for (int64_t i = 0; i < n_eval; i++) {
        const float *lg = uc_engine_seq_logits(e, 2, &rows);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < v; j++) {
            mx = lg[j] > mx ? lg[j] : mx;
        }
        for (int64_t j = 0; j < v; j++) {
            sum += exp(lg[j] - mx);
        }
        int32_t next = ids[prefix + i];
        nll[i] = -(lg[next] - mx - log(sum));
        argmax[i] = tu_argmax(lg, v);
        if (i + 1 < n_eval) {
            tu_decode(e, 2, next);
        }
    }
    tu_free(e, 2);
}

static void usage_defaults(struct opts *o)
{
    memset(o, 0, sizeof *o);
    o->shared = "../shared";
    o->model = NULL;
    o->n_lengths = parse_list_i("1024,2048,3072,4000", o->lengths);
    double d[5] = {0.0, 0.25, 0.5, 0.75, 1.0};
    memcpy(o->depths, d, sizeof d);
    o->n_depths = 5;
    o->trials = 2;
    for (int p = 0; p < UC_POLICY_COUNT; p++) {
        o->policies[o->n_policies] = uc_compress_default_params();
        o->policies[o->n_policies++].policy = (enum uc_policy)p;
    }
    o->budgets[0] = 64;
    o->budgets[1] = 128;
    o->budgets[2] = 256;
    o->budgets[3] = 512;
    o->n_budgets = 4;
    o->ppl_segments = 2;
    o->ppl_prefix = 1536;
    o->ppl_tokens = 256;
    o->base = uc_compress_default_params();
    o->seed = 1234;
    o->kvsharer = uc_kvsharer_default_params();
    o->backend = uc_backend_default_params();
}

static void parse_args(struct opts *o, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--check")) {
            o->check = true;
            continue;
        }
        i++;
        if (!strcmp(a, "--shared")) {
            o->shared = v;
        } else if (!strcmp(a, "--model")) {
            o->model = v;
        } else if (!strcmp(a, "--csv")) {
            o->csv = v;
        } else if (!strcmp(a, "--lengths")) {
            o->n_lengths = parse_list_i(v, o->lengths);
        } else if (!strcmp(a, "--depths")) {
            o->n_depths = 0;
            for (const char *s = v; *s && o->n_depths < MAX_LIST;) {
                char *end;
                o->depths[o->n_depths++] = strtod(s, &end);
                s = *end == ',' ? end + 1 : end;
                if (*end && *end != ',') {
                    break;
                }
            }
        } else if (!strcmp(a, "--trials")) {
            o->trials = atoi(v);
        } else if (!strcmp(a, "--policies")) {
            o->n_policies = 0;
            char *dup = uc_strdup(v), *save = NULL;
            for (char *t = strtok_r(dup, ",", &save); t && o->n_policies < MAX_LIST;
                 t = strtok_r(NULL, ",", &save)) {
                char msg[512];
                struct uc_compress_params p = uc_compress_default_params();
                if (uc_policy_spec_parse(t, &p, msg, sizeof msg) != UC_OK) {
                    fprintf(stderr, "eval: %s\n", msg);
                    exit(2);
                }
                o->policies[o->n_policies++] = p;
            }
            uc_free(dup);
        } else if (!strcmp(a, "--budgets")) {
            int64_t b[MAX_LIST];
            o->n_budgets = parse_list_i(v, b);
            for (int k = 0; k < o->n_budgets; k++) {
                o->budgets[k] = (int32_t)b[k];
            }
        } else if (!strcmp(a, "--ppl-segments")) {
            o->ppl_segments = atoi(v);
        } else if (!strcmp(a, "--ppl-prefix")) {
            o->ppl_prefix = atoi(v);
        } else if (!strcmp(a, "--ppl-tokens")) {
            o->ppl_tokens = atoi(v);
        } else if (!strcmp(a, "--stage-starts")) {
            int64_t s[MAX_LIST];
            int n = parse_list_i(v, s);
            o->base.n_stage_starts = n;
            for (int k = 0; k < n; k++) {
                o->base.stage_starts[k] = (int32_t)s[k];
            }
        } else if (!strcmp(a, "--r-min")) {
            o->base.r_min = (float)atof(v);
        } else if (!strcmp(a, "--think-ratio")) {
            o->base.think_ratio = (float)atof(v);
            if (!(o->base.think_ratio > 0.0f && o->base.think_ratio < 1.0f)) {
                fprintf(stderr, "eval: --think-ratio %s must be in (0, 1)\n", v);
                exit(2);
            }
        } else if (!strcmp(a, "--minicache-t")) {
            o->base.minicache_t = (float)atof(v);
        } else if (!strcmp(a, "--minicache-gamma")) {
            double g = atof(v);
            o->base.minicache_gamma = g > 0.0 ? (float)g : -1.0f; /* 0: none retained */
        } else if (!strcmp(a, "--minicache-start")) {
            o->base.minicache_start = atoi(v);
        } else if (!strcmp(a, "--lorc-ratio")) {
            o->base.lorc_ratio = (float)atof(v);
            if (!(o->base.lorc_ratio > 0.0f && o->base.lorc_ratio <= 1.0f)) {
                fprintf(stderr, "eval: --lorc-ratio %s must be in (0, 1]\n", v);
                exit(2);
            }
        } else if (!strcmp(a, "--row-score")) {
            enum uc_row_score rs;
            if (!uc_row_score_parse(v, &rs)) {
                fprintf(stderr, "eval: unknown row score %s\n", v);
                exit(2);
            }
            o->base.row_score = (int32_t)rs;
        } else if (!strcmp(a, "--grouping")) {
            uc_grouping_parse(v, &o->base.grouping);
        } else if (!strcmp(a, "--backend")) {
            uc_backend_parse(v, &o->backend.kind);
        } else if (!strcmp(a, "--fp32")) {
            o->backend.fp32 = atoi(v) != 0;
        } else if (!strcmp(a, "--calibrate")) {
            o->calib_text = v;
        } else if (!strcmp(a, "--kvsharer-threshold")) {
            o->kvsharer.threshold = atof(v);
        } else if (!strcmp(a, "--kvsharer-layers")) {
            o->kvsharer.ratio = atof(v);
        } else if (!strcmp(a, "--seed")) {
            o->seed = strtoull(v, NULL, 10);
        } else {
            fprintf(stderr, "eval: unknown option %s\n", a);
            exit(2);
        }
    }
}

/* --calibrate: the entropy profile from the text when there is none (four 1024-token windows),
 * then KVSharer's layer pairs and MiniCache's merge set (four 256-token windows), into the
 * engine's (temporary) profile. */
static uc_status calibrate(struct uc_engine *e, const struct uc_tokenizer *tok, const char *path,
                           const struct uc_kvsharer_params *kp)
{
    char *text = NULL;
    int32_t *ids = NULL, *win = NULL;
    int64_t n = 0;
    uc_status rc = uc_file_read_all(&text, NULL, path);
    if (rc != UC_OK) {
        fprintf(stderr, "eval: cannot read %s\n", path);
        return rc;
    }
    UC_CHECK(uc_tokenizer_encode(tok, text, strlen(text), false, &ids, &n), rc, out);
    int32_t bos = uc_tokenizer_bos(tok);
    enum { EW = 1024, KW = 256 };
    win = uc_malloc((size_t)(4 * EW) * sizeof(int32_t));
    if (!win || n < 4 * EW) {
        fprintf(stderr, "eval: %s has %lld tokens, calibration wants %d\n", path, (long long)n,
                4 * EW);
        rc = UC_ERR_INVALID_ARG;
        goto out;
    }
    if (!uc_engine_profile(e)) {
        struct uc_step reset = {.op = UC_STEP_PROFILE_RESET};
        UC_CHECK(uc_engine_step(e, &reset), rc, out);
        for (int i = 0; i < 4; i++) {
            win[0] = bos >= 0 ? bos : ids[i * EW];
            memcpy(win + 1, ids + i * EW + 1, (size_t)(EW - 1) * sizeof(int32_t));
            UC_CHECK(tu_prefill(e, 50 + i, win, EW, UC_SEQ_CALIBRATE, NULL, 0), rc, out);
            /* a calibration window ends its layers in parts, one per step */
            while (uc_engine_seq_phase(e, 50 + i) == UC_SEQ_PREFILLING) {
                struct uc_step_prefill pf = {.seq_id = 50 + i, .budget_rows = 0};
                struct uc_step st = {.op = UC_STEP_RUN, .n_prefill = 1, .prefills = &pf};
                UC_CHECK(uc_engine_step(e, &st), rc, out);
            }
            UC_CHECK(tu_free(e, 50 + i), rc, out);
        }
        struct uc_step fin = {.op = UC_STEP_PROFILE_FINISH, .profile_groups = 2,
                              .profile_eps = 1.0};
        snprintf(fin.profile_source, sizeof fin.profile_source, "%.200s", path);
        UC_CHECK(uc_engine_step(e, &fin), rc, out);
    }
    for (int i = 0; i < 4; i++) {
        int32_t *w = win + i * KW;
        w[0] = bos >= 0 ? bos : ids[i * KW];
        memcpy(w + 1, ids + i * KW + 1, (size_t)(KW - 1) * sizeof(int32_t));
    }
    struct uc_kvsharer_result res;
    UC_CHECK(uc_engine_kvsharer_calibrate(e, win, 4 * KW, KW, kp, &res), rc, out);
    printf("# kvsharer: %d layer pairs (cosine %.4f, %d tried):", res.n_pairs, res.cosine,
           res.n_tried);
    for (int32_t i = 0; i < res.n_pairs; i++) {
        printf(" %d->%d", res.pairs[i].src, res.pairs[i].dst);
    }
    printf("\n");
    /* MiniCache's merge set on the same windows (the paper's count of pairs) */
    UC_CHECK(uc_engine_minicache_calibrate(e, win, 4 * KW, KW, 0), rc, out);
    const struct uc_profile *p = uc_engine_profile(e);
    printf("# minicache: %d layer pairs:", p->mc_n_pairs);
    for (int32_t i = 0; i < p->mc_n_pairs; i++) {
        printf(" %d-%d", p->mc_first[i], p->mc_first[i] + 1);
    }
    printf(" (mean angular distances of adjacent layers:");
    for (int64_t l = 0; l + 1 < p->n_layers; l++) {
        printf(" %.4f", p->mc_dist[l]);
    }
    printf(")\n");
out:
    uc_free(text);
    uc_free(ids);
    uc_free(win);
    return rc;
}

int main(int argc, char **argv)
{
    struct opts o;
    usage_defaults(&o);
    parse_args(&o, argc, argv);
    struct uc_comm *comm;
    if (uc_comm_create(&comm, &argc, &argv, 600000) != UC_OK) {
        return 1;
    }
    uc_log_set_level(UC_LOG_LEVEL_WARN);
    char model[4096];
    snprintf(model, sizeof model, "%s", o.model ? o.model : tu_model_dir(o.shared, "uncomp-tiny"));
    struct uc_engine_params ep = uc_engine_default_params();
    ep.model_dir = model;
    ep.kv_memory_bytes = 256LL << 20;
    ep.backend = o.backend;
    char prof_tmp[256] = "";
    if (o.calib_text) {
        /* every rank: a copy of the model's profile (if any) that calibration may overwrite */
        snprintf(prof_tmp, sizeof prof_tmp, "/tmp/uc_eval_profile_%d_r%d.json", (int)getpid(),
                 uc_comm_rank(comm));
        char src[4200], *text = NULL;
        size_t len = 0;
        snprintf(src, sizeof src, "%s/uncomp_profile.json", model);
        unlink(prof_tmp);
        if (uc_file_exists(src) && uc_file_read_all(&text, &len, src) == UC_OK) {
            uc_file_write_all(prof_tmp, text, len);
            uc_free(text);
        }
        ep.profile_path = prof_tmp;
    }
    struct uc_engine *e;
    if (uc_engine_create(&e, &ep, comm) != UC_OK) {
        return 1;
    }
    if (uc_comm_rank(comm) != 0) {
        uc_engine_serve(e);
        uc_engine_destroy(e);
        if (prof_tmp[0]) {
            unlink(prof_tmp);
        }
        uc_comm_destroy(comm);
        return 0;
    }
    struct uc_tokenizer *tok;
    if (uc_tokenizer_create(&tok, model) != UC_OK) {
        return 1;
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/models/uncomp-tiny/eval.json", o.shared);
    cJSON *ev = tu_json_load(path);
    char *hay = read_haystack(o.shared, cJSON_GetObjectItem(ev, "held_out_essays"));
    struct needle *needles;
    int64_t n_needles = make_needles(&o, tok, hay, cJSON_GetObjectItem(ev, "eval_keys"), &needles);
    /* held-out text for perplexity: from the far end of the haystack */
    int32_t *hay_ids = NULL;
    int64_t n_hay = 0;
    uc_tokenizer_encode(tok, hay, strlen(hay), false, &hay_ids, &n_hay);
    int64_t seg = o.ppl_prefix + o.ppl_tokens;
    int n_seg = o.ppl_segments;
    while (n_seg > 0 && (int64_t)n_seg * seg > n_hay) {
        n_seg--;
    }
    if (o.calib_text && calibrate(e, tok, o.calib_text, &o.kvsharer) != UC_OK) {
        return 1;
    }
    const struct uc_profile *prof = uc_engine_profile(e);
    if (!prof) {
        o.base.grouping = UC_GROUPING_PROMPT;
    }
    if (o.base.n_stage_starts == 0 && (!prof || prof->n_stage_starts == 0)) {
        o.base.n_stage_starts = 1;
        o.base.stage_starts[0] = (int32_t)(uc_engine_config(e)->n_layers * 3 / 4);
    }
    printf("# eval_compress model=%s needles=%lld (lengths x %d depths x %d trials) "
           "ppl=%d x (%d prefix + %d tokens) grouping=%s stages=",
           model, (long long)n_needles, o.n_depths, o.trials, n_seg, o.ppl_prefix, o.ppl_tokens,
           uc_grouping_name(o.base.grouping));
    const int32_t *starts = o.base.n_stage_starts ? o.base.stage_starts : prof->stage_starts;
    int32_t ns = o.base.n_stage_starts ? o.base.n_stage_starts : prof->n_stage_starts;
    for (int32_t i = 0; i < ns; i++) {
        printf("%s%d", i ? "," : "", starts[i]);
    }
    printf(" r_min=%.3f row_score=%s\n", (double)o.base.r_min,
           uc_row_score_name((enum uc_row_score)o.base.row_score));
    /* full-cache references for perplexity agreement */
    int64_t n_eval = (int64_t)n_seg * o.ppl_tokens;
    double *nll = uc_malloc((size_t)(n_eval + 1) * sizeof(double));
    int32_t *ref_arg = uc_malloc((size_t)(n_eval + 1) * sizeof(int32_t));
    int32_t *arg = uc_malloc((size_t)(n_eval + 1) * sizeof(int32_t));
    struct uc_compress_params full_spec = uc_compress_default_params();
    struct uc_compress_params full = params_for(&o, &full_spec, 0);
    for (int s = 0; s < n_seg; s++) {
        const int32_t *ids = hay_ids + n_hay - (int64_t)(s + 1) * seg;
        run_ppl(e, ids, o.ppl_prefix, o.ppl_tokens, &full, nll + s * o.ppl_tokens,
                ref_arg + s * o.ppl_tokens);
    }
    int n_res = 0;
    struct result *res = uc_calloc((size_t)(o.n_policies * o.n_budgets + 1), sizeof *res);
    FILE *csv = o.csv ? fopen(o.csv, "w") : NULL;
    if (csv) {
        fprintf(csv, "policy,budget,needle_acc,ppl,agreement,kv_ratio,kv_bytes_per_token,"
                "prefill_ms");
        for (int li = 0; li < o.n_lengths; li++) {
            fprintf(csv, ",acc_%lld", (long long)o.lengths[li]);
        }
        fprintf(csv, "\n");
    }
    printf("%-20s %6s %8s", "policy", "budget", "needle");
    for (int li = 0; li < o.n_lengths; li++) {
        printf(" %7lld", (long long)o.lengths[li]);
    }
    printf(" %8s %8s %9s %9s %11s\n", "ppl", "agree", "kv_ratio", "kvB/tok", "prefill_ms");
    for (int pi = 0; pi < o.n_policies; pi++) {
        bool budgeted = o.policies[pi].policy != UC_POLICY_FULL;
        int nb = budgeted ? o.n_budgets : 1;
        for (int bi = 0; bi < nb; bi++) {
            struct result *r = &res[n_res++];
            r->policy = o.policies[pi].policy;
            uc_policy_spec_name(&o.policies[pi], r->name, sizeof r->name);
            r->budget = budgeted ? o.budgets[bi] : 0;
            r->prefill_ms = uc_malloc((size_t)(n_needles + 1) * sizeof(double));
            struct uc_compress_params cp = params_for(&o, &o.policies[pi], r->budget);
            for (int64_t k = 0; k < n_needles; k++) {
                bool ok = run_needle(e, tok, &needles[k], &cp, r);
                r->hits += ok;
                r->total++;
                r->hits_len[needles[k].length] += ok;
                r->total_len[needles[k].length]++;
            }
            for (int s = 0; s < n_seg; s++) {
                const int32_t *ids = hay_ids + n_hay - (int64_t)(s + 1) * seg;
                run_ppl(e, ids, o.ppl_prefix, o.ppl_tokens, &cp, nll + s * o.ppl_tokens,
                        arg + s * o.ppl_tokens);
            }
            for (int64_t i = 0; i < n_eval; i++) {
                r->nll += nll[i];
                r->agree += arg[i] == ref_arg[i];
            }
            r->nll_n = n_eval;
            r->agree_n = n_eval;
            double acc = r->total ? 100.0 * (double)r->hits / (double)r->total : 0;
            double ppl = r->nll_n ? exp(r->nll / (double)r->nll_n) : 0;
            double agree = r->agree_n ? 100.0 * (double)r->agree / (double)r->agree_n : 0;
            double ratio = r->kv_n ? r->kv_ratio_sum / (double)r->kv_n : 0;
            double bpt = r->kv_n ? r->kv_bytes_tok_sum / (double)r->kv_n : 0;
            double pms = tu_median(r->prefill_ms, r->n_prefill);
            printf("%-20s %6d %7.1f%%", r->name, r->budget, acc);
            for (int li = 0; li < o.n_lengths; li++) {
                printf(" %6.0f%%", r->total_len[li] ? 100.0 * (double)r->hits_len[li] /
                                                          (double)r->total_len[li]
                                                    : 0.0);
            }
            printf(" %8.2f %7.1f%% %9.4f %9.0f %11.1f\n", ppl, agree, ratio, bpt, pms);
            fflush(stdout);
            if (csv) {
                fprintf(csv, "%s,%d,%.2f,%.4f,%.2f,%.5f,%.1f,%.1f", r->name, r->budget, acc, ppl,
                        agree, ratio, bpt, pms);
                for (int li = 0; li < o.n_lengths; li++) {
                    fprintf(csv, ",%.2f", r->total_len[li] ? 100.0 * (double)r->hits_len[li] /
                                                                 (double)r->total_len[li]
                                                           : 0.0);
                }
                fprintf(csv, "\n");
            }
        }
    }
    int code = 0;
    if (o.check) {
        double a_full = -1, a_snap = -1, a_unc = -1;
        for (int i = 0; i < n_res; i++) {
            double a = 100.0 * (double)res[i].hits / (double)(res[i].total ? res[i].total : 1);
            if (strchr(res[i].name, '+') || strstr(res[i].name, "kvsharer")) {
                continue; /* the gate compares the token policies alone */
            }
            if (res[i].policy == UC_POLICY_FULL) {
                a_full = a;
            } else if (res[i].policy == UC_POLICY_SNAPKV && res[i].budget == 128) {
                a_snap = a;
            } else if (res[i].policy == UC_POLICY_UNCOMP && res[i].budget == 128) {
                a_unc = a;
            }
        }
        bool ok = a_full >= 0 && a_snap >= 0 && a_unc >= 0 && a_unc >= a_snap &&
                  a_unc >= a_full - 5.0;
        printf("check: full=%.1f%% snapkv@128=%.1f%% uncomp@128=%.1f%%: %s\n", a_full, a_snap,
               a_unc, ok ? "PASSED" : "FAILED");
        code = ok ? 0 : 1;
    }
    if (csv) {
        fclose(csv);
    }
    for (int i = 0; i < n_res; i++) {
        uc_free(res[i].prefill_ms);
    }
    for (int64_t k = 0; k < n_needles; k++) {
        uc_free(needles[k].ids);
    }
    uc_free(res);
    uc_free(needles);
    uc_free(nll);
    uc_free(ref_arg);
    uc_free(arg);
    uc_free(hay_ids);
    uc_free(hay);
    cJSON_Delete(ev);
    uc_tokenizer_destroy(tok);
    uc_engine_shutdown(e);
    uc_engine_destroy(e);
    if (prof_tmp[0]) {
        unlink(prof_tmp);
    }
    uc_comm_destroy(comm);
    return code;
}
