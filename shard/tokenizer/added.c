/* Added tokens: loading them, their leftmost-longest matching sets (raw and normalized), the
 * split of the text on them (lstrip, rstrip, single_word) and the encode pipeline between them. */
#include "tokenizer_impl.h"

struct added_sort {
    unsigned char first;
    size_t len;
    int32_t idx;
};

static int added_cmp(const void *pa, const void *pb)
{
    const struct added_sort *a = pa, *b = pb;
    if (a->first != b->first) {
        return a->first < b->first ? -1 : 1;
    }
    if (a->len != b->len) {
        return a->len > b->len ? -1 : 1; /* longest first */
    }
    return a->idx < b->idx ? -1 : a->idx > b->idx;
}

/* Builds one matching set from the added tokens whose `normalized` flag is `normalized`. */
static uc_status build_added_set(struct uc_tokenizer *tok, bool normalized, struct added_set *set)
{
    int64_t n = tok->n_added;
    set->order = uc_malloc(((size_t)n + 1) * sizeof *set->order);
    struct added_sort *srt = uc_malloc(((size_t)n + 1) * sizeof *srt);
    if (!set->order || !srt) {
        uc_free(srt);
        return UC_ERRF(UC_ERR_NOMEM, "added_tokens=%lld", (long long)n);
    }
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const struct added *a = &tok->added[i];
        const char *c = normalized ? a->ncontent : a->content;
        size_t len = normalized ? a->nlen : a->len;
        if (a->normalized == normalized && len > 0) {
            srt[k++] = (struct added_sort){.first = (unsigned char)c[0], .len = len,
                                           .idx = (int32_t)i};
        }
    }
    qsort(srt, (size_t)k, sizeof *srt, added_cmp);
    memset(set->first, 0, sizeof set->first);
    for (int64_t i = 0; i < k; i++) {
        set->order[i] = srt[i].idx;
        set->first[srt[i].first + 1]++;
    }
    for (int b = 0; b < 256; b++) {
        set->first[b + 1] += set->first[b];
    }
    uc_free(srt);
    return UC_OK;
}

uc_status tok_load_added(struct uc_tokenizer *tok, const cJSON *arr, const char *path)
{
    int64_t n = cJSON_GetArraySize(arr);
    tok->added = uc_calloc((size_t)n + 1, sizeof *tok->added);
    tok->added_idx = uc_malloc((size_t)tok->n_vocab * sizeof *tok->added_idx);
    if (!tok->added || !tok->added_idx) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s added_tokens=%lld", path, (long long)n);
    }
    memset(tok->added_idx, 0xff, (size_t)tok->n_vocab * sizeof *tok->added_idx);
    const cJSON *it;
    int i = 0;
    cJSON_ArrayForEach(it, arr)
    {
        int64_t id = 0;
        (void)tok_jint(cJSON_GetObjectItemCaseSensitive(it, "id"), 0, MAX_TOKEN_ID, &id);
        const char *content = tok_jstr(it, "content");
        struct added *a = &tok->added[tok->n_added];
        if (!(a->content = uc_strdup(content))) {
            return UC_ERRF(UC_ERR_NOMEM, "file=%s added_tokens", path);
        }
        a->len = strlen(content);
        /* the library gives a token the model's vocabulary already holds the model's id */
        int32_t vid = tok_vocab_find(tok, content, a->len);
        if (vid >= 0 && vid != id) {
            UC_LOG_WARN("tokenizer: file=%s added_tokens[%d] \"%.64s\" has id %lld but the "
                        "vocabulary gives it %d; using %d, as the tokenizers library does", path,
                        i, content, (long long)id, vid, vid);
            id = vid;
        }
        a->id = (int32_t)id;
        a->special = tok_jbool(it, "special", false);
        a->lstrip = tok_jbool(it, "lstrip", false);
        a->rstrip = tok_jbool(it, "rstrip", false);
        a->single_word = tok_jbool(it, "single_word", false);
        a->normalized = tok_jbool(it, "normalized", !a->special); /* the library's default */
        tok->any_single_word |= a->single_word;
        tok->added_idx[id] = (int32_t)tok->n_added;
        tok->n_added++;
        i++;
    }
    return build_added_set(tok, false, &tok->raw_set);
}

static bool is_word_char(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                         size_t n)
{
    if (n == 1) {
        unsigned char c = (unsigned char)s[0];
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               c == '_';
    }
    size_t ms, me;
    bool found = false;
    (void)tok_regex_next(tok, tok->re_word, s, n, 0, ws->md, true, &ms, &me, &found);
    return found;
}

/* single_word: the token may not touch a word character on either side. */
static bool single_word_ok(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                           size_t n, size_t start, size_t stop)
{
    if (start > 0) {
        size_t p = start - 1;
        while (p > 0 && ((unsigned char)s[p] & 0xC0) == 0x80) {
            p--;
        }
        if (is_word_char(tok, ws, s + p, start - p)) {
            return false;
        }
    }
    if (stop < n && is_word_char(tok, ws, s + stop, tok_utf8_lead_len((unsigned char)s[stop]))) {
        return false;
    }
    return true;
}

/* Normalized text between added tokens: pre-tokenize and run BPE. */
static uc_status encode_normalized(const struct uc_tokenizer *tok, struct enc_ws *ws,
                                   const char *s, size_t n, bool first, struct ivec *out)
{
    if (n == 0) {
        return UC_OK;
    }
    struct plist *pl = NULL;
    uc_status rc = tok_pre_tokenize(tok, ws, s, n, first, &pl);
    for (int64_t i = 0; rc == UC_OK && i < pl->n; i++) {
        rc = tok_bpe_word(tok, ws, pl->text.data + pl->p[i].off, pl->p[i].len, out);
    }
    return rc;
}

static uc_status split_added(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *text,
                             size_t len, bool normalized, bool first, struct ivec *out);

/* Raw text between non-normalized added tokens: tok_normalize, then split on normalized ones. */
static uc_status encode_segment(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                                size_t n, bool first, struct ivec *out)
{
    const char *ns = NULL;
    size_t nn = 0;
    uc_status rc = tok_normalize(tok, ws, s, n, &ns, &nn);
    if (rc != UC_OK || nn == 0) {
        return rc;
    }
    if (tok->norm_set.first[256] == 0) {
        return encode_normalized(tok, ws, ns, nn, first, out);
    }
    /* the normalized text lives in the workspace's normalizer buffers, which nothing below
     * writes (pre-tokenizers and BPE use others) */
    return split_added(tok, ws, ns, nn, true, first, out);
}

/* Splits text on one set of added tokens, as the library's AddedVocabulary::find_matches does:
 * leftmost-longest matches, left to right without overlap; a single_word token touching a word
 * character is dropped (the scan goes on after it); lstrip/rstrip take the whitespace beside
 * the token. The stretches between go to encode_segment (raw text) or encode_normalized. */
static uc_status split_added(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *text,
                             size_t len, bool normalized, bool first, struct ivec *out)
{
    const struct added_set *set = normalized ? &tok->norm_set : &tok->raw_set;
    size_t seg = 0, pos = 0;
    while (pos < len && set->first[256] > 0) {
        unsigned char b = (unsigned char)text[pos];
        const struct added *hit = NULL;
        size_t hit_len = 0;
        for (int64_t k = set->first[b]; k < set->first[b + 1]; k++) {
            const struct added *a = &tok->added[set->order[k]];
            const char *c = normalized ? a->ncontent : a->content;
            size_t cl = normalized ? a->nlen : a->len;
            if (cl <= len - pos && memcmp(text + pos, c, cl) == 0) {
                hit = a;
                hit_len = cl;
                break;
            }
        }
        if (!hit) {
            pos += tok_utf8_lead_len(b);
            continue;
        }
        size_t start = pos, stop = pos + hit_len;
        if (hit->single_word && !single_word_ok(tok, ws, text, len, start, stop)) {
            pos = stop; /* discarded; the next match starts after it */
            continue;
        }
        if (hit->lstrip) {
            start = seg + tok_white_suffix_start(text + seg, start - seg);
        }
        if (hit->rstrip) {
            stop += tok_white_prefix(text + stop, len - stop);
        }
        if (seg < start) {
            uc_status rc = normalized
                               ? encode_normalized(tok, ws, text + seg, start - seg,
                                                   first && seg == 0, out)
                               : encode_segment(tok, ws, text + seg, start - seg, seg == 0, out);
            if (rc != UC_OK) {
                return rc;
            }
        }
        tok_ivec_push(out, hit->id);
        seg = pos = stop;
    }
    if (seg < len) {
        return normalized ? encode_normalized(tok, ws, text + seg, len - seg, first && seg == 0,
                                              out)
                          : encode_segment(tok, ws, text + seg, len - seg, seg == 0, out);
    }
    return UC_OK;
}

/* Splits the raw text on added tokens and encodes the rest. */
uc_status tok_encode_text(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *text,
                          size_t len, struct ivec *out)
{
    return split_added(tok, ws, text, len, false, true, out);
}

/* The normalized added tokens are matched in normalized text, so their content is normalized
 * once here (the library's refresh_added_tokens); then their matching set is built. */
uc_status tok_normalize_added(struct uc_tokenizer *tok, const char *path)
{
    struct enc_ws ws = {0};
    uc_status rc = UC_OK;
    ws.md = pcre2_match_data_create(1, tok->gctx);
    if (!ws.md) {
        rc = UC_ERRF(UC_ERR_NOMEM, "file=%s match data", path);
        goto out;
    }
    for (int64_t i = 0; i < tok->n_added; i++) {
        struct added *a = &tok->added[i];
        if (!a->normalized) {
            continue;
        }
        const char *ns = NULL;
        size_t nn = 0;
        /* (UTF-8: the file is checked whole, and cJSON refuses lone surrogate escapes) */
        UC_CHECK(tok_normalize(tok, &ws, a->content, a->len, &ns, &nn), rc, out);
        a->ncontent = uc_strndup(nn > 0 ? ns : "", nn);
        if (!a->ncontent) {
            rc = UC_ERRF(UC_ERR_NOMEM, "file=%s added_tokens", path);
            goto out;
        }
        a->nlen = nn;
    }
    rc = build_added_set(tok, true, &tok->norm_set);
out:
    tok_enc_ws_fini(&ws);
    return rc;
}
