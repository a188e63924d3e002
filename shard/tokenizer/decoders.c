/* Decoders: parsing (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence),
 * running them over token strings, and the bytes each token streams (precomputed at load). */
#include "tokenizer_impl.h"

static struct dec *dec_add(struct uc_tokenizer *tok, enum dec_kind kind)
{
    bool ok = true;
    tok->decs = tok_grow_array(tok->decs, &tok->cap_decs, tok->n_decs + 1, sizeof *tok->decs, &ok);
    if (!ok) {
        return NULL;
    }
    struct dec *d = &tok->decs[tok->n_decs++];
    memset(d, 0, sizeof *d);
    d->kind = kind;
    return d;
}

void tok_decs_clear(struct uc_tokenizer *tok)
{
    for (int64_t i = 0; i < tok->n_decs; i++) {
        tok_pattern_fini(&tok->decs[i].pat);
        UC_FREE(tok->decs[i].content);
    }
    tok->n_decs = 0;
}

uc_status tok_parse_decoder(struct uc_tokenizer *tok, const cJSON *d, const char *path,
                            const char *field, int depth)
{
    const char *type;
    uc_status trc = tok_component_type(d, path, field, depth, &type);
    if (trc != UC_OK || !type) {
        return trc;
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
            uc_status rc = tok_parse_decoder(tok, it, path, sub, depth + 1);
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
        const char *content = tok_jstr(d, "content");
        if (!content) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.content missing", path, field);
        }
        struct dec *dc = dec_add(tok, DEC_REPLACE);
        if (!dc || !(dc->content = uc_strdup(content))) {
            return NOMEM_FIELD(path, field);
        }
        dc->content_len = strlen(content);
        return tok_parse_pattern(tok, d, path, field, &dc->pat);
    }
    if (strcmp(type, "Strip") == 0) {
        struct dec *dc = dec_add(tok, DEC_STRIP);
        if (!dc) {
            return NOMEM_FIELD(path, field);
        }
        int64_t start = 0, stop = 0;
        const cJSON *js = cJSON_GetObjectItemCaseSensitive(d, "start");
        const cJSON *je = cJSON_GetObjectItemCaseSensitive(d, "stop");
        if ((js && !tok_jint(js, 0, 1 << 20, &start)) || (je && !tok_jint(je, 0, 1 << 20, &stop))) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.start/stop not small integers", path,
                           field);
        }
        dc->start = start;
        dc->stop = stop;
        return tok_parse_char(d, "content", " ", path, field, dc->ch, &dc->ch_len);
    }
    if (strcmp(type, "Metaspace") == 0) {
        struct dec *dc = dec_add(tok, DEC_METASPACE);
        if (!dc) {
            return NOMEM_FIELD(path, field);
        }
        uc_status rc =
            tok_parse_char(d, "replacement", METASPACE, path, field, dc->ch, &dc->ch_len);
        return rc != UC_OK ? rc : tok_parse_scheme(d, path, field, &dc->scheme);
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=%s.type value=%s (supported: Sequence, "
                   "ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)", path, field, type);
}

void tok_dec_ws_fini(struct dec_ws *dw)
{
    tok_tlist_fini(&dw->ta);
    tok_tlist_fini(&dw->tb);
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
    if (m->raw || tok_utf8_first_invalid(bytes->data, bytes->len) == bytes->len) {
        tok_tlist_push(out, bytes->data, bytes->len);
        return;
    }
    for (size_t i = 0; i < bytes->len; i++) {
        tok_tlist_push(out, REPLACEMENT_CHAR, 3);
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
        size_t k = tok_utf8_scan((const unsigned char *)s + i, n - i, &cp, &ok);
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
        const char *s = in->n > 0 ? tok_tlist_get(in, i, &n) : "";
        switch (d->kind) {
        case DEC_REPLACE: {
            uc_status rc = tok_find_spans(tok, &d->pat, NULL, s, n, dw->md, false, &dw->spans);
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
            tok_tlist_end(out);
            break;
        }
        case DEC_BYTE_FALLBACK: {
            unsigned char b;
            if (byte_token(s, n, &b)) {
                uc_buf_append(&dw->tmp, &b, 1);
            } else {
                flush_bytes(out, &dw->tmp, m);
                dw->tmp.len = 0;
                tok_tlist_push(out, s, n);
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
                tok_tlist_end(out);
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
            tok_tlist_push(out, s + a, b - a);
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
            tok_tlist_end(out);
            break;
        }
        case DEC_BYTE_LEVEL:
            byte_level_token(tok, s, n, &dw->tmp);
            if (i == in->n - 1) {
                if (!m->raw) {
                    tok_buf_append_lossy(&out->text, dw->tmp.data, dw->tmp.len);
                } else if (dw->tmp.len > 0) {
                    uc_buf_append(&out->text, dw->tmp.data, dw->tmp.len);
                }
                tok_tlist_end(out);
                dw->tmp.len = 0;
                *fused = true;
            }
            break;
        }
    }
    if (d->kind == DEC_BYTE_LEVEL && in->n == 0) {
        tok_tlist_end(out); /* one empty string, as the reference returns */
        *fused = true;
    }
    if (tok_tlist_failed(out) || dw->tmp.oom || dw->spans.oom) {
        return UC_ERRF(UC_ERR_NOMEM, "decode tokens=%lld", (long long)in->n);
    }
    return UC_OK;
}

/* Runs every decoder over dw->ta and joins the result into `joined` (raw bytes). */
uc_status tok_run_decoders(const struct uc_tokenizer *tok, struct dec_ws *dw,
                           const struct dec_mode *m, struct uc_buf *joined)
{
    struct tlist *in = &dw->ta, *out = &dw->tb;
    bool fused = false;
    for (int64_t i = 0; i < tok->n_decs; i++) {
        tok_tlist_clear(out);
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
        const char *s = tok_tlist_get(in, i, &n);
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
uc_status tok_build_stream_bytes(struct uc_tokenizer *tok)
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
        const char *s = tok_id_string(tok, (int32_t)id, &n);
        tok->sb_off[id] = tok->sbf_off[id] = 0;
        if (!s) {
            continue;
        }
        for (int first = 0; first < 2; first++) {
            struct dec_mode m = {.raw = true, .stream = true, .first = first == 1};
            tok_tlist_clear(&dw.ta);
            tok_tlist_push(&dw.ta, s, n);
            if (tok_tlist_failed(&dw.ta)) {
                rc = UC_ERRF(UC_ERR_NOMEM, "stream tables");
                goto out;
            }
            one.len = 0;
            UC_CHECK(tok_run_decoders(tok, &dw, &m, &one), rc, out);
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
    tok_dec_ws_fini(&dw);
    return rc;
}
