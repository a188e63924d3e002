/* Reading tokenizer.json: JSON field helpers, the size of the id space, GPT-2's byte tables,
 * and tok_load, which reads the model, added tokens, normalizer, pre-tokenizer, post-processor
 * and decoder in turn and builds what encoding and decoding need. */
#include "tokenizer_impl.h"

const char *tok_jstr(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

uc_status tok_component_type(const cJSON *c, const char *path, const char *field, int depth,
                             const char **type)
{
    *type = NULL;
    if (!c || cJSON_IsNull(c)) {
        return UC_OK;
    }
    *type = tok_jstr(c, "type");
    if (!*type || depth > MAX_DEPTH) {
        *type = NULL;
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.type missing or nested too deep", path,
                       field);
    }
    return UC_OK;
}

bool tok_jbool(const cJSON *o, const char *key, bool def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

bool tok_jint(const cJSON *v, int64_t lo, int64_t hi, int64_t *out)
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

/* Reads a one-character string field into ch (NUL-terminated). */
uc_status tok_parse_char(const cJSON *obj, const char *key, const char *def, const char *path,
                         const char *field, char ch[5], size_t *len)
{
    const char *s = tok_jstr(obj, key);
    if (!s) {
        s = def;
    }
    size_t n = s ? strlen(s) : 0;
    uint32_t cp;
    bool valid = false;
    if (n > 0 && n <= 4) {
        size_t k = tok_utf8_scan((const unsigned char *)s, n, &cp, &valid);
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

uc_status tok_parse_scheme(const cJSON *obj, const char *path, const char *field,
                           enum prepend_scheme *out)
{
    const char *s = tok_jstr(obj, "prepend_scheme");
    if (!s) {
        *out = tok_jbool(obj, "add_prefix_space", true) ? PREPEND_ALWAYS : PREPEND_NEVER;
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

/* Checks ids and sizes the id space: max id + 1 over the vocabulary and the added tokens. */
static uc_status size_vocab(struct uc_tokenizer *tok, const cJSON *vocab, const cJSON *added,
                            const char *path)
{
    int64_t max_id = -1;
    const cJSON *it;
    /* Every id sizes tables (V entries each), so an id may not exceed what the entries could
     * use: twice their number plus a little (real tokenizers use 0..entries-1, with at most a
     * few holes). A stray 2147483646 would otherwise ask for gigabytes. */
    int64_t n_entries =
        cJSON_GetArraySize(vocab) + (cJSON_IsArray(added) ? cJSON_GetArraySize(added) : 0);
    int64_t id_bound = 2 * n_entries + 1024;
    cJSON_ArrayForEach(it, vocab)
    {
        int64_t id;
        if (!tok_jint(it, 0, MAX_TOKEN_ID, &id)) {
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
        if (!tok_jint(cJSON_GetObjectItemCaseSensitive(it, "id"), 0, MAX_TOKEN_ID, &id) ||
            !tok_jstr(it, "content")) {
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

void tok_init_byte_tables(struct uc_tokenizer *tok)
{
    memset(tok->u2b, 0xff, sizeof tok->u2b);
    uint32_t extra = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        uint32_t cp = keep ? (uint32_t)b : 256 + extra++;
        char enc[4];
        size_t k = tok_utf8_encode(cp, enc);
        memcpy(tok->b2u[b], enc, k);
        tok->b2u_len[b] = (uint8_t)k;
        tok->u2b[cp] = (int16_t)b;
    }
}

uc_status tok_load(struct uc_tokenizer *tok, const cJSON *root, const char *path)
{
    uc_status rc;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=model missing", path);
    }
    UC_CHECK(tok_check_model(model, path), rc, out);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    UC_CHECK(size_vocab(tok, vocab, added, path), rc, out);
    UC_CHECK(tok_load_vocab(tok, vocab, path), rc, out);
    const char *pfx = tok_jstr(model, "continuing_subword_prefix");
    const char *sfx = tok_jstr(model, "end_of_word_suffix");
    tok->cs_prefix = uc_strdup(pfx ? pfx : "");
    tok->eow_suffix = uc_strdup(sfx ? sfx : "");
    if (!tok->cs_prefix || !tok->eow_suffix) {
        rc = UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
        goto out;
    }
    tok->cs_prefix_len = strlen(tok->cs_prefix);
    tok->eow_suffix_len = strlen(tok->eow_suffix);
    UC_CHECK(tok_load_merges(tok, cJSON_GetObjectItemCaseSensitive(model, "merges"), path), rc,
             out);
    UC_CHECK(tok_load_added(tok, added, path), rc, out);
    tok->fuse_unk = tok_jbool(model, "fuse_unk", false);
    tok->byte_fallback = tok_jbool(model, "byte_fallback", false);
    tok->ignore_merges = tok_jbool(model, "ignore_merges", false);
    const char *unk = tok_jstr(model, "unk_token");
    tok->unk_id = unk ? tok_vocab_find(tok, unk, strlen(unk)) : -1;
    if (unk && tok->unk_id < 0) {
        UC_LOG_WARN("tokenizer: file=%s unk_token=%s is not in the vocabulary; unknown "
                    "characters are dropped", path, unk);
    }
    UC_CHECK(tok_parse_normalizer(tok, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), path,
                                  "normalizer", 0), rc, out);
    UC_CHECK(tok_parse_pre_tokenizer(tok, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"),
                                     path, "pre_tokenizer", 0), rc, out);
    UC_CHECK(tok_parse_post_processor(tok, cJSON_GetObjectItemCaseSensitive(root, "post_processor"),
                                      path, "post_processor", 0), rc, out);
    UC_CHECK(tok_parse_decoder(tok, cJSON_GetObjectItemCaseSensitive(root, "decoder"), path,
                               "decoder", 0), rc, out);
    if (tok->any_single_word) {
        UC_CHECK(tok_regex_compile(tok, WORD_REGEX, strlen(WORD_REGEX), path, "added_tokens",
                                   &tok->re_word), rc, out);
    }
    UC_CHECK(tok_normalize_added(tok, path), rc, out);
    tok_pick_special_ids(tok);
    UC_CHECK(tok_build_stream_bytes(tok), rc, out);
out:
    return rc;
}
