/* Normalizers: parsing (Prepend, Replace, Strip, NFC/NFD/NFKC/NFKD, Lowercase, Sequence) and
 * applying them (the Unicode forms through utf8proc). */
#include "tokenizer_impl.h"

static struct norm *norm_add(struct uc_tokenizer *tok, enum norm_kind kind)
{
    bool ok = true;
    tok->norms =
        tok_grow_array(tok->norms, &tok->cap_norms, tok->n_norms + 1, sizeof *tok->norms, &ok);
    if (!ok) {
        return NULL;
    }
    struct norm *n = &tok->norms[tok->n_norms++];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    return n;
}

void tok_norms_clear(struct uc_tokenizer *tok)
{
    for (int64_t i = 0; i < tok->n_norms; i++) {
        tok_pattern_fini(&tok->norms[i].pat);
        UC_FREE(tok->norms[i].str);
    }
    tok->n_norms = 0;
}

uc_status tok_parse_normalizer(struct uc_tokenizer *tok, const cJSON *n, const char *path,
                               const char *field, int depth)
{
    const char *type;
    uc_status trc = tok_component_type(n, path, field, depth, &type);
    if (trc != UC_OK || !type) {
        return trc;
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(n, "normalizers");
        if (!cJSON_IsArray(arr)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.normalizers not an array", path, field);
        }
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, arr)
        {
            char sub[192];
            snprintf(sub, sizeof sub, "%s.normalizers[%d]", field, i++);
            uc_status rc = tok_parse_normalizer(tok, it, path, sub, depth + 1);
            if (rc != UC_OK) {
                return rc;
            }
        }
        return UC_OK;
    }
    if (strcmp(type, "Prepend") == 0) {
        const char *s = tok_jstr(n, "prepend");
        if (!s) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.prepend missing", path, field);
        }
        struct norm *nm = norm_add(tok, NORM_PREPEND);
        if (!nm || !(nm->str = uc_strdup(s))) {
            return NOMEM_FIELD(path, field);
        }
        nm->str_len = strlen(s);
        return UC_OK;
    }
    if (strcmp(type, "Replace") == 0) {
        const char *content = tok_jstr(n, "content");
        if (!content) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.content missing", path, field);
        }
        struct norm *nm = norm_add(tok, NORM_REPLACE);
        if (!nm || !(nm->str = uc_strdup(content))) {
            return NOMEM_FIELD(path, field);
        }
        nm->str_len = strlen(content);
        return tok_parse_pattern(tok, n, path, field, &nm->pat);
    }
    static const struct {
        const char *name;
        enum norm_kind kind;
    } simple[] = {
        {"NFC", NORM_NFC},   {"NFD", NORM_NFD},   {"NFKC", NORM_NFKC},
        {"NFKD", NORM_NFKD}, {"Lowercase", NORM_LOWERCASE},
    };
    for (size_t i = 0; i < sizeof simple / sizeof *simple; i++) {
        if (strcmp(type, simple[i].name) == 0) {
            return norm_add(tok, simple[i].kind) ? UC_OK : NOMEM_FIELD(path, field);
        }
    }
    if (strcmp(type, "Strip") == 0) {
        struct norm *nm = norm_add(tok, NORM_STRIP);
        if (!nm) {
            return NOMEM_FIELD(path, field);
        }
        nm->left = tok_jbool(n, "strip_left", true);
        nm->right = tok_jbool(n, "strip_right", true);
        return UC_OK;
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.type value=%s (supported: Sequence, "
                   "Prepend, Replace, Strip, NFC, NFD, NFKC, NFKD, Lowercase)", path, field, type);
}

/* True when s[0..n) is all ASCII (which every normal form and NFC leaves as it is). */
static bool all_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)s[i] >= 0x80) {
            return false;
        }
    }
    return true;
}

/* NFC, NFD, NFKC or NFKD of s[0..n) (valid UTF-8) into dst, by utf8proc. *changed is false
 * (and dst untouched) when the text is ASCII, which no normal form changes. */
static uc_status unicode_normalize(enum norm_kind kind, const char *s, size_t n,
                                   struct uc_buf *dst, bool *changed)
{
    *changed = false;
    if (all_ascii(s, n)) {
        return UC_OK;
    }
    int opts = UTF8PROC_STABLE;
    opts |= kind == NORM_NFC || kind == NORM_NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
    if (kind == NORM_NFKC || kind == NORM_NFKD) {
        opts |= UTF8PROC_COMPAT;
    }
    utf8proc_uint8_t *res = NULL;
    utf8proc_ssize_t k = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &res,
                                      (utf8proc_option_t)opts);
    if (k < 0) {
        /* the input was checked to be valid UTF-8, so only memory can run out */
        return UC_ERRF(k == UTF8PROC_ERROR_NOMEM ? UC_ERR_NOMEM : UC_ERR_INVALID_ARG,
                       "normalizer: utf8proc: %s (bytes=%zu)", utf8proc_errmsg(k), n);
    }
    dst->len = 0;
    uc_buf_append(dst, res, (size_t)k);
    free(res); /* utf8proc allocates with malloc */
    *changed = true;
    return UC_OK;
}

/* Lowercase, as Rust's char::to_lowercase per character (the library's NormalizedString::
 * lowercase): utf8proc's simple mapping, plus U+0130, the one character whose full lowercase
 * is two characters (i + U+0307). */
static void lowercase(const char *s, size_t n, struct uc_buf *dst)
{
    dst->len = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        bool ok;
        size_t k = tok_utf8_scan((const unsigned char *)s + i, n - i, &cp, &ok);
        if (cp < 0x80) {
            char c = (char)(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
            uc_buf_append(dst, &c, 1);
        } else if (cp == 0x130) {
            uc_buf_append(dst, "i\xCC\x87", 3);
        } else {
            char enc[4];
            size_t m = tok_utf8_encode((uint32_t)utf8proc_tolower((utf8proc_int32_t)cp), enc);
            uc_buf_append(dst, enc, m);
        }
        i += k;
    }
}

/* Runs the normalizers over s[0..n); *out points into the workspace or into s. */
uc_status tok_normalize(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                        size_t n, const char **out, size_t *out_len)
{
    const char *cur = s;
    size_t len = n;
    bool in_na = false; /* cur points into ws->na (else into s or ws->nb) */
    for (int64_t i = 0; i < tok->n_norms; i++) {
        const struct norm *nm = &tok->norms[i];
        struct uc_buf *dst = in_na ? &ws->nb : &ws->na;
        switch (nm->kind) {
        case NORM_PREPEND:
            if (len == 0) {
                continue;
            }
            dst->len = 0;
            uc_buf_append(dst, nm->str, nm->str_len);
            uc_buf_append(dst, cur, len);
            break;
        case NORM_REPLACE: {
            uc_status rc = tok_find_spans(tok, &nm->pat, NULL, cur, len, ws->md, true, &ws->spans);
            if (rc != UC_OK) {
                return rc;
            }
            if (ws->spans.n <= 1 && (ws->spans.n == 0 || !ws->spans.v[0].m)) {
                continue; /* nothing to replace */
            }
            dst->len = 0;
            for (int64_t k = 0; k < ws->spans.n; k++) {
                const struct span *sp = &ws->spans.v[k];
                if (sp->m) {
                    uc_buf_append(dst, nm->str, nm->str_len);
                } else {
                    uc_buf_append(dst, cur + sp->s, sp->e - sp->s);
                }
            }
            break;
        }
        case NORM_STRIP: {
            size_t a = nm->left ? tok_white_prefix(cur, len) : 0;
            size_t b = nm->right ? tok_white_suffix_start(cur, len) : len;
            cur += a;
            len = b > a ? b - a : 0;
            continue;
        }
        case NORM_NFC:
        case NORM_NFD:
        case NORM_NFKC:
        case NORM_NFKD: {
            bool changed = false;
            uc_status rc = unicode_normalize(nm->kind, cur, len, dst, &changed);
            if (rc != UC_OK) {
                return rc;
            }
            if (!changed) {
                continue;
            }
            break;
        }
        case NORM_LOWERCASE:
            lowercase(cur, len, dst);
            break;
        }
        if (dst->oom) {
            return UC_ERRF(UC_ERR_NOMEM, "normalize bytes=%zu", len);
        }
        cur = dst->data;
        len = dst->len;
        in_na = dst == &ws->na;
    }
    *out = cur;
    *out_len = len;
    return UC_OK;
}
