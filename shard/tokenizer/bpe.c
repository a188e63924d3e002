/* The BPE model: the vocabulary and merge hash tables, loading model.vocab and model.merges,
 * and merging one pre-token word as the library's Word::merge_all does (a binary heap ordered
 * by rank, then position; byte fallback, unk, continuing-subword prefix, end-of-word suffix). */
#include "tokenizer_impl.h"

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
int32_t tok_vocab_find(const struct uc_tokenizer *tok, const char *s, size_t n)
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
const char *tok_id_string(const struct uc_tokenizer *tok, int32_t id, size_t *n)
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

/* Checks the BPE options the encoder does not implement. */
uc_status tok_check_model(const cJSON *model, const char *path)
{
    const char *type = tok_jstr(model, "type");
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
uc_status tok_load_vocab(struct uc_tokenizer *tok, const cJSON *vocab, const char *path)
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
        (void)tok_jint(it, 0, MAX_TOKEN_ID, &id); /* validated by the caller */
        size_t len = strlen(it->string);
        if (tok_vocab_find(tok, it->string, len) >= 0) {
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
        tok->byte_id[b] = tok_vocab_find(tok, name, 6);
    }
    return UC_OK;
}

/* Looks up one side of a merge, s[0..n). */
static uc_status merge_side(const struct uc_tokenizer *tok, const char *s, size_t n,
                            const char *path, int64_t rank, int32_t *id)
{
    *id = tok_vocab_find(tok, s, n);
    if (*id < 0) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model.merges[%lld] token \"%.*s\" is not in "
                       "the vocabulary", path, (long long)rank, (int)(n < 64 ? n : 64), s);
    }
    return UC_OK;
}

uc_status tok_load_merges(struct uc_tokenizer *tok, const cJSON *merges, const char *path)
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
    ws->sym = tok_grow_array(ws->sym, &ws->sym_cap, ws->sym_n + 1, sizeof *ws->sym, &ok);
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
uc_status tok_bpe_word(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *w,
                       size_t n, struct ivec *out)
{
    if (tok->ignore_merges) {
        int32_t id = tok_vocab_find(tok, w, n);
        if (id >= 0) {
            tok_ivec_push(out, id);
            return UC_OK;
        }
    }
    ws->sym_n = 0;
    bool have_unk = false;
    bool affixes = tok->cs_prefix_len > 0 || tok->eow_suffix_len > 0;
    for (size_t i = 0; i < n;) {
        size_t cl = tok_utf8_lead_len((unsigned char)w[i]);
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
            id = tok_vocab_find(tok, ws->tmp.data, ws->tmp.len);
        } else {
            id = tok_vocab_find(tok, w + i, cl);
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
        ws->heap = tok_grow_array(ws->heap, &ws->heap_cap, 3 * ws->sym_n, sizeof *ws->heap, &ok);
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
            tok_ivec_push(out, ws->sym[i].id);
        }
    }
    return UC_OK;
}
