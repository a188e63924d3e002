/* API keys: the keys of --api-key, --api-key-file (one a line; '#' comments) and --admin-api-key,
 * checked in constant time (per key: the time does not depend on where a guess differs). Used by
 * the HTTP front (Authorization: Bearer KEY) and gRPC (metadata "authorization: Bearer KEY" or
 * "x-api-key: KEY"). Without any key everything is open. Immutable after create: any thread may
 * check. */
#ifndef UC_DAEMON_AUTH_H
#define UC_DAEMON_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_auth;

/* key, key_file and admin_key may be NULL or "". A key file that cannot be read, or a key
 * shorter than 8 bytes or holding spaces or control bytes, is UC_ERR_INVALID_ARG with a message. */
uc_status uc_auth_create(struct uc_auth **out, const char *key, const char *key_file,
                         const char *admin_key, char *msg, size_t msg_size);
void uc_auth_destroy(struct uc_auth *a);

/* Whether inference needs a key (any key configured). */
bool uc_auth_enabled(const struct uc_auth *a);
/* Whether admin calls need the admin key. */
bool uc_auth_admin_enabled(const struct uc_auth *a);
/* Checks a presented key (len bytes; NULL = none) for inference: any user key or the admin
 * key. Always true when no key is configured. NULL a is "no keys". */
bool uc_auth_check(const struct uc_auth *a, const char *key, size_t len);
/* Checks a key for admin calls: the admin key when one is set, else as uc_auth_check. */
bool uc_auth_check_admin(const struct uc_auth *a, const char *key, size_t len);
/* The key of an "Authorization" header value "Bearer KEY" (case-insensitive scheme, spaces
 * trimmed): *key points into value. False when the value has another form. */
bool uc_auth_bearer(const char *value, size_t value_len, const char **key, size_t *key_len);

#ifdef __cplusplus
}
#endif
#endif
