/* Pieces main.c shares with the one-shot mode. */
#ifndef UC_DAEMON_DAEMON_H
#define UC_DAEMON_DAEMON_H

#include "config.h"
#include "sched.h"
#include "tokenizer.h"

/* Runs one request from --prompt/--prompt-file through the scheduler on this thread, printing
 * the completion to stdout as it streams (and the report to stderr with --report). Returns the
 * process exit code. */
int uc_oneshot_run(struct uc_sched *s, const struct uc_config *c, const struct uc_tokenizer *tok);
/* Fills compression parameters from the --policy ... options; message on failure. */
uc_status uc_config_compress(const struct uc_config *c, int64_t n_layers,
                             struct uc_compress_params *out, char *msg, size_t msg_size);

#endif
