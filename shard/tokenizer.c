/* Tokenizer (see tokenizer.h): loads a Hugging Face tokenizer.json into flat tables and runs the
 * reference pipeline: added tokens (matched in the raw text) -> normalizers -> pre-tokenizers ->
 * BPE -> post-processor template, and back through the decoders. The vocabulary and the merge
 * ranks live in open-addressing hash tables (merges keyed by the pair of ids); each pre-token word
 * is merged with a binary heap ordered by (rank, position), as the reference Word::merge_all does,
 * so ties resolve the same way. Regexes are PCRE2 (UTF + UCP, JIT when available). Everything is
 * built at load and read-only afterwards: encode/decode allocate a private workspace per call, so
 * they are thread-safe. The bytes each token streams are precomputed at load. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"

/* The pre-tokenization regex of GPT-2, which the ByteLevel pre-tokenizer uses when use_regex. */
#define GPT2_REGEX                                                                                 \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
/* Rust regex's \\w (Alphabetic, marks, decimal digits, connector punctuation, joiners) as a
 * PCRE2 class body: PCRE2 10.42's \\w lacks the marks and the alphabetic symbols. Numbers of
 * every kind (\\p{N}) stand in for digits and letter numbers. */
#define RUST_WORD                                                                                  \
    "\\p{L}\\p{N}\\p{M}\\p{Pc}\\x{200C}\\x{200D}\\x{24B6}-\\x{24E9}\\x{1F130}-\\x{1F149}"         \
    "\\x{1F150}-\\x{1F169}\\x{1F170}-\\x{1F189}"
/* A "word" character next to a single_word added token (the library's ^\\w / \\w$). */
#define WORD_REGEX "^[" RUST_WORD "]"
#define MAX_TOKEN_ID 0x7ffffffe
#define REPLACEMENT_CHAR "\xEF\xBF\xBD" /* U+FFFD */
#define METASPACE "\xE2\x96\x81"        /* U+2581 */

/* ---------------------------------------------------------------------------------------------
 * Growable arrays
 * ------------------------------------------------------------------------------------------- */

/* Grows p (cap elements of elem bytes) to hold at least need elements; on failure returns p
 * unchanged and clears *ok. */
static void *grow_array(void *p, int64_t *cap, int64_t need, size_t elem, bool *ok)
{
    if (need <= *cap) {
        return p;
    }
    int64_t c = *cap > 0 ? *cap : 16;
    while (c < need) {
        c *= 2;
    }
    void *q = uc_realloc(p, (size_t)c * elem);
    if (!q) {
        *ok = false;
        return p;
    }
    *cap = c;
    return q;
}

struct ivec {
    int32_t *v;
    int64_t n, cap;
    bool oom;
};

static void ivec_push(struct ivec *a, int32_t x)
{
    bool ok = true;
    a->v = grow_array(a->v, &a->cap, a->n + 1, sizeof *a->v, &ok);
    if (!ok || a->oom) {
        a->oom = true;
        return;
    }
    a->v[a->n++] = x;
}

static void ivec_append(struct ivec *a, const struct ivec *b)
{
    for (int64_t i = 0; i < b->n; i++) {
        ivec_push(a, b->v[i]);
    }
}

/* A piece of a string: [s, e), and whether it is a match of the splitting pattern. */
struct span {
    size_t s, e;
    bool m;
};

struct svec {
    struct span *v;
    int64_t n, cap;
    bool oom;
};

static void svec_push(struct svec *a, size_t s, size_t e, bool m)
{
    bool ok = true;
    a->v = grow_array(a->v, &a->cap, a->n + 1, sizeof *a->v, &ok);
    if (!ok || a->oom) {
        a->oom = true;
        return;
    }
    a->v[a->n++] = (struct span){.s = s, .e = e, .m = m};
}

/* Pre-tokens: text pieces stored back to back in one buffer. `first` marks a piece that starts
 * at offset 0 of the original input (Metaspace's prepend_scheme "first" needs it). */
struct piece {
    size_t off, len;
    bool first;
};

struct plist {
    struct uc_buf text;
    struct piece *p;
    int64_t n, cap;
    bool oom;
};

static void plist_clear(struct plist *l)
{
    l->text.len = 0;
    l->n = 0;
}

/* Ends a piece that began at text offset `off` (its bytes are already appended). */
static void plist_end(struct plist *l, size_t off, bool first)
{
    if (l->text.len == off) {
        return; /* empty pieces are dropped, as the reference does */
    }
    bool ok = true;
    l->p = grow_array(l->p, &l->cap, l->n + 1, sizeof *l->p, &ok);
    if (!ok || l->oom) {
        l->oom = true;
        return;
    }
    l->p[l->n++] = (struct piece){.off = off, .len = l->text.len - off, .first = first};
}

static void plist_fini(struct plist *l)
{
    uc_buf_fini(&l->text);
    UC_FREE(l->p);
    l->n = l->cap = 0;
}

/* Decoder tokens: strings back to back in one buffer; token i ends at end[i]. */
struct tlist {
    struct uc_buf text;
    size_t *end;
    int64_t n, cap;
    bool oom;
};

static void tlist_clear(struct tlist *l)
{
    l->text.len = 0;
    if (l->text.data) {
        l->text.data[0] = '\0';
    }
    l->n = 0;
}

static void tlist_end(struct tlist *l)
{
    bool ok = true;
    l->end = grow_array(l->end, &l->cap, l->n + 1, sizeof *l->end, &ok);
    if (!ok || l->oom) {
        l->oom = true;
        return;
    }
    l->end[l->n++] = l->text.len;
}

static void tlist_push(struct tlist *l, const char *s, size_t n)
{
    uc_buf_append(&l->text, s, n);
    tlist_end(l);
}

static const char *tlist_get(const struct tlist *l, int64_t i, size_t *n)
{
    size_t s = i == 0 ? 0 : l->end[i - 1];
    *n = l->end[i] - s;
    return l->text.data ? l->text.data + s : "";
}

static void tlist_fini(struct tlist *l)
{
    uc_buf_fini(&l->text);
    UC_FREE(l->end);
    l->n = l->cap = 0;
}

static bool tlist_failed(const struct tlist *l) { return l->oom || l->text.oom; }

/* ---------------------------------------------------------------------------------------------
 * UTF-8
 * ------------------------------------------------------------------------------------------- */

/* Scans one sequence at s[0..n) (n >= 1). When it is well-formed, sets *ok, stores the code point
 * and returns its length; otherwise returns the length of the maximal ill-formed subpart (>= 1),
 * which is what one U+FFFD replaces in String::from_utf8_lossy. */
static size_t utf8_scan(const unsigned char *s, size_t n, uint32_t *cp, bool *ok)
{
    unsigned char b = s[0];
    *ok = false;
    if (b < 0x80) {
        *cp = b;
        *ok = true;
        return 1;
    }
    size_t len;
    uint32_t c;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
        len = 2;
        c = b & 0x1Fu;
    } else if (b >= 0xE0 && b <= 0xEF) {
        len = 3;
        c = b & 0x0Fu;
        lo = b == 0xE0 ? 0xA0 : 0x80;
        hi = b == 0xED ? 0x9F : 0xBF;
    } else if (b >= 0xF0 && b <= 0xF4) {
        len = 4;
        c = b & 0x07u;
        lo = b == 0xF0 ? 0x90 : 0x80;
        hi = b == 0xF4 ? 0x8F : 0xBF;
    } else {
        return 1;
    }
    for (size_t i = 1; i < len; i++) {
        if (i >= n || s[i] < lo || s[i] > hi) {
            return i;
        }
        lo = 0x80;
        hi = 0xBF;
        c = (c << 6) | (s[i] & 0x3Fu);
    }
    *cp = c;
    *ok = true;
    return len;
}

/* Length of the character whose (valid) lead byte is b. */
static size_t utf8_lead_len(unsigned char b)
{
    return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

/* Returns the offset of the first ill-formed byte, or n when s is valid UTF-8. */
static size_t utf8_first_invalid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        bool ok;
        size_t k = utf8_scan(u + i, n - i, &cp, &ok);
        if (!ok) {
            return i;
        }
        i += k;
    }
    return n;
}

/* Appends s with every ill-formed subpart replaced by U+FFFD (String::from_utf8_lossy). */
static void buf_append_lossy(struct uc_buf *out, const char *s, size_t n)
{
    if (n == 0) {
        return;
    }
    const unsigned char *u = (const unsigned char *)s;
    size_t run = 0, i = 0;
    while (i < n) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        bool ok;
        size_t k = utf8_scan(u + i, n - i, &cp, &ok);
        if (!ok) {
            uc_buf_append(out, s + run, i - run);
            uc_buf_append(out, REPLACEMENT_CHAR, 3);
            run = i + k;
        }
        i += k;
    }
    uc_buf_append(out, s + run, n - run);
}

static size_t utf8_encode(uint32_t cp, char out[4])
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Rust's char::is_whitespace (the Unicode White_Space property). */
static bool is_white_space(uint32_t c)
{
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* Whitespace bytes at the start of s[0..n). */
static size_t white_prefix(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        bool ok;
        size_t k = utf8_scan((const unsigned char *)s + i, n - i, &cp, &ok);
        if (!ok || !is_white_space(cp)) {
            break;
        }
        i += k;
    }
    return i;
}

/* Offset where the whitespace run that ends s[0..n) begins. */
static size_t white_suffix_start(const char *s, size_t n)
{
    size_t end = n;
    while (end > 0) {
        size_t st = end - 1;
        while (st > 0 && ((unsigned char)s[st] & 0xC0) == 0x80) {
            st--;
        }
        uint32_t cp;
        bool ok;
        utf8_scan((const unsigned char *)s + st, end - st, &cp, &ok);
        if (!ok || !is_white_space(cp)) {
            break;
        }
        end = st;
    }
    return end;
}

/* ---------------------------------------------------------------------------------------------
 * Tokenizer state
 * ------------------------------------------------------------------------------------------- */

/* A pattern from the JSON: {"String": literal} or {"Regex": PCRE2 source}. */
struct pattern {
    char *lit; /* literal (uc_malloc'd), or NULL when re is set */
    size_t lit_len;
    pcre2_code *re;
};

enum norm_kind {
    NORM_PREPEND,
    NORM_REPLACE,
    NORM_STRIP,
    NORM_NFC,
    NORM_NFD,
    NORM_NFKC,
    NORM_NFKD,
    NORM_LOWERCASE,
};

struct norm {
    enum norm_kind kind;
    struct pattern pat; /* REPLACE */
    char *str;          /* PREPEND text, REPLACE content */
    size_t str_len;
    bool left, right; /* STRIP */
};

enum pre_kind { PRE_BYTE_LEVEL, PRE_SPLIT, PRE_METASPACE };
enum split_behavior {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_PREV,
    SPLIT_MERGED_NEXT,
    SPLIT_CONTIGUOUS,
};
enum prepend_scheme { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };

struct pre {
    enum pre_kind kind;
    bool add_prefix_space, use_regex; /* BYTE_LEVEL */
    struct pattern pat;               /* SPLIT; METASPACE: the replacement as a literal */
    enum split_behavior behavior;
    bool invert;
    enum prepend_scheme scheme; /* METASPACE */
    bool split;
};

enum dec_kind {
    DEC_BYTE_LEVEL,
    DEC_REPLACE,
    DEC_BYTE_FALLBACK,
    DEC_FUSE,
    DEC_STRIP,
    DEC_METASPACE,
};

struct dec {
    enum dec_kind kind;
    struct pattern pat; /* REPLACE */
    char *content;      /* REPLACE */
    size_t content_len;
    char ch[5]; /* STRIP content char; METASPACE replacement */
    size_t ch_len;
    int64_t start, stop; /* STRIP */
    enum prepend_scheme scheme;
};

struct added {
    char *content;
    size_t len;
    char *ncontent; /* normalized: the content run through the normalizers (matched in */
    size_t nlen;    /* normalized text, as the library's second trie does) */
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
};

/* Added tokens of one kind (normalized or not), for leftmost-longest matching: indices into
 * tok->added grouped by first byte, longest first. */
struct added_set {
    int32_t *order;
    int64_t first[257]; /* order[first[b] .. first[b+1]) start with byte b */
};

/* One model vocabulary string: pool[off .. off+len), NUL-terminated. */
struct ventry {
    uint32_t off, len;
    int32_t id;
};

struct uc_tokenizer {
    int64_t n_vocab; /* V: max id + 1 over the model vocabulary and the added tokens */
    /* model vocabulary */
    char *pool;
    struct ventry *ventries;
    int64_t n_ventries;
    int32_t *vslot; /* hash slots: index into ventries, -1 when empty */
    size_t vmask;
    int32_t *id_entry; /* (V) index into ventries, -1 when the id has no model string */
    /* merges, keyed by (left id << 32 | right id) */
    uint64_t *mkey;
    int32_t *mrank, *mnew;
    size_t mmask;
    int64_t n_merges;
    int32_t unk_id;
    bool fuse_unk, byte_fallback, ignore_merges;
    int32_t byte_id[256]; /* id of "<0xNN>", -1 when absent */
    /* added tokens */
    struct added *added;
    int64_t n_added;
    int32_t *added_idx;      /* (V) index into added, -1 */
    struct added_set raw_set, norm_set; /* matched in the raw text / in normalized text */
    bool any_single_word;
    /* BPE affixes (empty when absent) */
    char *cs_prefix, *eow_suffix;
    size_t cs_prefix_len, eow_suffix_len;
    /* pipeline */
    struct norm *norms;
    int64_t n_norms, cap_norms;
    struct pre *pres;
    int64_t n_pres, cap_pres;
    struct dec *decs;
    int64_t n_decs, cap_decs;
    bool has_decoder;
    struct ivec tmpl_pre, tmpl_post; /* ids the single template puts before and after $A */
    bool byte_level;
    int32_t bos, eos;
    /* PCRE2 */
    pcre2_general_context *gctx;
    pcre2_compile_context *cctx;
    pcre2_match_context *mctx;
    pcre2_code *re_gpt2, *re_word; /* shared by ByteLevel pre-tokenizers; single_word */
    /* streamed bytes per id (uc_tokenizer_token_bytes): not first, and first */
    char *sb_pool;
    int64_t *sb_off, *sbf_off;
    uint32_t *sb_len, *sbf_len;
    /* GPT-2 bytes_to_unicode and its inverse */
    char b2u[256][2];
    uint8_t b2u_len[256];
    int16_t u2b[324];
};

/* ---------------------------------------------------------------------------------------------
 * Hash tables
 * ------------------------------------------------------------------------------------------- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static size_t table_size(int64_t n)
{
    size_t c = 16;
    while (c < (size_t)n * 2 + 1) {
        c *= 2;
    }
    return c;
}

/* Id of the model vocabulary string s[0..n), or -1. Hot: called per character. */
static int32_t vocab_find(const struct uc_tokenizer *tok, const char *s, size_t n)
{
    size_t h = (size_t)uc_fnv1a(UC_FNV_INIT, s, n) & tok->vmask;
    for (;;) {
        int32_t e = tok->vslot[h];
        if (e < 0) {
            return -1;
        }
        const struct ventry *v = &tok->ventries[e];
        if (v->len == n && memcmp(tok->pool + v->off, s, n) == 0) {
            return v->id;
        }
        h = (h + 1) & tok->vmask;
    }
}

static uint64_t merge_key(int32_t a, int32_t b)
{
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

/* Finds the merge of (a, b): its rank and the id it makes. */
static bool merge_find(const struct uc_tokenizer *tok, int32_t a, int32_t b, int32_t *rank,
                       int32_t *new_id)
{
    if (!tok->mkey) {
        return false;
    }
    uint64_t k = merge_key(a, b);
    size_t h = (size_t)mix64(k) & tok->mmask;
    for (;;) {
        uint64_t cur = tok->mkey[h];
        if (cur == UINT64_MAX) {
            return false;
        }
        if (cur == k) {
            *rank = tok->mrank[h];
            *new_id = tok->mnew[h];
            return true;
        }
        h = (h + 1) & tok->mmask;
    }
}

/* Inserts or overwrites (a later duplicate wins, as in the reference HashMap). */
static void merge_put(struct uc_tokenizer *tok, int32_t a, int32_t b, int32_t rank, int32_t new_id)
{
    uint64_t k = merge_key(a, b);
    size_t h = (size_t)mix64(k) & tok->mmask;
    while (tok->mkey[h] != UINT64_MAX && tok->mkey[h] != k) {
        h = (h + 1) & tok->mmask;
    }
    tok->mkey[h] = k;
    tok->mrank[h] = rank;
    tok->mnew[h] = new_id;
}

/* The string the decoder sees for id (added content first, as the reference does), or NULL. */
static const char *id_string(const struct uc_tokenizer *tok, int32_t id, size_t *n)
{
    if (id < 0 || id >= tok->n_vocab) {
        return NULL;
    }
    if (tok->added_idx[id] >= 0) {
        const struct added *a = &tok->added[tok->added_idx[id]];
        *n = a->len;
        return a->content;
    }
    if (tok->id_entry[id] >= 0) {
        const struct ventry *v = &tok->ventries[tok->id_entry[id]];
        *n = v->len;
        return tok->pool + v->off;
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * PCRE2
 * ------------------------------------------------------------------------------------------- */

static void *pcre_alloc(PCRE2_SIZE n, void *user)
{
    (void)user;
    return uc_malloc(n);
}

static void pcre_release(void *p, void *user)
{
    (void)user;
    uc_free(p);
}

static uc_status regex_compile(struct uc_tokenizer *tok, const char *src, size_t len,
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
static uc_status regex_next(const struct uc_tokenizer *tok, const pcre2_code *re, const char *s,
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
static uc_status find_spans(const struct uc_tokenizer *tok, const struct pattern *p,
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
            uc_status rc = regex_next(tok, re, s, n, pos, md, checked, &ms, &me, &found);
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
            svec_push(out, prev, ms, false);
        }
        svec_push(out, ms, me, true);
        prev = me;
        if (me == ms) {
            if (me >= n) {
                break;
            }
            pos = me + utf8_lead_len((unsigned char)s[me]);
        } else {
            pos = me;
        }
    }
    if (prev != n) {
        svec_push(out, prev, n, false);
    }
    return out->oom ? UC_ERRF(UC_ERR_NOMEM, "spans=%lld", (long long)out->n) : UC_OK;
}

/* Applies a split behaviour to find_spans output (the reference NormalizedString::split): the
 * pieces to keep, in order, in out (their m is unused). */
static void apply_behavior(enum split_behavior b, bool invert, const struct svec *in,
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
                svec_push(out, in->v[i].s, in->v[i].e, false);
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
                svec_push(out, in->v[i].s, in->v[i].e, false);
            }
            break;
        case SPLIT_ISOLATED:
            svec_push(out, in->v[i].s, in->v[i].e, false);
            break;
        case SPLIT_MERGED_PREV:
            if (m && !prev && out->n > 0) {
                out->v[out->n - 1].e = in->v[i].e;
            } else {
                svec_push(out, in->v[i].s, in->v[i].e, false);
            }
            break;
        case SPLIT_CONTIGUOUS:
            if (m == prev && out->n > 0) {
                out->v[out->n - 1].e = in->v[i].e;
            } else {
                svec_push(out, in->v[i].s, in->v[i].e, false);
            }
            break;
        case SPLIT_MERGED_NEXT:
            break;
        }
        prev = m;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Loading tokenizer.json
 * ------------------------------------------------------------------------------------------- */

static const char *jstr(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool jbool(const cJSON *o, const char *key, bool def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

static bool jint(const cJSON *v, int64_t lo, int64_t hi, int64_t *out)
{
    if (!cJSON_IsNumber(v)) {
        return false;
    }
    double d = v->valuedouble;
    if (d != floor(d) || d < (double)lo || d > (double)hi) {
        return false;
    }
    *out = (int64_t)d;
    return true;
}

static void pattern_fini(struct pattern *p)
{
    UC_FREE(p->lit);
    pcre2_code_free(p->re);
    p->re = NULL;
}

static uc_status parse_pattern(struct uc_tokenizer *tok, const cJSON *obj, const char *path,
                               const char *field, struct pattern *out)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(obj, "pattern");
    const char *lit = jstr(p, "String");
    const char *re = jstr(p, "Regex");
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
        return regex_compile(tok, re, strlen(re), path, f, &out->re);
    }
    return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.pattern must be a non-empty String or a Regex",
                   path, field);
}

/* Reads a one-character string field into ch (NUL-terminated). */
static uc_status parse_char(const cJSON *obj, const char *key, const char *def, const char *path,
                            const char *field, char ch[5], size_t *len)
{
    const char *s = jstr(obj, key);
    if (!s) {
        s = def;
    }
    size_t n = s ? strlen(s) : 0;
    uint32_t cp;
    bool valid = false;
    if (n > 0 && n <= 4) {
        size_t k = utf8_scan((const unsigned char *)s, n, &cp, &valid);
        valid = valid && k == n;
    }
    if (!valid) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.%s must be one character", path, field,
                       key);
    }
    memcpy(ch, s, n);
    ch[n] = '\0';
    *len = n;
    return UC_OK;
}

static uc_status parse_scheme(const cJSON *obj, const char *path, const char *field,
                              enum prepend_scheme *out)
{
    const char *s = jstr(obj, "prepend_scheme");
    if (!s) {
        *out = jbool(obj, "add_prefix_space", true) ? PREPEND_ALWAYS : PREPEND_NEVER;
        return UC_OK;
    }
    if (strcmp(s, "always") == 0) {
        *out = PREPEND_ALWAYS;
    } else if (strcmp(s, "first") == 0) {
        *out = PREPEND_FIRST;
    } else if (strcmp(s, "never") == 0) {
        *out = PREPEND_NEVER;
    } else {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.prepend_scheme value=%s", path, field,
                       s);
    }
    return UC_OK;
}

static struct norm *norm_add(struct uc_tokenizer *tok, enum norm_kind kind)
{
    bool ok = true;
    tok->norms = grow_array(tok->norms, &tok->cap_norms, tok->n_norms + 1, sizeof *tok->norms, &ok);
    if (!ok) {
        return NULL;
    }
    struct norm *n = &tok->norms[tok->n_norms++];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    return n;
}

static struct pre *pre_add(struct uc_tokenizer *tok, enum pre_kind kind)
{
    bool ok = true;
    tok->pres = grow_array(tok->pres, &tok->cap_pres, tok->n_pres + 1, sizeof *tok->pres, &ok);
    if (!ok) {
        return NULL;
    }
    struct pre *p = &tok->pres[tok->n_pres++];
    memset(p, 0, sizeof *p);
    p->kind = kind;
    return p;
}

static struct dec *dec_add(struct uc_tokenizer *tok, enum dec_kind kind)
{
    bool ok = true;
    tok->decs = grow_array(tok->decs, &tok->cap_decs, tok->n_decs + 1, sizeof *tok->decs, &ok);
    if (!ok) {
        return NULL;
    }
    struct dec *d = &tok->decs[tok->n_decs++];
    memset(d, 0, sizeof *d);
    d->kind = kind;
    return d;
}

static void norms_clear(struct uc_tokenizer *tok)
{
    for (int64_t i = 0; i < tok->n_norms; i++) {
        pattern_fini(&tok->norms[i].pat);
        UC_FREE(tok->norms[i].str);
    }
    tok->n_norms = 0;
}

static void pres_clear(struct uc_tokenizer *tok)
{
    for (int64_t i = 0; i < tok->n_pres; i++) {
        pattern_fini(&tok->pres[i].pat);
    }
    tok->n_pres = 0;
}

static void decs_clear(struct uc_tokenizer *tok)
{
    for (int64_t i = 0; i < tok->n_decs; i++) {
        pattern_fini(&tok->decs[i].pat);
        UC_FREE(tok->decs[i].content);
    }
    tok->n_decs = 0;
}

#define MAX_DEPTH 8
#define NOMEM_FIELD(path, field) UC_ERRF(UC_ERR_NOMEM, "file=%s field=%s", (path), (field))

static uc_status parse_normalizer(struct uc_tokenizer *tok, const cJSON *n, const char *path,
                                  const char *field, int depth)
{
    if (!n || cJSON_IsNull(n)) {
        return UC_OK;
    }
    const char *type = jstr(n, "type");
    if (!type || depth > MAX_DEPTH) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.type missing or nested too deep", path,
                       field);
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
            uc_status rc = parse_normalizer(tok, it, path, sub, depth + 1);
            if (rc != UC_OK) {
                return rc;
            }
        }
        return UC_OK;
    }
    if (strcmp(type, "Prepend") == 0) {
        const char *s = jstr(n, "prepend");
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
        const char *content = jstr(n, "content");
        if (!content) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.content missing", path, field);
        }
        struct norm *nm = norm_add(tok, NORM_REPLACE);
        if (!nm || !(nm->str = uc_strdup(content))) {
            return NOMEM_FIELD(path, field);
        }
        nm->str_len = strlen(content);
        return parse_pattern(tok, n, path, field, &nm->pat);
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
        nm->left = jbool(n, "strip_left", true);
        nm->right = jbool(n, "strip_right", true);
        return UC_OK;
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.type value=%s (supported: Sequence, "
                   "Prepend, Replace, Strip, NFC, NFD, NFKC, NFKD, Lowercase)", path, field, type);
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
    const char *s = jstr(p, "behavior");
    for (size_t i = 0; s && i < sizeof names / sizeof *names; i++) {
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].b;
            return UC_OK;
        }
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.behavior value=%s", path, field,
                   s ? s : "(missing)");
}

static uc_status parse_pre_tokenizer(struct uc_tokenizer *tok, const cJSON *p, const char *path,
                                     const char *field, int depth)
{
    if (!p || cJSON_IsNull(p)) {
        return UC_OK;
    }
    const char *type = jstr(p, "type");
    if (!type || depth > MAX_DEPTH) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.type missing or nested too deep", path,
                       field);
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
            uc_status rc = parse_pre_tokenizer(tok, it, path, sub, depth + 1);
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
        pr->add_prefix_space = jbool(p, "add_prefix_space", true);
        pr->use_regex = jbool(p, "use_regex", true);
        if (pr->use_regex && !tok->re_gpt2) {
            return regex_compile(tok, GPT2_REGEX, strlen(GPT2_REGEX), path, field, &tok->re_gpt2);
        }
        return UC_OK;
    }
    if (strcmp(type, "Split") == 0) {
        struct pre *pr = pre_add(tok, PRE_SPLIT);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        pr->invert = jbool(p, "invert", false);
        uc_status rc = parse_behavior(p, path, field, &pr->behavior);
        return rc != UC_OK ? rc : parse_pattern(tok, p, path, field, &pr->pat);
    }
    if (strcmp(type, "Digits") == 0) {
        /* Digits is a split on each numeric character: Isolated keeps them one per piece,
         * Contiguous keeps runs. */
        struct pre *pr = pre_add(tok, PRE_SPLIT);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        pr->behavior = jbool(p, "individual_digits", false) ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS;
        return regex_compile(tok, "\\p{N}", strlen("\\p{N}"), path, field, &pr->pat.re);
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
            if (jstr(p, "behavior")) {
                uc_status rc = parse_behavior(p, path, field, &pr->behavior);
                if (rc != UC_OK) {
                    return rc;
                }
            }
        } else if (strcmp(type, "Whitespace") == 0) {
            re = ws_re;
            pr->invert = true;
        }
        return regex_compile(tok, re, strlen(re), path, field, &pr->pat.re);
    }
    if (strcmp(type, "Metaspace") == 0) {
        struct pre *pr = pre_add(tok, PRE_METASPACE);
        if (!pr) {
            return NOMEM_FIELD(path, field);
        }
        char ch[5];
        size_t n;
        uc_status rc = parse_char(p, "replacement", METASPACE, path, field, ch, &n);
        if (rc != UC_OK) {
            return rc;
        }
        if (!(pr->pat.lit = uc_strndup(ch, n))) {
            return NOMEM_FIELD(path, field);
        }
        pr->pat.lit_len = n;
        pr->split = jbool(p, "split", true);
        return parse_scheme(p, path, field, &pr->scheme);
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.type value=%s (supported: Sequence, "
                   "ByteLevel, Split, Metaspace, Digits, Whitespace, WhitespaceSplit, Punctuation)", path,
                   field, type);
}

static uc_status parse_decoder(struct uc_tokenizer *tok, const cJSON *d, const char *path,
                               const char *field, int depth)
{
    if (!d || cJSON_IsNull(d)) {
        return UC_OK;
    }
    const char *type = jstr(d, "type");
    if (!type || depth > MAX_DEPTH) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.type missing or nested too deep", path,
                       field);
    }
    tok->has_decoder = true;
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(d, "decoders");
        if (!cJSON_IsArray(arr)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.decoders not an array", path, field);
        }
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, arr)
        {
            char sub[192];
            snprintf(sub, sizeof sub, "%s.decoders[%d]", field, i++);
            uc_status rc = parse_decoder(tok, it, path, sub, depth + 1);
            if (rc != UC_OK) {
                return rc;
            }
        }
        return UC_OK;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        return dec_add(tok, DEC_BYTE_LEVEL) ? UC_OK : NOMEM_FIELD(path, field);
    }
    if (strcmp(type, "ByteFallback") == 0) {
        return dec_add(tok, DEC_BYTE_FALLBACK) ? UC_OK : NOMEM_FIELD(path, field);
    }
    if (strcmp(type, "Fuse") == 0) {
        return dec_add(tok, DEC_FUSE) ? UC_OK : NOMEM_FIELD(path, field);
    }
    if (strcmp(type, "Replace") == 0) {
        const char *content = jstr(d, "content");
        if (!content) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.content missing", path, field);
        }
        struct dec *dc = dec_add(tok, DEC_REPLACE);
        if (!dc || !(dc->content = uc_strdup(content))) {
            return NOMEM_FIELD(path, field);
        }
        dc->content_len = strlen(content);
        return parse_pattern(tok, d, path, field, &dc->pat);
    }
    if (strcmp(type, "Strip") == 0) {
        struct dec *dc = dec_add(tok, DEC_STRIP);
        if (!dc) {
            return NOMEM_FIELD(path, field);
        }
        int64_t start = 0, stop = 0;
        const cJSON *js = cJSON_GetObjectItemCaseSensitive(d, "start");
        const cJSON *je = cJSON_GetObjectItemCaseSensitive(d, "stop");
        if ((js && !jint(js, 0, 1 << 20, &start)) || (je && !jint(je, 0, 1 << 20, &stop))) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.start/stop not small integers", path,
                           field);
        }
        dc->start = start;
        dc->stop = stop;
        return parse_char(d, "content", " ", path, field, dc->ch, &dc->ch_len);
    }
    if (strcmp(type, "Metaspace") == 0) {
        struct dec *dc = dec_add(tok, DEC_METASPACE);
        if (!dc) {
            return NOMEM_FIELD(path, field);
        }
        uc_status rc = parse_char(d, "replacement", METASPACE, path, field, dc->ch, &dc->ch_len);
        return rc != UC_OK ? rc : parse_scheme(d, path, field, &dc->scheme);
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.type value=%s (supported: Sequence, "
                   "ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)", path, field, type);
}

/* Adds one TemplateProcessing's single template around the current one. */
static uc_status parse_template(struct uc_tokenizer *tok, const cJSON *p, const char *path,
                                const char *field)
{
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(p, "single");
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(p, "special_tokens");
    if (!cJSON_IsArray(single)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.single not an array", path, field);
    }
    struct ivec pre = {0}, post = {0};
    uc_status rc = UC_OK;
    bool seen_a = false;
    const cJSON *it;
    cJSON_ArrayForEach(it, single)
    {
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
        const cJSON *sq = cJSON_GetObjectItemCaseSensitive(it, "Sequence");
        if (st) {
            const char *name = jstr(st, "id");
            const cJSON *entry = name ? cJSON_GetObjectItemCaseSensitive(specials, name) : NULL;
            const cJSON *ids = cJSON_GetObjectItemCaseSensitive(entry, "ids");
            if (!cJSON_IsArray(ids)) {
                rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.special_tokens[%s].ids missing", path,
                             field, name ? name : "?");
                goto out;
            }
            const cJSON *jid;
            cJSON_ArrayForEach(jid, ids)
            {
                int64_t id;
                if (!jint(jid, 0, tok->n_vocab - 1, &id)) {
                    rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.special_tokens[%s] id out of "
                                 "range (vocab=%lld)", path, field, name, (long long)tok->n_vocab);
                    goto out;
                }
                ivec_push(seen_a ? &post : &pre, (int32_t)id);
            }
        } else if (sq) {
            const char *id = jstr(sq, "id");
            if (!id || strcmp(id, "A") != 0 || seen_a) {
                rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.single must hold $A exactly once",
                             path, field);
                goto out;
            }
            seen_a = true;
        } else {
            rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.single has an unknown item", path, field);
            goto out;
        }
    }
    if (!seen_a) {
        rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.single has no $A", path, field);
        goto out;
    }
    ivec_append(&pre, &tok->tmpl_pre); /* a later template wraps the earlier one */
    ivec_append(&tok->tmpl_post, &post);
    if (pre.oom || tok->tmpl_post.oom) {
        rc = NOMEM_FIELD(path, field);
        goto out;
    }
    UC_FREE(tok->tmpl_pre.v);
    tok->tmpl_pre = pre;
    pre = (struct ivec){0};
out:
    uc_free(pre.v);
    uc_free(post.v);
    return rc;
}

static uc_status parse_post_processor(struct uc_tokenizer *tok, const cJSON *p, const char *path,
                                      const char *field, int depth)
{
    if (!p || cJSON_IsNull(p)) {
        return UC_OK;
    }
    const char *type = jstr(p, "type");
    if (!type || depth > MAX_DEPTH) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.type missing or nested too deep", path,
                       field);
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(p, "processors");
        if (!cJSON_IsArray(arr)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.processors not an array", path, field);
        }
        int i = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, arr)
        {
            char sub[192];
            snprintf(sub, sizeof sub, "%s.processors[%d]", field, i++);
            uc_status rc = parse_post_processor(tok, it, path, sub, depth + 1);
            if (rc != UC_OK) {
                return rc;
            }
        }
        return UC_OK;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        return UC_OK; /* trims offsets only */
    }
    if (strcmp(type, "TemplateProcessing") == 0) {
        return parse_template(tok, p, path, field);
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.type value=%s (supported: Sequence, "
                   "TemplateProcessing, ByteLevel)", path, field, type);
}

/* Checks the BPE options the encoder does not implement. */
static uc_status check_model(const cJSON *model, const char *path)
{
    const char *type = jstr(model, "type");
    if (type && strcmp(type, "BPE") != 0) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=model.type value=%s (only BPE)", path,
                       type);
    }
    if (!type && !cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(model, "merges"))) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=model.type missing and no merges (only "
                       "BPE)", path);
    }
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (dropout && !cJSON_IsNull(dropout) &&
        !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0.0)) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=model.dropout (BPE dropout)", path);
    }
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, affixes[i]);
        if (v && !cJSON_IsNull(v) && !cJSON_IsString(v)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.%s is not a string", path,
                           affixes[i]);
        }
    }
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    if (!cJSON_IsObject(vocab)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.vocab missing or not an object", path);
    }
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (merges && !cJSON_IsArray(merges)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.merges not an array", path);
    }
    return UC_OK;
}

/* Builds the vocabulary tables; n_vocab is already known. */
static uc_status load_vocab(struct uc_tokenizer *tok, const cJSON *vocab, const char *path)
{
    int64_t n = 0;
    size_t pool_bytes = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, vocab)
    {
        n++;
        pool_bytes += strlen(it->string) + 1;
    }
    if (pool_bytes > UINT32_MAX) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.vocab too large", path);
    }
    tok->pool = uc_malloc(pool_bytes + 1);
    tok->ventries = uc_calloc((size_t)n + 1, sizeof *tok->ventries);
    size_t slots = table_size(n);
    tok->vslot = uc_malloc(slots * sizeof *tok->vslot);
    tok->id_entry = uc_malloc((size_t)tok->n_vocab * sizeof *tok->id_entry);
    if (!tok->pool || !tok->ventries || !tok->vslot || !tok->id_entry) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s vocab=%lld", path, (long long)n);
    }
    memset(tok->vslot, 0xff, slots * sizeof *tok->vslot);
    memset(tok->id_entry, 0xff, (size_t)tok->n_vocab * sizeof *tok->id_entry);
    tok->vmask = slots - 1;
    size_t off = 0;
    cJSON_ArrayForEach(it, vocab)
    {
        int64_t id = 0;
        (void)jint(it, 0, MAX_TOKEN_ID, &id); /* validated by the caller */
        size_t len = strlen(it->string);
        if (vocab_find(tok, it->string, len) >= 0) {
            continue; /* a duplicate key: the first one stays */
        }
        memcpy(tok->pool + off, it->string, len + 1);
        int32_t e = (int32_t)tok->n_ventries++;
        tok->ventries[e] = (struct ventry){.off = (uint32_t)off, .len = (uint32_t)len,
                                           .id = (int32_t)id};
        off += len + 1;
        size_t h = (size_t)uc_fnv1a(UC_FNV_INIT, it->string, len) & tok->vmask;
        while (tok->vslot[h] >= 0) {
            h = (h + 1) & tok->vmask;
        }
        tok->vslot[h] = e;
        if (tok->id_entry[id] < 0) {
            tok->id_entry[id] = e;
        }
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        tok->byte_id[b] = vocab_find(tok, name, 6);
    }
    return UC_OK;
}

/* Looks up one side of a merge, s[0..n). */
static uc_status merge_side(const struct uc_tokenizer *tok, const char *s, size_t n,
                            const char *path, int64_t rank, int32_t *id)
{
    *id = vocab_find(tok, s, n);
    if (*id < 0) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.merges[%lld] token \"%.*s\" is not in "
                       "the vocabulary", path, (long long)rank, (int)(n < 64 ? n : 64), s);
    }
    return UC_OK;
}

static uc_status load_merges(struct uc_tokenizer *tok, const cJSON *merges, const char *path)
{
    int64_t n = cJSON_GetArraySize(merges);
    if (n == 0) {
        return UC_OK;
    }
    size_t slots = table_size(n);
    tok->mkey = uc_malloc(slots * sizeof *tok->mkey);
    tok->mrank = uc_malloc(slots * sizeof *tok->mrank);
    tok->mnew = uc_malloc(slots * sizeof *tok->mnew);
    if (!tok->mkey || !tok->mrank || !tok->mnew) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s merges=%lld", path, (long long)n);
    }
    memset(tok->mkey, 0xff, slots * sizeof *tok->mkey);
    tok->mmask = slots - 1;
    struct uc_buf both;
    uc_buf_init(&both);
    uc_status rc = UC_OK;
    int64_t rank = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, merges)
    {
        const char *a, *b;
        size_t na, nb;
        if (cJSON_IsString(it)) {
            a = it->valuestring;
            const char *sp = strchr(a, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.merges[%lld] is not \"a b\"",
                             path, (long long)rank);
                goto out;
            }
            na = (size_t)(sp - a);
            b = sp + 1;
            nb = strlen(b);
        } else if (cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            a = cJSON_GetArrayItem(it, 0)->valuestring;
            b = cJSON_GetArrayItem(it, 1)->valuestring;
            na = strlen(a);
            nb = strlen(b);
        } else {
            rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.merges[%lld] is neither \"a b\" nor "
                         "[a, b]", path, (long long)rank);
            goto out;
        }
        int32_t ia, ib, inew;
        UC_CHECK(merge_side(tok, a, na, path, rank, &ia), rc, out);
        UC_CHECK(merge_side(tok, b, nb, path, rank, &ib), rc, out);
        both.len = 0;
        uc_buf_append(&both, a, na);
        /* the merged token drops b's continuing-subword prefix (the library's BPE builder) */
        size_t cut = tok->cs_prefix_len < nb ? tok->cs_prefix_len : nb;
        uc_buf_append(&both, b + cut, nb - cut);
        if (both.oom) {
            rc = UC_ERRF(UC_ERR_NOMEM, "file=%s merges", path);
            goto out;
        }
        UC_CHECK(merge_side(tok, both.data, both.len, path, rank, &inew), rc, out);
        merge_put(tok, ia, ib, (int32_t)rank, inew);
        rank++;
    }
    tok->n_merges = rank;
out:
    uc_buf_fini(&both);
    return rc;
}

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

static uc_status load_added(struct uc_tokenizer *tok, const cJSON *arr, const char *path)
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
        (void)jint(cJSON_GetObjectItemCaseSensitive(it, "id"), 0, MAX_TOKEN_ID, &id);
        const char *content = jstr(it, "content");
        struct added *a = &tok->added[tok->n_added];
        if (!(a->content = uc_strdup(content))) {
            return UC_ERRF(UC_ERR_NOMEM, "file=%s added_tokens", path);
        }
        a->len = strlen(content);
        /* the library gives a token the model's vocabulary already holds the model's id */
        int32_t vid = vocab_find(tok, content, a->len);
        if (vid >= 0 && vid != id) {
            UC_LOG_WARN("tokenizer: file=%s added_tokens[%d] \"%.64s\" has id %lld but the "
                        "vocabulary gives it %d; using %d, as the tokenizers library does", path,
                        i, content, (long long)id, vid, vid);
            id = vid;
        }
        a->id = (int32_t)id;
        a->special = jbool(it, "special", false);
        a->lstrip = jbool(it, "lstrip", false);
        a->rstrip = jbool(it, "rstrip", false);
        a->single_word = jbool(it, "single_word", false);
        a->normalized = jbool(it, "normalized", !a->special); /* the library's default */
        tok->any_single_word |= a->single_word;
        tok->added_idx[id] = (int32_t)tok->n_added;
        tok->n_added++;
        i++;
    }
    return build_added_set(tok, false, &tok->raw_set);
}

/* Checks ids and sizes the id space: max id + 1 over the vocabulary and the added tokens. */
static uc_status size_vocab(struct uc_tokenizer *tok, const cJSON *vocab, const cJSON *added,
                            const char *path)
{
    int64_t max_id = -1;
    const cJSON *it;
    /* Every id sizes tables (V entries each), so an id may not exceed what the entries could
     * use: twice their number plus a little (real tokenizers use 0..entries-1, with at most a
     * few holes). A stray 2147483646 would otherwise ask for gigabytes. */
    int64_t n_entries = cJSON_GetArraySize(vocab) + (cJSON_IsArray(added) ? cJSON_GetArraySize(added)
                                                                          : 0);
    int64_t id_bound = 2 * n_entries + 1024;
    cJSON_ArrayForEach(it, vocab)
    {
        int64_t id;
        if (!jint(it, 0, MAX_TOKEN_ID, &id)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.vocab[\"%.64s\"] id is not a valid "
                           "token id", path, it->string);
        }
        if (id >= id_bound) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.vocab[\"%.64s\"] id=%lld is too "
                           "large for %lld entries (ids must be below %lld)", path, it->string,
                           (long long)id, (long long)n_entries, (long long)id_bound);
        }
        max_id = id > max_id ? id : max_id;
    }
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=added_tokens not an array", path);
    }
    int i = 0;
    cJSON_ArrayForEach(it, added)
    {
        int64_t id;
        if (!jint(cJSON_GetObjectItemCaseSensitive(it, "id"), 0, MAX_TOKEN_ID, &id) ||
            !jstr(it, "content")) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=added_tokens[%d] needs an id and a "
                           "content", path, i);
        }
        if (id >= id_bound) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=added_tokens[%d].id=%lld is too large "
                           "for %lld entries (ids must be below %lld)", path, i, (long long)id,
                           (long long)n_entries, (long long)id_bound);
        }
        max_id = id > max_id ? id : max_id;
        i++;
    }
    if (max_id < 0) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.vocab is empty", path);
    }
    tok->n_vocab = max_id + 1;
    return UC_OK;
}

static void init_byte_tables(struct uc_tokenizer *tok)
{
    memset(tok->u2b, 0xff, sizeof tok->u2b);
    uint32_t extra = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        uint32_t cp = keep ? (uint32_t)b : 256 + extra++;
        char enc[4];
        size_t k = utf8_encode(cp, enc);
        memcpy(tok->b2u[b], enc, k);
        tok->b2u_len[b] = (uint8_t)k;
        tok->u2b[cp] = (int16_t)b;
    }
}

static void pick_special_ids(struct uc_tokenizer *tok)
{
    tok->bos = tok->tmpl_pre.n > 0 ? tok->tmpl_pre.v[0] : -1;
    tok->eos = -1;
    static const char *const eos_names[] = {"</s>", "<|end_of_text|>", "<|eot_id|>",
                                            "<|endoftext|>", "<|im_end|>"};
    for (size_t i = 0; i < sizeof eos_names / sizeof *eos_names && tok->eos < 0; i++) {
        for (int64_t k = 0; k < tok->n_added; k++) {
            if (strcmp(tok->added[k].content, eos_names[i]) == 0) {
                tok->eos = tok->added[k].id;
                break;
            }
        }
    }
    tok->byte_level = false;
    for (int64_t i = 0; i < tok->n_pres; i++) {
        tok->byte_level |= tok->pres[i].kind == PRE_BYTE_LEVEL;
    }
    for (int64_t i = 0; i < tok->n_decs; i++) {
        tok->byte_level |= tok->decs[i].kind == DEC_BYTE_LEVEL;
    }
}

static uc_status build_stream_bytes(struct uc_tokenizer *tok);
static uc_status normalize_added(struct uc_tokenizer *tok, const char *path);

static uc_status load(struct uc_tokenizer *tok, const cJSON *root, const char *path)
{
    uc_status rc;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model missing", path);
    }
    UC_CHECK(check_model(model, path), rc, out);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    UC_CHECK(size_vocab(tok, vocab, added, path), rc, out);
    UC_CHECK(load_vocab(tok, vocab, path), rc, out);
    const char *pfx = jstr(model, "continuing_subword_prefix");
    const char *sfx = jstr(model, "end_of_word_suffix");
    tok->cs_prefix = uc_strdup(pfx ? pfx : "");
    tok->eow_suffix = uc_strdup(sfx ? sfx : "");
    if (!tok->cs_prefix || !tok->eow_suffix) {
        rc = UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
        goto out;
    }
    tok->cs_prefix_len = strlen(tok->cs_prefix);
    tok->eow_suffix_len = strlen(tok->eow_suffix);
    UC_CHECK(load_merges(tok, cJSON_GetObjectItemCaseSensitive(model, "merges"), path), rc, out);
    UC_CHECK(load_added(tok, added, path), rc, out);
    tok->fuse_unk = jbool(model, "fuse_unk", false);
    tok->byte_fallback = jbool(model, "byte_fallback", false);
    tok->ignore_merges = jbool(model, "ignore_merges", false);
    const char *unk = jstr(model, "unk_token");
    tok->unk_id = unk ? vocab_find(tok, unk, strlen(unk)) : -1;
    if (unk && tok->unk_id < 0) {
        UC_LOG_WARN("tokenizer: file=%s unk_token=%s is not in the vocabulary; unknown "
                    "characters are dropped", path, unk);
    }
    UC_CHECK(parse_normalizer(tok, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), path,
                              "normalizer", 0), rc, out);
    UC_CHECK(parse_pre_tokenizer(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"),
                                 path, "pre_tokenizer", 0), rc, out);
    UC_CHECK(parse_post_processor(tok, cJSON_GetObjectItemCaseSensitive(root, "post_processor"),
                                  path, "post_processor", 0), rc, out);
    UC_CHECK(parse_decoder(tok, cJSON_GetObjectItemCaseSensitive(root, "decoder"), path,
                           "decoder", 0), rc, out);
    if (tok->any_single_word) {
        UC_CHECK(regex_compile(tok, WORD_REGEX, strlen(WORD_REGEX), path, "added_tokens",
                               &tok->re_word), rc, out);
    }
    UC_CHECK(normalize_added(tok, path), rc, out);
    pick_special_ids(tok);
    UC_CHECK(build_stream_bytes(tok), rc, out);
out:
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Encoding
 * ------------------------------------------------------------------------------------------- */

/* A BPE symbol: a token id in a doubly linked list over one word. */
struct sym {
    int32_t id, prev, next;
    bool dead;
};

/* A candidate merge of symbols pos and pos->next. */
struct cand {
    int32_t rank, pos, new_id;
};

/* Per-call scratch; nothing in the tokenizer is written during encode. */
struct enc_ws {
    pcre2_match_data *md;
    struct uc_buf na, nb, tmp;
    struct plist pa, pb;
    struct svec spans, keep;
    struct sym *sym;
    int64_t sym_n, sym_cap;
    struct cand *heap;
    int64_t heap_n, heap_cap;
    bool oom;
};

static void enc_ws_fini(struct enc_ws *ws)
{
    pcre2_match_data_free(ws->md);
    uc_buf_fini(&ws->na);
    uc_buf_fini(&ws->nb);
    uc_buf_fini(&ws->tmp);
    plist_fini(&ws->pa);
    plist_fini(&ws->pb);
    uc_free(ws->spans.v);
    uc_free(ws->keep.v);
    uc_free(ws->sym);
    uc_free(ws->heap);
}

static bool cand_less(const struct cand *a, const struct cand *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

/* The heap is sized for the word up front (at most 3 pushes per symbol). */
static void heap_push(struct enc_ws *ws, struct cand c)
{
    int64_t i = ws->heap_n++;
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        if (!cand_less(&c, &ws->heap[parent])) {
            break;
        }
        ws->heap[i] = ws->heap[parent];
        i = parent;
    }
    ws->heap[i] = c;
}

static struct cand heap_pop(struct enc_ws *ws)
{
    struct cand top = ws->heap[0];
    struct cand last = ws->heap[--ws->heap_n];
    int64_t i = 0, n = ws->heap_n;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) {
            break;
        }
        if (c + 1 < n && cand_less(&ws->heap[c + 1], &ws->heap[c])) {
            c++;
        }
        if (!cand_less(&ws->heap[c], &last)) {
            break;
        }
        ws->heap[i] = ws->heap[c];
        i = c;
    }
    if (n > 0) {
        ws->heap[i] = last;
    }
    return top;
}

static void sym_add(struct enc_ws *ws, int32_t id)
{
    bool ok = true;
    ws->sym = grow_array(ws->sym, &ws->sym_cap, ws->sym_n + 1, sizeof *ws->sym, &ok);
    if (!ok) {
        ws->oom = true;
        return;
    }
    int32_t i = (int32_t)ws->sym_n++;
    ws->sym[i] = (struct sym){.id = id, .prev = i - 1, .next = -1, .dead = false};
    if (i > 0) {
        ws->sym[i - 1].next = i;
    }
}

static void push_pair(const struct uc_tokenizer *tok, struct enc_ws *ws, int32_t pos)
{
    int32_t nx = ws->sym[pos].next;
    int32_t rank, new_id;
    if (nx >= 0 && merge_find(tok, ws->sym[pos].id, ws->sym[nx].id, &rank, &new_id)) {
        heap_push(ws, (struct cand){.rank = rank, .pos = pos, .new_id = new_id});
    }
}

/* BPE over one pre-token word w[0..n) (valid UTF-8), appending its ids (the reference
 * BPE::tokenize_with_cache without the cache: characters, byte fallback, unk, merge_all). */
static uc_status bpe_word(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *w,
                          size_t n, struct ivec *out)
{
    if (tok->ignore_merges) {
        int32_t id = vocab_find(tok, w, n);
        if (id >= 0) {
            ivec_push(out, id);
            return UC_OK;
        }
    }
    ws->sym_n = 0;
    bool have_unk = false;
    bool affixes = tok->cs_prefix_len > 0 || tok->eow_suffix_len > 0;
    for (size_t i = 0; i < n;) {
        size_t cl = utf8_lead_len((unsigned char)w[i]);
        int32_t id;
        if (affixes) {
            /* a character after the first carries the prefix, the last one the suffix */
            ws->tmp.len = 0;
            if (i > 0) {
                uc_buf_append(&ws->tmp, tok->cs_prefix, tok->cs_prefix_len);
            }
            uc_buf_append(&ws->tmp, w + i, cl);
            if (i + cl == n) {
                uc_buf_append(&ws->tmp, tok->eow_suffix, tok->eow_suffix_len);
            }
            if (ws->tmp.oom) {
                return UC_ERRF(UC_ERR_NOMEM, "bpe word bytes=%zu", n);
            }
            id = vocab_find(tok, ws->tmp.data, ws->tmp.len);
        } else {
            id = vocab_find(tok, w + i, cl);
        }
        if (id >= 0) {
            if (have_unk) {
                sym_add(ws, tok->unk_id);
                have_unk = false;
            }
            sym_add(ws, id);
            i += cl;
            continue;
        }
        bool all_bytes = tok->byte_fallback;
        for (size_t k = 0; all_bytes && k < cl; k++) {
            all_bytes = tok->byte_id[(unsigned char)w[i + k]] >= 0;
        }
        if (all_bytes) {
            for (size_t k = 0; k < cl; k++) {
                sym_add(ws, tok->byte_id[(unsigned char)w[i + k]]);
            }
        } else if (tok->unk_id >= 0) {
            if (have_unk && !tok->fuse_unk) {
                sym_add(ws, tok->unk_id);
            }
            have_unk = true;
        }
        i += cl;
    }
    if (have_unk) {
        sym_add(ws, tok->unk_id);
    }
    if (ws->oom) {
        return UC_ERRF(UC_ERR_NOMEM, "bpe word bytes=%zu", n);
    }
    if (ws->sym_n > 1 && tok->mkey) {
        bool ok = true;
        ws->heap = grow_array(ws->heap, &ws->heap_cap, 3 * ws->sym_n, sizeof *ws->heap, &ok);
        if (!ok) {
            return UC_ERRF(UC_ERR_NOMEM, "bpe heap symbols=%lld", (long long)ws->sym_n);
        }
        ws->heap_n = 0;
        for (int32_t i = 0; i + 1 < (int32_t)ws->sym_n; i++) {
            push_pair(tok, ws, i);
        }
        while (ws->heap_n > 0) {
            struct cand c = heap_pop(ws);
            struct sym *s = &ws->sym[c.pos];
            int32_t nx = s->next;
            int32_t rank, new_id;
            if (s->dead || nx < 0 || !merge_find(tok, s->id, ws->sym[nx].id, &rank, &new_id) ||
                new_id != c.new_id) {
                continue; /* stale candidate */
            }
            s->id = c.new_id;
            s->next = ws->sym[nx].next;
            ws->sym[nx].dead = true;
            if (s->next >= 0) {
                ws->sym[s->next].prev = c.pos;
            }
            if (s->prev >= 0) {
                push_pair(tok, ws, s->prev);
            }
            push_pair(tok, ws, c.pos);
        }
    }
    for (int64_t i = 0; i < ws->sym_n; i++) {
        if (!ws->sym[i].dead) {
            ivec_push(out, ws->sym[i].id);
        }
    }
    return UC_OK;
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
        size_t k = utf8_scan((const unsigned char *)s + i, n - i, &cp, &ok);
        if (cp < 0x80) {
            char c = (char)(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
            uc_buf_append(dst, &c, 1);
        } else if (cp == 0x130) {
            uc_buf_append(dst, "i\xCC\x87", 3);
        } else {
            char enc[4];
            size_t m = utf8_encode((uint32_t)utf8proc_tolower((utf8proc_int32_t)cp), enc);
            uc_buf_append(dst, enc, m);
        }
        i += k;
    }
}

/* Runs the normalizers over s[0..n); *out points into the workspace or into s. */
static uc_status normalize(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
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
            uc_status rc = find_spans(tok, &nm->pat, NULL, cur, len, ws->md, true, &ws->spans);
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
            size_t a = nm->left ? white_prefix(cur, len) : 0;
            size_t b = nm->right ? white_suffix_start(cur, len) : len;
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
            plist_end(out, off, first);
            return UC_OK;
        }
        rc = find_spans(tok, NULL, tok->re_gpt2, w, wn, ws->md, true, &ws->spans);
        for (int64_t k = 0; rc == UC_OK && k < ws->spans.n; k++) {
            const struct span *sp = &ws->spans.v[k];
            size_t off = out->text.len;
            append_byte_level(tok, &out->text, w + sp->s, sp->e - sp->s);
            plist_end(out, off, first && sp->s == 0);
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
            plist_end(out, off, first);
            return UC_OK;
        }
        rc = find_spans(tok, &pr->pat, NULL, w, wn, ws->md, true, &ws->spans);
        if (rc == UC_OK) {
            apply_behavior(SPLIT_MERGED_NEXT, false, &ws->spans, &ws->keep);
        }
        break;
    }
    case PRE_SPLIT:
        rc = find_spans(tok, &pr->pat, NULL, w, wn, ws->md, true, &ws->spans);
        if (rc == UC_OK) {
            apply_behavior(pr->behavior, pr->invert, &ws->spans, &ws->keep);
        }
        break;
    }
    for (int64_t k = 0; rc == UC_OK && k < ws->keep.n; k++) {
        const struct span *sp = &ws->keep.v[k];
        size_t off = out->text.len;
        uc_buf_append(&out->text, w + sp->s, sp->e - sp->s);
        plist_end(out, off, first && sp->s == 0);
    }
    if (rc == UC_OK && ws->keep.oom) {
        rc = UC_ERRF(UC_ERR_NOMEM, "pre-tokenizer pieces");
    }
    return rc;
}

/* Runs the pre-tokenizers; *res holds the pieces (owned by the workspace). */
static uc_status pre_tokenize(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                              size_t n, bool first, struct plist **res)
{
    struct plist *in = &ws->pa, *out = &ws->pb;
    plist_clear(in);
    uc_buf_append(&in->text, s, n);
    plist_end(in, 0, first);
    for (int64_t i = 0; i < tok->n_pres; i++) {
        plist_clear(out);
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
    (void)regex_next(tok, tok->re_word, s, n, 0, ws->md, true, &ms, &me, &found);
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
    if (stop < n && is_word_char(tok, ws, s + stop, utf8_lead_len((unsigned char)s[stop]))) {
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
    uc_status rc = pre_tokenize(tok, ws, s, n, first, &pl);
    for (int64_t i = 0; rc == UC_OK && i < pl->n; i++) {
        rc = bpe_word(tok, ws, pl->text.data + pl->p[i].off, pl->p[i].len, out);
    }
    return rc;
}

static uc_status split_added(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *text,
                             size_t len, bool normalized, bool first, struct ivec *out);

/* Raw text between non-normalized added tokens: normalize, then split on normalized ones. */
static uc_status encode_segment(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                                size_t n, bool first, struct ivec *out)
{
    const char *ns = NULL;
    size_t nn = 0;
    uc_status rc = normalize(tok, ws, s, n, &ns, &nn);
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
            pos += utf8_lead_len(b);
            continue;
        }
        size_t start = pos, stop = pos + hit_len;
        if (hit->single_word && !single_word_ok(tok, ws, text, len, start, stop)) {
            pos = stop; /* discarded; the next match starts after it */
            continue;
        }
        if (hit->lstrip) {
            start = seg + white_suffix_start(text + seg, start - seg);
        }
        if (hit->rstrip) {
            stop += white_prefix(text + stop, len - stop);
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
        ivec_push(out, hit->id);
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
static uc_status encode_text(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *text,
                             size_t len, struct ivec *out)
{
    return split_added(tok, ws, text, len, false, true, out);
}

/* The normalized added tokens are matched in normalized text, so their content is normalized
 * once here (the library's refresh_added_tokens); then their matching set is built. */
static uc_status normalize_added(struct uc_tokenizer *tok, const char *path)
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
        if (utf8_first_invalid(a->content, a->len) < a->len) {
            rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=added_tokens[%lld].content is not UTF-8",
                         path, (long long)i);
            goto out;
        }
        UC_CHECK(normalize(tok, &ws, a->content, a->len, &ns, &nn), rc, out);
        a->ncontent = uc_strndup(nn > 0 ? ns : "", nn);
        if (!a->ncontent) {
            rc = UC_ERRF(UC_ERR_NOMEM, "file=%s added_tokens", path);
            goto out;
        }
        a->nlen = nn;
    }
    rc = build_added_set(tok, true, &tok->norm_set);
out:
    enc_ws_fini(&ws);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Decoding
 * ------------------------------------------------------------------------------------------- */

/* raw: keep invalid UTF-8 bytes (streaming); stream: one token at a time, `first` for the first
 * one, so the whole-text steps after a Fuse (Strip) apply only where they would in a decode. */
struct dec_mode {
    bool raw, stream, first;
};

struct dec_ws {
    struct tlist ta, tb;
    struct uc_buf tmp;
    struct svec spans;
    pcre2_match_data *md;
};

static void dec_ws_fini(struct dec_ws *dw)
{
    tlist_fini(&dw->ta);
    tlist_fini(&dw->tb);
    uc_buf_fini(&dw->tmp);
    uc_free(dw->spans.v);
    pcre2_match_data_free(dw->md);
}

static bool byte_token(const char *s, size_t n, unsigned char *out)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') {
        return false;
    }
    unsigned v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        unsigned d = c >= '0' && c <= '9'   ? (unsigned)(c - '0')
                     : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                     : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10)
                                            : 16u;
        if (d > 15) {
            return false;
        }
        v = v * 16 + d;
    }
    *out = (unsigned char)v;
    return true;
}

/* ByteFallback: a run of <0xNN> tokens becomes its bytes when they are valid UTF-8, else one
 * U+FFFD per byte (raw mode keeps the bytes). */
static void flush_bytes(struct tlist *out, const struct uc_buf *bytes, const struct dec_mode *m)
{
    if (bytes->len == 0) {
        return;
    }
    if (m->raw || utf8_first_invalid(bytes->data, bytes->len) == bytes->len) {
        tlist_push(out, bytes->data, bytes->len);
        return;
    }
    for (size_t i = 0; i < bytes->len; i++) {
        tlist_push(out, REPLACEMENT_CHAR, 3);
    }
}

/* The bytes of one token under the ByteLevel decoder: every char mapped back to its byte, or the
 * token's own bytes when a char is not in the table. */
static void byte_level_token(const struct uc_tokenizer *tok, const char *s, size_t n,
                             struct uc_buf *out)
{
    size_t start = out->len;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        bool ok;
        size_t k = utf8_scan((const unsigned char *)s + i, n - i, &cp, &ok);
        if (!ok || cp >= sizeof tok->u2b / sizeof *tok->u2b || tok->u2b[cp] < 0) {
            out->len = start;
            uc_buf_append(out, s, n);
            return;
        }
        char b = (char)tok->u2b[cp];
        uc_buf_append(out, &b, 1);
        i += k;
    }
}

static uc_status run_decoder(const struct uc_tokenizer *tok, const struct dec *d,
                             struct dec_ws *dw, const struct tlist *in, struct tlist *out,
                             const struct dec_mode *m, bool *fused)
{
    for (int64_t i = 0; i < in->n || (d->kind == DEC_FUSE && i == 0); i++) {
        size_t n = 0;
        const char *s = in->n > 0 ? tlist_get(in, i, &n) : "";
        switch (d->kind) {
        case DEC_REPLACE: {
            uc_status rc = find_spans(tok, &d->pat, NULL, s, n, dw->md, false, &dw->spans);
            if (rc != UC_OK) {
                return rc;
            }
            for (int64_t k = 0; k < dw->spans.n; k++) {
                const struct span *sp = &dw->spans.v[k];
                if (sp->m) {
                    uc_buf_append(&out->text, d->content, d->content_len);
                } else {
                    uc_buf_append(&out->text, s + sp->s, sp->e - sp->s);
                }
            }
            tlist_end(out);
            break;
        }
        case DEC_BYTE_FALLBACK: {
            unsigned char b;
            if (byte_token(s, n, &b)) {
                uc_buf_append(&dw->tmp, &b, 1);
            } else {
                flush_bytes(out, &dw->tmp, m);
                dw->tmp.len = 0;
                tlist_push(out, s, n);
            }
            if (i == in->n - 1) {
                flush_bytes(out, &dw->tmp, m);
                dw->tmp.len = 0;
            }
            break;
        }
        case DEC_FUSE:
            uc_buf_append(&out->text, s, n);
            if (i == in->n - 1 || in->n == 0) {
                tlist_end(out);
                *fused = true;
            }
            break;
        case DEC_STRIP: {
            bool whole = m->stream && *fused; /* a streamed piece of one fused string */
            size_t a = 0, b = n;
            for (int64_t k = 0; (!whole || m->first) && k < d->start; k++) {
                if (b - a >= d->ch_len && memcmp(s + a, d->ch, d->ch_len) == 0) {
                    a += d->ch_len;
                } else {
                    break;
                }
            }
            for (int64_t k = 0; !whole && k < d->stop; k++) {
                if (b - a >= d->ch_len && memcmp(s + b - d->ch_len, d->ch, d->ch_len) == 0) {
                    b -= d->ch_len;
                } else {
                    break;
                }
            }
            tlist_push(out, s + a, b - a);
            break;
        }
        case DEC_METASPACE: {
            bool drop = i == 0 && d->scheme != PREPEND_NEVER && (!m->stream || m->first);
            size_t run = 0;
            for (size_t k = 0; k + d->ch_len <= n;) {
                if (memcmp(s + k, d->ch, d->ch_len) == 0) {
                    uc_buf_append(&out->text, s + run, k - run);
                    if (!drop) {
                        uc_buf_append(&out->text, " ", 1);
                    }
                    k += d->ch_len;
                    run = k;
                } else {
                    k++;
                }
            }
            uc_buf_append(&out->text, s + run, n - run);
            tlist_end(out);
            break;
        }
        case DEC_BYTE_LEVEL:
            byte_level_token(tok, s, n, &dw->tmp);
            if (i == in->n - 1) {
                if (!m->raw) {
                    buf_append_lossy(&out->text, dw->tmp.data, dw->tmp.len);
                } else if (dw->tmp.len > 0) {
                    uc_buf_append(&out->text, dw->tmp.data, dw->tmp.len);
                }
                tlist_end(out);
                dw->tmp.len = 0;
                *fused = true;
            }
            break;
        }
    }
    if (d->kind == DEC_BYTE_LEVEL && in->n == 0) {
        tlist_end(out); /* one empty string, as the reference returns */
        *fused = true;
    }
    if (tlist_failed(out) || dw->tmp.oom || dw->spans.oom) {
        return UC_ERRF(UC_ERR_NOMEM, "decode tokens=%lld", (long long)in->n);
    }
    return UC_OK;
}

/* Runs every decoder over dw->ta and joins the result into `joined` (raw bytes). */
static uc_status run_decoders(const struct uc_tokenizer *tok, struct dec_ws *dw,
                              const struct dec_mode *m, struct uc_buf *joined)
{
    struct tlist *in = &dw->ta, *out = &dw->tb;
    bool fused = false;
    for (int64_t i = 0; i < tok->n_decs; i++) {
        tlist_clear(out);
        dw->tmp.len = 0;
        uc_status rc = run_decoder(tok, &tok->decs[i], dw, in, out, m, &fused);
        if (rc != UC_OK) {
            return rc;
        }
        struct tlist *t = in;
        in = out;
        out = t;
    }
    for (int64_t i = 0; i < in->n; i++) {
        size_t n;
        const char *s = tlist_get(in, i, &n);
        if (!tok->has_decoder && (i > 0 || (m->stream && !m->first))) {
            uc_buf_append(joined, " ", 1); /* no decoder: tokens joined with spaces */
        }
        uc_buf_append(joined, s, n);
    }
    if (joined->oom) {
        return UC_ERRF(UC_ERR_NOMEM, "decode bytes=%zu", joined->len);
    }
    return UC_OK;
}

/* Precomputes uc_tokenizer_token_bytes for every id, first and not first. */
static uc_status build_stream_bytes(struct uc_tokenizer *tok)
{
    size_t nv = (size_t)tok->n_vocab;
    struct dec_ws dw = {0};
    struct uc_buf pool, one;
    uc_buf_init(&pool);
    uc_buf_init(&one);
    uc_status rc = UC_OK;
    tok->sb_off = uc_malloc(nv * sizeof *tok->sb_off);
    tok->sbf_off = uc_malloc(nv * sizeof *tok->sbf_off);
    tok->sb_len = uc_calloc(nv, sizeof *tok->sb_len);
    tok->sbf_len = uc_calloc(nv, sizeof *tok->sbf_len);
    dw.md = pcre2_match_data_create(1, tok->gctx);
    if (!tok->sb_off || !tok->sbf_off || !tok->sb_len || !tok->sbf_len || !dw.md) {
        rc = UC_ERRF(UC_ERR_NOMEM, "stream tables vocab=%zu", nv);
        goto out;
    }
    for (size_t id = 0; id < nv; id++) {
        size_t n;
        const char *s = id_string(tok, (int32_t)id, &n);
        tok->sb_off[id] = tok->sbf_off[id] = 0;
        if (!s) {
            continue;
        }
        for (int first = 0; first < 2; first++) {
            struct dec_mode m = {.raw = true, .stream = true, .first = first == 1};
            tlist_clear(&dw.ta);
            tlist_push(&dw.ta, s, n);
            if (tlist_failed(&dw.ta)) {
                rc = UC_ERRF(UC_ERR_NOMEM, "stream tables");
                goto out;
            }
            one.len = 0;
            UC_CHECK(run_decoders(tok, &dw, &m, &one), rc, out);
            int64_t *off = first ? tok->sbf_off : tok->sb_off;
            uint32_t *len = first ? tok->sbf_len : tok->sb_len;
            if (first && one.len == tok->sb_len[id] &&
                (one.len == 0 || memcmp(pool.data + tok->sb_off[id], one.data, one.len) == 0)) {
                off[id] = tok->sb_off[id];
                len[id] = tok->sb_len[id];
                continue;
            }
            off[id] = (int64_t)pool.len;
            len[id] = (uint32_t)one.len;
            if (one.len > 0) {
                uc_buf_append(&pool, one.data, one.len);
            }
            if (pool.oom) {
                rc = UC_ERRF(UC_ERR_NOMEM, "stream tables bytes=%zu", pool.len);
                goto out;
            }
        }
    }
    tok->sb_pool = uc_buf_take(&pool);
    if (!tok->sb_pool) {
        rc = UC_ERRF(UC_ERR_NOMEM, "stream tables");
    }
out:
    uc_buf_fini(&pool);
    uc_buf_fini(&one);
    dec_ws_fini(&dw);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Public API
 * ------------------------------------------------------------------------------------------- */

void uc_tokenizer_destroy(struct uc_tokenizer *tok)
{
    if (!tok) {
        return;
    }
    uc_free(tok->pool);
    uc_free(tok->ventries);
    uc_free(tok->vslot);
    uc_free(tok->id_entry);
    uc_free(tok->mkey);
    uc_free(tok->mrank);
    uc_free(tok->mnew);
    for (int64_t i = 0; i < tok->n_added; i++) {
        uc_free(tok->added[i].content);
        uc_free(tok->added[i].ncontent);
    }
    uc_free(tok->added);
    uc_free(tok->added_idx);
    uc_free(tok->raw_set.order);
    uc_free(tok->norm_set.order);
    uc_free(tok->cs_prefix);
    uc_free(tok->eow_suffix);
    norms_clear(tok);
    pres_clear(tok);
    decs_clear(tok);
    uc_free(tok->norms);
    uc_free(tok->pres);
    uc_free(tok->decs);
    uc_free(tok->tmpl_pre.v);
    uc_free(tok->tmpl_post.v);
    pcre2_code_free(tok->re_gpt2);
    pcre2_code_free(tok->re_word);
    pcre2_match_context_free(tok->mctx);
    pcre2_compile_context_free(tok->cctx);
    pcre2_general_context_free(tok->gctx);
    uc_free(tok->sb_pool);
    uc_free(tok->sb_off);
    uc_free(tok->sbf_off);
    uc_free(tok->sb_len);
    uc_free(tok->sbf_len);
    uc_free(tok);
}

uc_status uc_tokenizer_create_from_json(struct uc_tokenizer **out, const char *json_text,
                                        const char *path)
{
    if (!out) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "out is NULL");
    }
    *out = NULL;
    if (!path) {
        path = "(json)";
    }
    if (!json_text) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "file=%s json_text is NULL", path);
    }
    uc_status rc = UC_OK;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json_text, &end, false);
    if (!root || !cJSON_IsObject(root)) {
        size_t at = end ? (size_t)(end - json_text) : 0;
        rc = UC_ERRF(UC_ERR_FORMAT, "file=%s is not a JSON object (error near byte %zu)", path, at);
        goto out_free_json;
    }
    struct uc_tokenizer *tok = uc_calloc(1, sizeof *tok);
    if (!tok) {
        rc = UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
        goto out_free_json;
    }
    init_byte_tables(tok);
    tok->gctx = pcre2_general_context_create(pcre_alloc, pcre_release, NULL);
    tok->cctx = tok->gctx ? pcre2_compile_context_create(tok->gctx) : NULL;
    tok->mctx = tok->gctx ? pcre2_match_context_create(tok->gctx) : NULL;
    if (!tok->mctx || !tok->cctx) {
        rc = UC_ERRF(UC_ERR_NOMEM, "file=%s pcre2 contexts", path);
        goto out_destroy_tok;
    }
    UC_CHECK(load(tok, root, path), rc, out_destroy_tok);
    UC_LOG_DEBUG("tokenizer: file=%s kind=%s vocab=%lld merges=%lld added=%lld bos=%d eos=%d",
                 path, uc_tokenizer_kind(tok), (long long)tok->n_vocab, (long long)tok->n_merges,
                 (long long)tok->n_added, tok->bos, tok->eos);
    *out = tok;
    tok = NULL;
out_destroy_tok:
    uc_tokenizer_destroy(tok);
out_free_json:
    cJSON_Delete(root);
    return rc;
}

uc_status uc_tokenizer_create(struct uc_tokenizer **out, const char *model_dir)
{
    if (!out || !model_dir) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "out or model_dir is NULL");
    }
    *out = NULL;
    uc_status rc;
    char *json = NULL;
    struct uc_tokenizer *tok = NULL;
    char *path = uc_path_join(model_dir, "tokenizer.json");
    if (!path) {
        return UC_ERRF(UC_ERR_NOMEM, "dir=%s", model_dir);
    }
    UC_CHECK(uc_file_read_all(&json, NULL, path), rc, out_free_path);
    UC_CHECK(uc_tokenizer_create_from_json(&tok, json, path), rc, out_free_json);
    *out = tok;
out_free_json:
    uc_free(json);
out_free_path:
    uc_free(path);
    return rc;
}

uc_status uc_tokenizer_encode(const struct uc_tokenizer *tok, const char *text, size_t len,
                              bool add_special, int32_t **ids, int64_t *n_ids)
{
    return uc_tokenizer_encode_msg(tok, text, len, add_special, ids, n_ids, NULL, 0);
}

uc_status uc_tokenizer_encode_msg(const struct uc_tokenizer *tok, const char *text, size_t len,
                                  bool add_special, int32_t **ids, int64_t *n_ids, char *msg,
                                  size_t msg_size)
{
    if (msg && msg_size > 0) {
        msg[0] = '\0';
    }
    if (!ids || !n_ids) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "ids or n_ids is NULL");
    }
    *ids = NULL;
    *n_ids = 0;
    if (!tok || (!text && len > 0)) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "tokenizer or text is NULL");
    }
    size_t bad = utf8_first_invalid(text, len);
    if (bad < len) {
        if (msg && msg_size > 0) {
            snprintf(msg, msg_size, "not valid UTF-8 at byte %zu of %zu (0x%02X)", bad, len,
                     (unsigned)(unsigned char)text[bad]);
        }
        return UC_ERRF(UC_ERR_INVALID_ARG, "text is not valid UTF-8 at byte %zu of %zu", bad, len);
    }
    uc_status rc = UC_OK;
    struct ivec out = {0};
    struct enc_ws ws = {0};
    ws.md = pcre2_match_data_create(1, tok->gctx);
    if (!ws.md) {
        rc = UC_ERRF(UC_ERR_NOMEM, "match data");
        goto out_free;
    }
    if (add_special) {
        ivec_append(&out, &tok->tmpl_pre);
    }
    UC_CHECK(encode_text(tok, &ws, text ? text : "", len, &out), rc, out_free);
    if (add_special) {
        ivec_append(&out, &tok->tmpl_post);
    }
    if (!out.v) {
        ivec_push(&out, 0); /* an allocation the caller can free, even when empty */
        out.n = 0;
    }
    if (out.oom) {
        rc = UC_ERRF(UC_ERR_NOMEM, "encode ids=%lld", (long long)out.n);
        goto out_free;
    }
    *ids = out.v;
    *n_ids = out.n;
    out.v = NULL;
out_free:
    if (rc != UC_OK && msg && msg_size > 0) {
        snprintf(msg, msg_size, "%s (the server log has the details)", uc_status_str(rc));
    }
    uc_free(out.v);
    enc_ws_fini(&ws);
    return rc;
}

uc_status uc_tokenizer_decode(const struct uc_tokenizer *tok, const int32_t *ids, int64_t n_ids,
                              bool skip_special, char **text, size_t *len)
{
    if (!text) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "text is NULL");
    }
    *text = NULL;
    if (len) {
        *len = 0;
    }
    if (!tok || n_ids < 0 || (!ids && n_ids > 0)) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "tokenizer or ids invalid (n_ids=%lld)",
                       (long long)n_ids);
    }
    for (int64_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= tok->n_vocab) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "id=%d at index %lld is outside the vocabulary "
                           "(size %lld)", ids[i], (long long)i, (long long)tok->n_vocab);
        }
    }
    uc_status rc = UC_OK;
    struct dec_ws dw = {0};
    struct uc_buf joined, res;
    uc_buf_init(&joined);
    uc_buf_init(&res);
    dw.md = pcre2_match_data_create(1, tok->gctx);
    if (!dw.md) {
        rc = UC_ERRF(UC_ERR_NOMEM, "match data");
        goto out_free;
    }
    for (int64_t i = 0; i < n_ids; i++) {
        size_t n;
        const char *s = id_string(tok, ids[i], &n);
        if (!s || (skip_special && uc_tokenizer_is_special(tok, ids[i]))) {
            continue; /* an id with no string is skipped, as the reference does */
        }
        tlist_push(&dw.ta, s, n);
    }
    if (tlist_failed(&dw.ta)) {
        rc = UC_ERRF(UC_ERR_NOMEM, "decode ids=%lld", (long long)n_ids);
        goto out_free;
    }
    struct dec_mode m = {.raw = false, .stream = false, .first = true};
    UC_CHECK(run_decoders(tok, &dw, &m, &joined), rc, out_free);
    buf_append_lossy(&res, joined.data ? joined.data : "", joined.len);
    if (res.oom) {
        rc = UC_ERRF(UC_ERR_NOMEM, "decode bytes=%zu", joined.len);
        goto out_free;
    }
    if (len) {
        *len = res.len;
    }
    *text = uc_buf_take(&res);
    if (!*text) {
        rc = UC_ERRF(UC_ERR_NOMEM, "decode");
    }
out_free:
    uc_buf_fini(&joined);
    uc_buf_fini(&res);
    dec_ws_fini(&dw);
    return rc;
}

size_t uc_tokenizer_token_bytes(const struct uc_tokenizer *tok, int32_t id, bool first, char *out,
                                size_t cap)
{
    if (!tok || id < 0 || id >= tok->n_vocab) {
        return 0;
    }
    int64_t off = first ? tok->sbf_off[id] : tok->sb_off[id];
    size_t n = first ? tok->sbf_len[id] : tok->sb_len[id];
    if (out && cap > 0) {
        memcpy(out, tok->sb_pool + off, n < cap ? n : cap);
    }
    return n;
}

int64_t uc_tokenizer_vocab_size(const struct uc_tokenizer *tok) { return tok ? tok->n_vocab : 0; }

int32_t uc_tokenizer_bos(const struct uc_tokenizer *tok) { return tok ? tok->bos : -1; }

int32_t uc_tokenizer_eos(const struct uc_tokenizer *tok) { return tok ? tok->eos : -1; }

bool uc_tokenizer_is_special(const struct uc_tokenizer *tok, int32_t id)
{
    if (!tok || id < 0 || id >= tok->n_vocab || tok->added_idx[id] < 0) {
        return false;
    }
    return tok->added[tok->added_idx[id]].special;
}

const char *uc_tokenizer_token_str(const struct uc_tokenizer *tok, int32_t id)
{
    size_t n;
    return tok ? id_string(tok, id, &n) : NULL;
}

const char *uc_tokenizer_kind(const struct uc_tokenizer *tok)
{
    return tok && tok->byte_level ? "bpe-bytelevel" : "bpe-sentencepiece";
}
