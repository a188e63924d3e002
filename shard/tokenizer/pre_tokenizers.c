/* Pre-tokenizers: parsing (ByteLevel, Split, Metaspace, Digits, Punctuation, Whitespace,
 * WhitespaceSplit, Sequence) and splitting normalized text into pre-token words. */
#include "tokenizer_impl.h"

static struct pre *pre_add(struct uc_tokenizer *tok, enum pre_kind kind)
{
    bool ok = true;
    tok->pres = tok_grow_array(tok->pres, &tok->cap_pres, tok->n_pres + 1, sizeof *tok->pres, &ok);
    if (!ok) {
        return NULL;
    }
    struct pre *p = &tok->pres[tok->n_pres++];
    memset(p, 0, sizeof *p);
    p->kind = kind;
    return p;
}

void tok_pres_clear(struct uc_tokenizer *tok)
{
    for (int64_t i = 0; i < tok->n_pres; i++) {
        tok_pattern_fini(&tok->pres[i].pat);
    }
    tok->n_pres = 0;
}

static uc_status parse_behavior(const cJSON *p, const char *path, const char *field,
                                enum split_behavior *out)
{
    static const struct {
        const char *name;
        enum split_behavior b;
    } names[] = {
        {"Removed", SPLIT_REMOVED},
        {"Isolated", SPLIT_ISOLATED},
        {"MergedWithPrevious", SPLIT_MERGED_PREV},
        {"MergedWithNext", SPLIT_MERGED_NEXT},
        {"Contiguous", SPLIT_CONTIGUOUS},
    };
    const char *s = tok_jstr(p, "behavior");
    for (size_t i = 0; s && i < sizeof names / sizeof *names; i++) {
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].b;
            return UC_OK;
        }
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.behavior value=%s", path, field,
                   s ? s : "(missing)");
}

uc_status tok_parse_pre_tokenizer(struct uc_tokenizer *tok, const cJSON *p, const char *path,
                                  const char *field, int depth)
{
    const char *type;
    uc_status trc = tok_component_type(p, path, field, depth, &type);
    if (trc != UC_OK || !type) {
        return trc;
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
        if (!cJSON_IsArray(arr)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.pretokenizers not an array", path,
                           field);
        }
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, arr)
        {
            char sub[192];
            snprintf(sub, sizeof sub, "%s.pretokenizers[%d]", field, i++);
            uc_status rc = tok_parse_pre_tokenizer(tok, it, path, sub, depth + 1);
            if (rc != UC_OK) {
                return rc;
            }
        }
        return UC_OK;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        struct pre *pr = pre_add(tok, PRE_BYTE_LEVEL);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        pr->add_prefix_space = tok_jbool(p, "add_prefix_space", true);
        pr->use_regex = tok_jbool(p, "use_regex", true);
        if (pr->use_regex && !tok->re_gpt2) {
            return tok_regex_compile(tok, GPT2_REGEX, strlen(GPT2_REGEX), path, field,
                                     &tok->re_gpt2);
        }
        return UC_OK;
    }
    if (strcmp(type, "Split") == 0) {
        struct pre *pr = pre_add(tok, PRE_SPLIT);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        pr->invert = tok_jbool(p, "invert", false);
        uc_status rc = parse_behavior(p, path, field, &pr->behavior);
        return rc != UC_OK ? rc : tok_parse_pattern(tok, p, path, field, &pr->pat);
    }
    if (strcmp(type, "Digits") == 0) {
        /* Digits is a split on each numeric character: Isolated keeps them one per piece,
         * Contiguous keeps runs. */
        struct pre *pr = pre_add(tok, PRE_SPLIT);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        pr->behavior = tok_jbool(p, "individual_digits", false) ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS;
        return tok_regex_compile(tok, "\\p{N}", strlen("\\p{N}"), path, field, &pr->pat.re);
    }
    if (strcmp(type, "Whitespace") == 0 || strcmp(type, "WhitespaceSplit") == 0 ||
        strcmp(type, "Punctuation") == 0) {
        /* Whitespace keeps runs of word characters and runs of other non-spaces (a split on
         * \w+|[^\w\s]+, inverted and Removed); WhitespaceSplit removes whitespace; Punctuation
         * splits on each punctuation character (Unicode P or ASCII punctuation) */
        static const char ws_re[] = "[" RUST_WORD "]+|[^" RUST_WORD "\\s\\x{85}]+";
        static const char wss_re[] = "[\\s\\x{85}]+";
        static const char punct_re[] = "[\\p{P}\\x21-\\x2F\\x3A-\\x40\\x5B-\\x60\\x7B-\\x7E]";
        struct pre *pr = pre_add(tok, PRE_SPLIT);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        const char *re = wss_re;
        pr->behavior = SPLIT_REMOVED;
        if (type[0] == 'P') {
            re = punct_re;
            pr->behavior = SPLIT_ISOLATED;
            if (tok_jstr(p, "behavior")) {
                uc_status rc = parse_behavior(p, path, field, &pr->behavior);
                if (rc != UC_OK) {
                    return rc;
                }
            }
        } else if (strcmp(type, "Whitespace") == 0) {
            re = ws_re;
            pr->invert = true;
        }
        return tok_regex_compile(tok, re, strlen(re), path, field, &pr->pat.re);
    }
    if (strcmp(type, "Metaspace") == 0) {
        struct pre *pr = pre_add(tok, PRE_METASPACE);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        char ch[5];
        size_t n;
        uc_status rc = tok_parse_char(p, "replacement", METASPACE, path, field, ch, &n);
        if (rc != UC_OK) {
            return rc;
        }
        if (!(pr->pat.lit = uc_strndup(ch, n))) {
            return NOMEM_FIELD(path, field);
        }
        pr->pat.lit_len = n;
        pr->split = tok_jbool(p, "split", true);
        return tok_parse_scheme(p, path, field, &pr->scheme);
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.type value=%s (supported: Sequence, "
                   "ByteLevel, Split, Metaspace, Digits, Whitespace, WhitespaceSplit, Punctuation)", path,
                   field, type);
}

/* Appends s[0..n) mapped through GPT-2's bytes_to_unicode. */
static void append_byte_level(const struct uc_tokenizer *tok, struct uc_buf *b, const char *s,
                              size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        uc_buf_append(b, tok->b2u[c], tok->b2u_len[c]);
    }
}

/* Applies one pre-tokenizer to one piece p[0..n), appending the resulting pieces to out. */
static uc_status pre_piece(const struct uc_tokenizer *tok, struct enc_ws *ws, const struct pre *pr,
                           const char *p, size_t n, bool first, struct plist *out)
{
    uc_status rc = UC_OK;
    const char *w = p;
    size_t wn = n;
    switch (pr->kind) {
    case PRE_BYTE_LEVEL:
        if (pr->add_prefix_space && (n == 0 || p[0] != ' ')) {
            ws->tmp.len = 0;
            uc_buf_append(&ws->tmp, " ", 1);
            uc_buf_append(&ws->tmp, p, n);
            if (ws->tmp.oom) {
                return UC_ERRF(UC_ERR_NOMEM, "pre-tokenize bytes=%zu", n);
            }
            w = ws->tmp.data;
            wn = ws->tmp.len;
        }
        if (!pr->use_regex) {
            size_t off = out->text.len;
            append_byte_level(tok, &out->text, w, wn);
            tok_plist_end(out, off, first);
            return UC_OK;
        }
        rc = tok_find_spans(tok, NULL, tok->re_gpt2, w, wn, ws->md, true, &ws->spans);
        for (int64_t k = 0; rc == UC_OK && k < ws->spans.n; k++) {
            const struct span *sp = &ws->spans.v[k];
            size_t off = out->text.len;
            append_byte_level(tok, &out->text, w + sp->s, sp->e - sp->s);
            tok_plist_end(out, off, first && sp->s == 0);
        }
        return rc;
    case PRE_METASPACE: {
        ws->tmp.len = 0;
        bool starts = n >= pr->pat.lit_len && memcmp(p, pr->pat.lit, pr->pat.lit_len) == 0;
        starts = starts || (n > 0 && p[0] == ' ');
        if (!starts && (pr->scheme == PREPEND_ALWAYS || (pr->scheme == PREPEND_FIRST && first))) {
            uc_buf_append(&ws->tmp, pr->pat.lit, pr->pat.lit_len);
        }
        size_t run = 0;
        for (size_t i = 0; i < n; i++) {
            if (p[i] == ' ') {
                uc_buf_append(&ws->tmp, p + run, i - run);
                uc_buf_append(&ws->tmp, pr->pat.lit, pr->pat.lit_len);
                run = i + 1;
            }
        }
        uc_buf_append(&ws->tmp, p + run, n - run);
        if (ws->tmp.oom) {
            return UC_ERRF(UC_ERR_NOMEM, "pre-tokenize bytes=%zu", n);
        }
        w = ws->tmp.data;
        wn = ws->tmp.len;
        if (!pr->split) {
            size_t off = out->text.len;
            uc_buf_append(&out->text, w, wn);
            tok_plist_end(out, off, first);
            return UC_OK;
        }
        rc = tok_find_spans(tok, &pr->pat, NULL, w, wn, ws->md, true, &ws->spans);
        if (rc == UC_OK) {
            tok_apply_behavior(SPLIT_MERGED_NEXT, false, &ws->spans, &ws->keep);
        }
        break;
    }
    case PRE_SPLIT:
        rc = tok_find_spans(tok, &pr->pat, NULL, w, wn, ws->md, true, &ws->spans);
        if (rc == UC_OK) {
            tok_apply_behavior(pr->behavior, pr->invert, &ws->spans, &ws->keep);
        }
        break;
    }
    for (int64_t k = 0; rc == UC_OK && k < ws->keep.n; k++) {
        const struct span *sp = &ws->keep.v[k];
        size_t off = out->text.len;
        uc_buf_append(&out->text, w + sp->s, sp->e - sp->s);
        tok_plist_end(out, off, first && sp->s == 0);
    }
    if (rc == UC_OK && ws->keep.oom) {
        rc = UC_ERRF(UC_ERR_NOMEM, "pre-tokenizer pieces");
    }
    return rc;
}

/* Runs the pre-tokenizers; *res holds the pieces (owned by the workspace). */
uc_status tok_pre_tokenize(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                           size_t n, bool first, struct plist **res)
{
    struct plist *in = &ws->pa, *out = &ws->pb;
    tok_plist_clear(in);
    uc_buf_append(&in->text, s, n);
    tok_plist_end(in, 0, first);
    for (int64_t i = 0; i < tok->n_pres; i++) {
        tok_plist_clear(out);
        for (int64_t k = 0; k < in->n; k++) {
            const struct piece *pc = &in->p[k];
            uc_status rc =
                pre_piece(tok, ws, &tok->pres[i], in->text.data + pc->off, pc->len, pc->first, out);
            if (rc != UC_OK) {
                return rc;
            }
        }
        struct plist *t = in;
        in = out;
        out = t;
    }
    if (in->oom || in->text.oom || ws->tmp.oom) {
        return UC_ERRF(UC_ERR_NOMEM, "pre-tokenize bytes=%zu", n);
    }
    *res = in;
    return UC_OK;
}
