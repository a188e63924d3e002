/* Chat templates (chat_template.h): finding the model's template and special tokens, checking
 * OpenAI messages, and rendering through the Jinja subset (jinja.h). */
#include "chat_template.h"

#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "jinja.h"

struct uc_chat_template {
    struct uc_jinja *tmpl;
    char *bos;
    char *eos;
    char *origin;
};

static char *dup_or_empty(const char *s) { return uc_strdup(s ? s : ""); }

uc_status uc_chat_template_create(struct uc_chat_template **out, const char *text,
                                  const char *bos_token, const char *eos_token, char *msg,
                                  size_t msg_size)
{
    *out = NULL;
    struct uc_chat_template *ct = uc_calloc(1, sizeof *ct);
    if (!ct) {
        snprintf(msg, msg_size, "out of memory");
        return UC_ERR_NOMEM;
    }
    ct->bos = dup_or_empty(bos_token);
    ct->eos = dup_or_empty(eos_token);
    ct->origin = uc_strdup("(text)");
    if (!ct->bos || !ct->eos || !ct->origin) {
        uc_chat_template_destroy(ct);
        snprintf(msg, msg_size, "out of memory");
        return UC_ERR_NOMEM;
    }
    uc_status rc = uc_jinja_create(&ct->tmpl, text, strlen(text), msg, msg_size);
    if (rc != UC_OK) {
        uc_chat_template_destroy(ct);
        return rc;
    }
    *out = ct;
    return UC_OK;
}

void uc_chat_template_destroy(struct uc_chat_template *ct)
{
    if (!ct) {
        return;
    }
    uc_jinja_destroy(ct->tmpl);
    uc_free(ct->bos);
    uc_free(ct->eos);
    uc_free(ct->origin);
    uc_free(ct);
}

const char *uc_chat_template_origin(const struct uc_chat_template *ct) { return ct->origin; }

/* bos_token / eos_token: a string or an AddedToken object {"content": ...} */
static const char *token_text(const cJSON *cfg, const char *key)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsString(t)) {
        return t->valuestring;
    }
    if (cJSON_IsObject(t)) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(t, "content");
        if (cJSON_IsString(c)) {
            return c->valuestring;
        }
    }
    return "";
}

uc_status uc_chat_template_load(struct uc_chat_template **out, const char *model_dir,
                                const char *file, char *msg, size_t msg_size)
{
    *out = NULL;
    msg[0] = '\0';
    uc_status rc = UC_OK;
    char *cfg_path = uc_path_join(model_dir, "tokenizer_config.json");
    char *jinja_path = uc_path_join(model_dir, "chat_template.jinja");
    char *cfg_text = NULL, *tmpl_text = NULL;
    cJSON *cfg = NULL;
    const char *origin = NULL;
    const char *text = NULL;
    if (!cfg_path || !jinja_path) {
        snprintf(msg, msg_size, "out of memory");
        rc = UC_ERR_NOMEM;
        goto out;
    }
    size_t n = 0;
    if (uc_file_exists(cfg_path)) {
        rc = uc_file_read_all(&cfg_text, &n, cfg_path);
        if (rc != UC_OK) {
            snprintf(msg, msg_size, "cannot read %s", cfg_path);
            goto out;
        }
        cfg = cJSON_Parse(cfg_text);
        if (!cfg) {
            snprintf(msg, msg_size, "%s is not valid JSON", cfg_path);
            rc = UC_ERR_FORMAT;
            goto out;
        }
    }
    if (file && file[0]) {
        rc = uc_file_read_all(&tmpl_text, &n, file);
        if (rc != UC_OK) {
            snprintf(msg, msg_size, "cannot read the chat template %s", file);
            goto out;
        }
        text = tmpl_text;
        origin = file;
    } else if (uc_file_exists(jinja_path)) {
        rc = uc_file_read_all(&tmpl_text, &n, jinja_path);
        if (rc != UC_OK) {
            snprintf(msg, msg_size, "cannot read %s", jinja_path);
            goto out;
        }
        text = tmpl_text;
        origin = jinja_path;
    } else if (cfg) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
        if (cJSON_IsString(t)) {
            text = t->valuestring;
        } else if (cJSON_IsArray(t)) {
            const cJSON *it;
            cJSON_ArrayForEach(it, t) {
                const cJSON *name = cJSON_GetObjectItemCaseSensitive(it, "name");
                const cJSON *tt = cJSON_GetObjectItemCaseSensitive(it, "template");
                if (cJSON_IsString(name) && cJSON_IsString(tt) &&
                    strcmp(name->valuestring, "default") == 0) {
                    text = tt->valuestring;
                }
            }
        }
        origin = cfg_path;
    }
    if (!text) {
        goto out; /* no template: UC_OK, *out NULL */
    }
    if (strlen(text) != n && text == tmpl_text) {
        snprintf(msg, msg_size, "%s holds a NUL byte", origin);
        rc = UC_ERR_FORMAT;
        goto out;
    }
    char why[400];
    struct uc_chat_template *ct = NULL;
    rc = uc_chat_template_create(&ct, text, cfg ? token_text(cfg, "bos_token") : "",
                                 cfg ? token_text(cfg, "eos_token") : "", why, sizeof why);
    if (rc != UC_OK) {
        snprintf(msg, msg_size, "chat template %s: %s", origin, why);
        goto out;
    }
    uc_free(ct->origin);
    ct->origin = uc_strdup(origin);
    if (!ct->origin) {
        uc_chat_template_destroy(ct);
        snprintf(msg, msg_size, "out of memory");
        rc = UC_ERR_NOMEM;
        goto out;
    }
    *out = ct;
out:
    cJSON_Delete(cfg);
    uc_free(cfg_text);
    uc_free(tmpl_text);
    uc_free(cfg_path);
    uc_free(jinja_path);
    return rc;
}

uc_status uc_chat_messages_validate(const cJSON *messages, char *msg, size_t msg_size)
{
    if (!cJSON_IsArray(messages)) {
        snprintf(msg, msg_size, "messages must be an array");
        return UC_ERR_INVALID_ARG;
    }
    int n = cJSON_GetArraySize(messages);
    if (n == 0) {
        snprintf(msg, msg_size, "messages is empty: give at least one message");
        return UC_ERR_INVALID_ARG;
    }
    int i = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, messages) {
        if (!cJSON_IsObject(m)) {
            snprintf(msg, msg_size, "messages[%d] must be an object", i);
            return UC_ERR_INVALID_ARG;
        }
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsString(role)) {
            snprintf(msg, msg_size, "messages[%d].role is missing or not a string", i);
            return UC_ERR_INVALID_ARG;
        }
        static const char *const roles[] = {"system", "user", "assistant", "tool", "developer",
                                            NULL};
        bool known = false;
        for (int k = 0; roles[k]; k++) {
            known = known || strcmp(role->valuestring, roles[k]) == 0;
        }
        if (!known) {
            snprintf(msg, msg_size, "messages[%d].role=\"%.32s\" must be one of system, user, "
                     "assistant, tool, developer", i, role->valuestring);
            return UC_ERR_INVALID_ARG;
        }
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        bool assistant = strcmp(role->valuestring, "assistant") == 0;
        if (cJSON_IsArray(c)) {
            int k = 0;
            const cJSON *part;
            cJSON_ArrayForEach(part, c) {
                const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
                const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
                if (!cJSON_IsString(type) || strcmp(type->valuestring, "text") != 0) {
                    snprintf(msg, msg_size, "messages[%d].content[%d].type must be \"text\" "
                             "(this server takes text only)", i, k);
                    return UC_ERR_INVALID_ARG;
                }
                if (!cJSON_IsString(text)) {
                    snprintf(msg, msg_size, "messages[%d].content[%d].text must be a string",
                             i, k);
                    return UC_ERR_INVALID_ARG;
                }
                k++;
            }
        } else if (!cJSON_IsString(c) && !(assistant && (!c || cJSON_IsNull(c)))) {
            snprintf(msg, msg_size, "messages[%d].content must be a string or a list of text "
                     "parts", i);
            return UC_ERR_INVALID_ARG;
        }
        i++;
    }
    return UC_OK;
}

/* A copy of the messages with text parts joined into one string. */
static cJSON *flatten(const cJSON *messages)
{
    cJSON *out = cJSON_Duplicate(messages, true);
    if (!out) {
        return NULL;
    }
    cJSON *m;
    cJSON_ArrayForEach(m, out) {
        cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        if (!cJSON_IsArray(c)) {
            continue;
        }
        struct uc_buf b;
        uc_buf_init(&b);
        int k = 0;
        const cJSON *part;
        cJSON_ArrayForEach(part, c) {
            const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
            if (cJSON_IsString(text)) {
                if (k++) {
                    uc_buf_append(&b, "\n", 1);
                }
                uc_buf_puts(&b, text->valuestring);
            }
        }
        cJSON *s = b.oom ? NULL : cJSON_CreateString(b.data ? b.data : "");
        uc_buf_fini(&b);
        if (!s || !cJSON_ReplaceItemInObjectCaseSensitive(m, "content", s)) {
            cJSON_Delete(s);
            cJSON_Delete(out);
            return NULL;
        }
    }
    return out;
}

uc_status uc_chat_template_render(const struct uc_chat_template *ct, const cJSON *messages,
                                  bool add_generation_prompt, const cJSON *extra, char **out,
                                  size_t *out_len, char *msg, size_t msg_size)
{
    *out = NULL;
    *out_len = 0;
    cJSON *vars = cJSON_CreateObject();
    cJSON *msgs = flatten(messages);
    uc_status rc = UC_OK;
    if (!vars || !msgs) {
        snprintf(msg, msg_size, "out of memory");
        rc = UC_ERR_NOMEM;
        goto out;
    }
    if (cJSON_IsObject(extra)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, extra) {
            cJSON *d = cJSON_Duplicate(e, true);
            if (!d) {
                rc = UC_ERR_NOMEM;
                snprintf(msg, msg_size, "out of memory");
                goto out;
            }
            cJSON_AddItemToObject(vars, e->string, d);
        }
    }
    cJSON_DeleteItemFromObjectCaseSensitive(vars, "messages");
    cJSON_AddItemToObject(vars, "messages", msgs);
    msgs = NULL;
    cJSON_DeleteItemFromObjectCaseSensitive(vars, "add_generation_prompt");
    cJSON_DeleteItemFromObjectCaseSensitive(vars, "bos_token");
    cJSON_DeleteItemFromObjectCaseSensitive(vars, "eos_token");
    if (!cJSON_AddBoolToObject(vars, "add_generation_prompt", add_generation_prompt) ||
        !cJSON_AddStringToObject(vars, "bos_token", ct->bos) ||
        !cJSON_AddStringToObject(vars, "eos_token", ct->eos)) {
        snprintf(msg, msg_size, "out of memory");
        rc = UC_ERR_NOMEM;
        goto out;
    }
    rc = uc_jinja_render(ct->tmpl, vars, out, out_len, msg, msg_size);
out:
    cJSON_Delete(msgs);
    cJSON_Delete(vars);
    return rc;
}
