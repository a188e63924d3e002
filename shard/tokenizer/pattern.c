/* Patterns of tokenizer.json ({"String": literal} or {"Regex": source}): PCRE2 with uc_malloc,
 * the spans a pattern splits text into, and the library's split behaviours. */
#include "tokenizer_impl.h"

void *tok_pcre_alloc(PCRE2_SIZE n, void *user)
{
    (void)user;
    return uc_malloc(n);
}

void tok_pcre_release(void *p, void *user)
{
    (void)user;
    uc_free(p);
}

uc_status tok_regex_compile(struct uc_tokenizer *tok, const char *src, size_t len,
                            const char *path, const char *field, pcre2_code **out)
{
    int err = 0;
    PCRE2_SIZE at = 0;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)src, len, PCRE2_UTF | PCRE2_UCP, &err, &at,
                                   tok->cctx);
    if (!re && err == PCRE2_ERROR_HEAP_FAILED) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s field=%s regex", path, field);
    }
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s regex=\"%.*s\" error at %zu: %s", path,
                       field, (int)(len < 200 ? len : 200), src, (size_t)at, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter runs it otherwise */
    *out = re;
    return UC_OK;
}

/* Next match of re in s[0..n) at or after `from`. `checked`: s is known to be valid UTF-8. An
 * invalid subject (possible only in decoders) counts as no match. */
uc_status tok_regex_next(const struct uc_tokenizer *tok, const pcre2_code *re, const char *s,
                         size_t n, size_t from, pcre2_match_data *md, bool checked, size_t *ms,
                         size_t *me, bool *found)
{
    uint32_t opts = checked ? PCRE2_NO_UTF_CHECK : 0;
    int rc = pcre2_match(re, (PCRE2_SPTR)s, n, from, opts, md, tok->mctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        rc = pcre2_match(re, (PCRE2_SPTR)s, n, from, opts | PCRE2_NO_JIT, md, tok->mctx);
    }
    *found = false;
    bool bad_utf8 = rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21;
    if (rc == PCRE2_ERROR_NOMATCH || bad_utf8) {
        return UC_OK;
    }
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return UC_ERRF(rc == PCRE2_ERROR_NOMEMORY ? UC_ERR_NOMEM : UC_ERR_INTERNAL,
                       "regex match failed: %s", (const char *)msg);
    }
    const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    *ms = ov[0];
    *me = ov[1] < ov[0] ? ov[0] : ov[1];
    *found = true;
    return UC_OK;
}

static const char *find_literal(const char *s, size_t n, const char *lit, size_t m)
{
    if (m == 0 || m > n) {
        return NULL;
    }
    const char *end = s + (n - m);
    for (const char *p = s; p <= end; p++) {
        p = memchr(p, lit[0], (size_t)(end - p) + 1);
        if (!p) {
            return NULL;
        }
        if (memcmp(p, lit, m) == 0) {
            return p;
        }
    }
    return NULL;
}

/* Splits s[0..n) into matches and the gaps between them, covering all of it (the reference
 * Pattern::find_matches). */
uc_status tok_find_spans(const struct uc_tokenizer *tok, const struct pattern *p,
                         const pcre2_code *re, const char *s, size_t n, pcre2_match_data *md,
                         bool checked, struct svec *out)
{
    out->n = 0;
    size_t prev = 0, pos = 0;
    if (!re) {
        re = p->re;
    }
    while (pos <= n) {
        size_t ms, me;
        if (re) {
            bool found;
            uc_status rc = tok_regex_next(tok, re, s, n, pos, md, checked, &ms, &me, &found);
            if (rc != UC_OK) {
                return rc;
            }
            if (!found) {
                break;
            }
        } else {
            const char *hit = find_literal(s + pos, n - pos, p->lit, p->lit_len);
            if (!hit) {
                break;
            }
            ms = (size_t)(hit - s);
            me = ms + p->lit_len;
        }
        if (prev != ms) {
            tok_svec_push(out, prev, ms, false);
        }
        tok_svec_push(out, ms, me, true);
        prev = me;
        if (me == ms) {
            if (me >= n) {
                break;
            }
            pos = me + tok_utf8_lead_len((unsigned char)s[me]);
        } else {
            pos = me;
        }
    }
    if (prev != n) {
        tok_svec_push(out, prev, n, false);
    }
    return out->oom ? UC_ERRF(UC_ERR_NOMEM, "spans=%lld", (long long)out->n) : UC_OK;
}

/* Applies a split behaviour to find_spans output (the reference NormalizedString::split): the
 * pieces to keep, in order, in out (their m is unused). */
void tok_apply_behavior(enum split_behavior b, bool invert, const struct svec *in,
                        struct svec *out)
{
    out->n = 0;
    bool prev = false;
    if (b == SPLIT_MERGED_NEXT) {
        for (int64_t i = in->n - 1; i >= 0; i--) {
            bool m = in->v[i].m != invert;
            if (m && !prev && out->n > 0) {
                out->v[out->n - 1].s = in->v[i].s;
            } else {
                tok_svec_push(out, in->v[i].s, in->v[i].e, false);
            }
            prev = m;
        }
        for (int64_t i = 0, j = out->n - 1; i < j; i++, j--) {
            struct span t = out->v[i];
            out->v[i] = out->v[j];
            out->v[j] = t;
        }
        return;
    }
    for (int64_t i = 0; i < in->n; i++) {
        bool m = in->v[i].m != invert;
        switch (b) {
        case SPLIT_REMOVED:
            if (!m) {
                tok_svec_push(out, in->v[i].s, in->v[i].e, false);
            }
            break;
        case SPLIT_ISOLATED:
            tok_svec_push(out, in->v[i].s, in->v[i].e, false);
            break;
        case SPLIT_MERGED_PREV:
            if (m && !prev && out->n > 0) {
                out->v[out->n - 1].e = in->v[i].e;
            } else {
                tok_svec_push(out, in->v[i].s, in->v[i].e, false);
            }
            break;
        case SPLIT_CONTIGUOUS:
            if (m == prev && out->n > 0) {
                out->v[out->n - 1].e = in->v[i].e;
            } else {
                tok_svec_push(out, in->v[i].s, in->v[i].e, false);
            }
            break;
        case SPLIT_MERGED_NEXT:
            break;
        }
        prev = m;
    }
}

void tok_pattern_fini(struct pattern *p)
{
    UC_FREE(p->lit);
    pcre2_code_free(p->re);
    p->re = NULL;
}

uc_status tok_parse_pattern(struct uc_tokenizer *tok, const cJSON *obj, const char *path,
                            const char *field, struct pattern *out)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(obj, "pattern");
    const char *lit = tok_jstr(p, "String");
    const char *re = tok_jstr(p, "Regex");
    if (lit && lit[0] != '\0') {
        out->lit = uc_strdup(lit);
        if (!out->lit) {
            return UC_ERRF(UC_ERR_NOMEM, "file=%s field=%s.pattern", path, field);
        }
        out->lit_len = strlen(lit);
        return UC_OK;
    }
    if (re) {
        char f[192];
        snprintf(f, sizeof f, "%s.pattern.Regex", field);
        return tok_regex_compile(tok, re, strlen(re), path, f, &out->re);
    }
    return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.pattern must be a non-empty String or a Regex",
                   path, field);
}
