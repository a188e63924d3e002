/* A model's chat template: loaded from --chat-template FILE, else MODEL_DIR/chat_template.jinja,
 * else tokenizer_config.json's chat_template (a string, or a list of named templates of which
 * "default" is used), with its bos_token and eos_token, and rendered from OpenAI-style messages
 * the way transformers' apply_chat_template renders them (the messages, add_generation_prompt,
 * bos_token, eos_token). Content given as a list of text parts is joined into one string (with
 * "\n"), as vLLM does for templates that expect strings. Immutable after load: any thread may
 * render. */
#ifndef UC_DAEMON_CHAT_TEMPLATE_H
#define UC_DAEMON_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

#include <cjson/cJSON.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_chat_template;

/* Loads the template for a model. file (may be NULL or "") overrides the model's own. A model
 * without any template is UC_OK with *out NULL. A template outside the supported Jinja subset is
 * UC_ERR_UNSUPPORTED with a message naming the construct and the file. */
uc_status uc_chat_template_load(struct uc_chat_template **out, const char *model_dir,
                                const char *file, char *msg, size_t msg_size);
/* A template from text, with the given special tokens (NULL = ""); for tests. */
uc_status uc_chat_template_create(struct uc_chat_template **out, const char *text,
                                  const char *bos_token, const char *eos_token, char *msg,
                                  size_t msg_size);
void uc_chat_template_destroy(struct uc_chat_template *ct);
/* Where it came from (a path) for logs. */
const char *uc_chat_template_origin(const struct uc_chat_template *ct);

/* Checks an OpenAI messages array (borrowed): each an object with a role (system, user,
 * assistant, tool, developer) and content as a string, null (assistant) or a list of
 * {"type": "text", "text": ...} parts. On failure UC_ERR_INVALID_ARG and a message naming the
 * field ("messages[2].content[0].type ..."). */
uc_status uc_chat_messages_validate(const cJSON *messages, char *msg, size_t msg_size);

/* Renders the prompt text (uc_malloc'd into *out, *out_len bytes). extra (may be NULL) is an
 * object of more template variables (e.g. chat_template_kwargs). A raise_exception in the
 * template is UC_ERR_INVALID_ARG with its message. */
uc_status uc_chat_template_render(const struct uc_chat_template *ct, const cJSON *messages,
                                  bool add_generation_prompt, const cJSON *extra, char **out,
                                  size_t *out_len, char *msg, size_t msg_size);

#ifdef __cplusplus
}
#endif
#endif
