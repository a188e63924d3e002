/* Tokenizer (see tokenizer.h): loads a Hugging Face tokenizer.json into flat tables and runs the
 * reference pipeline: added tokens (matched in the raw text) -> normalizers -> pre-tokenizers ->
 * BPE -> post-processor template, and back through the decoders. The vocabulary and the merge
 * ranks live in open-addressing hash tables (merges keyed by the pair of ids); each pre-token word
 * is merged with a binary heap ordered by (rank, position), as the reference Word::merge_all does,
 * so ties resolve the same way. Regexes are PCRE2 (UTF + UCP, JIT when available). Everything is
 * built at load and read-only afterwards: encode/decode allocate a private workspace per call, so
 * they are thread-safe. The bytes each token streams are precomputed at load.
 *
 * This file holds the public entry points; the pipeline is split by job across this folder
 * (tokenizer_impl.h declares what they share): load.c reads tokenizer.json, bpe.c is the model,
 * added.c the added tokens and the encode pipeline around them, normalizers.c, pre_tokenizers.c,
 * template.c (the post-processor) and decoders.c one stage each, pattern.c the PCRE2 patterns,
 * text.c the arrays and UTF-8 helpers. */
#include "tokenizer_impl.h"

void tok_enc_ws_fini(struct enc_ws *ws)
{
    pcre2_match_data_free(ws->md);
    uc_buf_fini(&ws->na);
    uc_buf_fini(&ws->nb);
    uc_buf_fini(&ws->tmp);
    tok_plist_fini(&ws->pa);
    tok_plist_fini(&ws->pb);
    uc_free(ws->spans.v);
    uc_free(ws->keep.v);
    uc_free(ws->sym);
    uc_free(ws->heap);
}

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
    tok_norms_clear(tok);
    tok_pres_clear(tok);
    tok_decs_clear(tok);
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
    /* the library reads the file into a Rust String: bytes that are not UTF-8 are refused
     * there, and every string below (a Replace content, a vocabulary entry) may then assume
     * whole characters */
    size_t len = strlen(json_text);
    size_t bad = tok_utf8_first_invalid(json_text, len);
    if (bad < len) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s is not UTF-8 (byte %zu)", path, bad);
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
    tok_init_byte_tables(tok);
    tok->gctx = pcre2_general_context_create(tok_pcre_alloc, tok_pcre_release, NULL);
    tok->cctx = tok->gctx ? pcre2_compile_context_create(tok->gctx) : NULL;
    tok->mctx = tok->gctx ? pcre2_match_context_create(tok->gctx) : NULL;
    if (!tok->mctx || !tok->cctx) {
        rc = UC_ERRF(UC_ERR_NOMEM, "file=%s pcre2 contexts", path);
        goto out_destroy_tok;
    }
    UC_CHECK(tok_load(tok, root, path), rc, out_destroy_tok);
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
    size_t bad = tok_utf8_first_invalid(text, len);
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
        tok_ivec_append(&out, &tok->tmpl_pre);
    }
    UC_CHECK(tok_encode_text(tok, &ws, text ? text : "", len, &out), rc, out_free);
    if (add_special) {
        tok_ivec_append(&out, &tok->tmpl_post);
    }
    if (!out.v) {
        tok_ivec_push(&out, 0); /* an allocation the caller can free, even when empty */
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
    tok_enc_ws_fini(&ws);
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
        const char *s = tok_id_string(tok, ids[i], &n);
        if (!s || (skip_special && uc_tokenizer_is_special(tok, ids[i]))) {
            continue; /* an id with no string is skipped, as the reference does */
        }
        tok_tlist_push(&dw.ta, s, n);
    }
    if (tok_tlist_failed(&dw.ta)) {
        rc = UC_ERRF(UC_ERR_NOMEM, "decode ids=%lld", (long long)n_ids);
        goto out_free;
    }
    struct dec_mode m = {.raw = false, .stream = false, .first = true};
    UC_CHECK(tok_run_decoders(tok, &dw, &m, &joined), rc, out_free);
    tok_buf_append_lossy(&res, joined.data ? joined.data : "", joined.len);
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
    tok_dec_ws_fini(&dw);
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

int32_t uc_tokenizer_eos_added(const struct uc_tokenizer *tok)
{
    return tok ? tok->eos_added : -1;
}

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
    return tok ? tok_id_string(tok, id, &n) : NULL;
}

const char *uc_tokenizer_kind(const struct uc_tokenizer *tok)
{
    return tok && tok->byte_level ? "bpe-bytelevel" : "bpe-sentencepiece";
}
