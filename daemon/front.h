/* The parts of serving that both fronts share, started from the config: API keys (auth.h), the
 * chat template (chat_template.h), the rule that listening beyond loopback needs TLS and a key,
 * and the OpenAI-compatible HTTP front (http_openai.h). Keeps main.c to two calls. */
#ifndef UC_DAEMON_FRONT_H
#define UC_DAEMON_FRONT_H

#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"
#include "config.h"
#include "sched.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_front;
struct uc_auth;
struct uc_chat_template;
struct metrics;

/* Loads keys and the chat template and checks the listen rule (usage errors: UC_ERR_INVALID_ARG
 * or UC_ERR_UNSUPPORTED with msg; main exits 2). Does not listen yet. */
uc_status uc_front_create(struct uc_front **out, const struct uc_config *c, const char *model_dir,
                          char *msg, size_t msg_size);
/* Starts the HTTP front (unless --http-listen 0). state(user): 0 loading, 1 serving, 2 draining.
 * A busy default address is a warning; a busy explicit one is UC_ERR_IO. */
uc_status uc_front_start_http(struct uc_front *f, const struct uc_config *c,
                              struct uc_sched *sched, const struct uc_tokenizer *tok,
                              struct metrics *metrics, int64_t vocab, int64_t n_layers,
                              int64_t max_model_len, int (*state)(void *), void *state_user);
/* Stops the HTTP front (after uc_sched_run returned) and frees everything. NULL is fine. */
void uc_front_destroy(struct uc_front *f);

const struct uc_auth *uc_front_auth(const struct uc_front *f);
const struct uc_chat_template *uc_front_chat(const struct uc_front *f);
/* The served model name: --served-model-name, else the model folder's base name. */
const char *uc_front_model_name(const struct uc_front *f);
/* True for 127.0.0.0/8, ::1 and localhost. */
bool uc_front_is_loopback(const char *host_port);

#ifdef __cplusplus
}
#endif
#endif
