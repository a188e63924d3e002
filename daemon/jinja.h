/* A Jinja subset for chat templates: what the chat templates of Llama-2, Llama-3/3.1, Mistral,
 * Qwen2/3 (ChatML) and Gemma use, rendered the way transformers' apply_chat_template and
 * transformers.js (@huggingface/jinja) render them (trim_blocks and lstrip_blocks on, one trailing
 * newline of the template dropped). Statements: if/elif/else, for (loop variable, else, filter,
 * break, continue), set (also of a namespace attribute and as a block), macro; expressions with
 * Jinja's precedence, filters, tests, string/list/dict methods, namespace, range and
 * raise_exception. Anything else is refused when the template is parsed, with a message naming
 * it. A parsed template is immutable: any thread may render it at the same time. */
#ifndef UC_DAEMON_JINJA_H
#define UC_DAEMON_JINJA_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_jinja;

/* Parses template text (len bytes). On failure *out is NULL and msg (msg_size bytes) says what and
 * where ("line 3: unsupported filter 'wordwrap'"): UC_ERR_UNSUPPORTED for a construct outside the
 * subset, UC_ERR_FORMAT for a syntax error, UC_ERR_NOMEM. */
uc_status uc_jinja_create(struct uc_jinja **out, const char *src, size_t len, char *msg,
                          size_t msg_size);
/* Frees a template; NULL is fine. */
void uc_jinja_destroy(struct uc_jinja *t);

/* Renders with the variables of a JSON object (borrowed). *out is uc_malloc'd, NUL-terminated,
 * owned by the caller; *out_len is its length. raise_exception(msg) and type errors are
 * UC_ERR_INVALID_ARG with the message; runaway templates (output over 16 MiB, too many steps or
 * too deep macro calls) are UC_ERR_INVALID_ARG too. */
uc_status uc_jinja_render(const struct uc_jinja *t, const cJSON *vars, char **out,
                          size_t *out_len, char *msg, size_t msg_size);

#ifdef __cplusplus
}
#endif
#endif
