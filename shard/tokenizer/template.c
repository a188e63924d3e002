/* The post-processor: the TemplateProcessing single template (the ids it puts before and
 * after the text), and the BOS/EOS it adds. */
#include "tokenizer_impl.h"

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
            const char *name = tok_jstr(st, "id");
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
                if (!tok_jint(jid, 0, tok->n_vocab - 1, &id)) {
                    rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s.special_tokens[%s] id out of "
                                 "range (vocab=%lld)", path, field, name, (long long)tok->n_vocab);
                    goto out;
                }
                tok_ivec_push(seen_a ? &post : &pre, (int32_t)id);
            }
        } else if (sq) {
            const char *id = tok_jstr(sq, "id");
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
    tok_ivec_append(&pre, &tok->tmpl_pre); /* a later template wraps the earlier one */
    tok_ivec_append(&tok->tmpl_post, &post);
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

uc_status tok_parse_post_processor(struct uc_tokenizer *tok, const cJSON *p, const char *path,
                                   const char *field, int depth)
{
    const char *type;
    uc_status trc = tok_component_type(p, path, field, depth, &type);
    if (trc != UC_OK || !type) {
        return trc;
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
            uc_status rc = tok_parse_post_processor(tok, it, path, sub, depth + 1);
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

void tok_pick_special_ids(struct uc_tokenizer *tok)
{
    tok->bos = tok->tmpl_pre.n > 0 ? tok->tmpl_pre.v[0] : -1;
    tok->eos_added = tok->tmpl_post.n > 0 ? tok->tmpl_post.v[tok->tmpl_post.n - 1] : -1;
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
