/* Growable arrays (ids, spans, pre-token pieces, decoder tokens) and the UTF-8 helpers
 * the rest of the tokenizer shares. */
#include "tokenizer_impl.h"

/* Grows p (cap elements of elem bytes) to hold at least need elements; on failure returns p
 * unchanged and clears *ok. */
void *tok_grow_array(void *p, int64_t *cap, int64_t need, size_t elem, bool *ok)
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

void tok_ivec_push(struct ivec *a, int32_t x)
{
    bool ok = true;
    a->v = tok_grow_array(a->v, &a->cap, a->n + 1, sizeof *a->v, &ok);
    if (!ok || a->oom) {
        a->oom = true;
        return;
    }
    a->v[a->n++] = x;
}

void tok_ivec_append(struct ivec *a, const struct ivec *b)
{
    for (int64_t i = 0; i < b->n; i++) {
        tok_ivec_push(a, b->v[i]);
    }
}

void tok_svec_push(struct svec *a, size_t s, size_t e, bool m)
{
    bool ok = true;
    a->v = tok_grow_array(a->v, &a->cap, a->n + 1, sizeof *a->v, &ok);
    if (!ok || a->oom) {
        a->oom = true;
        return;
    }
    a->v[a->n++] = (struct span){.s = s, .e = e, .m = m};
}

void tok_plist_clear(struct plist *l)
{
    l->text.len = 0;
    l->n = 0;
}

/* Ends a piece that began at text offset `off` (its bytes are already appended). */
void tok_plist_end(struct plist *l, size_t off, bool first)
{
    if (l->text.len == off) {
        return; /* empty pieces are dropped, as the reference does */
    }
    bool ok = true;
    l->p = tok_grow_array(l->p, &l->cap, l->n + 1, sizeof *l->p, &ok);
    if (!ok || l->oom) {
        l->oom = true;
        return;
    }
    l->p[l->n++] = (struct piece){.off = off, .len = l->text.len - off, .first = first};
}

void tok_plist_fini(struct plist *l)
{
    uc_buf_fini(&l->text);
    UC_FREE(l->p);
    l->n = l->cap = 0;
}

void tok_tlist_clear(struct tlist *l)
{
    l->text.len = 0;
    if (l->text.data) {
        l->text.data[0] = '\0';
    }
    l->n = 0;
}

void tok_tlist_end(struct tlist *l)
{
    bool ok = true;
    l->end = tok_grow_array(l->end, &l->cap, l->n + 1, sizeof *l->end, &ok);
    if (!ok || l->oom) {
        l->oom = true;
        return;
    }
    l->end[l->n++] = l->text.len;
}

void tok_tlist_push(struct tlist *l, const char *s, size_t n)
{
    uc_buf_append(&l->text, s, n);
    tok_tlist_end(l);
}

const char *tok_tlist_get(const struct tlist *l, int64_t i, size_t *n)
{
    size_t s = i == 0 ? 0 : l->end[i - 1];
    *n = l->end[i] - s;
    return l->text.data ? l->text.data + s : "";
}

void tok_tlist_fini(struct tlist *l)
{
    uc_buf_fini(&l->text);
    UC_FREE(l->end);
    l->n = l->cap = 0;
}

bool tok_tlist_failed(const struct tlist *l) { return l->oom || l->text.oom; }

/* Scans one sequence at s[0..n) (n >= 1). When it is well-formed, sets *ok, stores the code point
 * and returns its length; otherwise returns the length of the maximal ill-formed subpart (>= 1),
 * which is what one U+FFFD replaces in String::from_utf8_lossy. */
size_t tok_utf8_scan(const unsigned char *s, size_t n, uint32_t *cp, bool *ok)
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
size_t tok_utf8_lead_len(unsigned char b)
{
    return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

/* Returns the offset of the first ill-formed byte, or n when s is valid UTF-8. */
size_t tok_utf8_first_invalid(const char *s, size_t n)
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
        size_t k = tok_utf8_scan(u + i, n - i, &cp, &ok);
        if (!ok) {
            return i;
        }
        i += k;
    }
    return n;
}

/* Appends s with every ill-formed subpart replaced by U+FFFD (String::from_utf8_lossy). */
void tok_buf_append_lossy(struct uc_buf *out, const char *s, size_t n)
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
        size_t k = tok_utf8_scan(u + i, n - i, &cp, &ok);
        if (!ok) {
            uc_buf_append(out, s + run, i - run);
            uc_buf_append(out, REPLACEMENT_CHAR, 3);
            run = i + k;
        }
        i += k;
    }
    uc_buf_append(out, s + run, n - run);
}

size_t tok_utf8_encode(uint32_t cp, char out[4])
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
size_t tok_white_prefix(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        bool ok;
        size_t k = tok_utf8_scan((const unsigned char *)s + i, n - i, &cp, &ok);
        if (!ok || !is_white_space(cp)) {
            break;
        }
        i += k;
    }
    return i;
}

/* Offset where the whitespace run that ends s[0..n) begins. */
size_t tok_white_suffix_start(const char *s, size_t n)
{
    size_t end = n;
    while (end > 0) {
        size_t st = end - 1;
        while (st > 0 && ((unsigned char)s[st] & 0xC0) == 0x80) {
            st--;
        }
        uint32_t cp;
        bool ok;
        tok_utf8_scan((const unsigned char *)s + st, end - st, &cp, &ok);
        if (!ok || !is_white_space(cp)) {
            break;
        }
        end = st;
    }
    return end;
}
