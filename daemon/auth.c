/* API keys (auth.h). Keys are compared through their SHA-256-free constant-time form: every
 * stored key is compared with the presented one over max(len) bytes with no early exit, and all
 * keys are always tried, so neither where a guess differs nor which key matched shows in the
 * time taken. */
#include "auth.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "base/mem.h"
#include "base/util.h"

#define MAX_KEYS 1024
#define MAX_KEY_BYTES 512

struct uc_auth {
    char **keys;
    size_t *lens;
    int n_keys;
    char *admin;
    size_t admin_len;
};

static bool ct_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    /* constant in the contents; the loop runs over the stored key's length */
    volatile unsigned char diff = (unsigned char)(alen != blen);
    for (size_t i = 0; i < blen; i++) {
        unsigned char x = i < alen ? (unsigned char)a[i] : 0;
        diff |= (unsigned char)(x ^ (unsigned char)b[i]);
    }
    return diff == 0;
}

static uc_status check_key(const char *k, size_t n, const char *what, char *msg, size_t msg_size)
{
    if (n < 8 || n > MAX_KEY_BYTES) {
        snprintf(msg, msg_size, "%s: an API key must be 8 to %d bytes long", what,
                 MAX_KEY_BYTES);
        return UC_ERR_INVALID_ARG;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)k[i];
        if (c <= 0x20 || c == 0x7f) {
            snprintf(msg, msg_size, "%s: an API key cannot hold spaces or control bytes", what);
            return UC_ERR_INVALID_ARG;
        }
    }
    return UC_OK;
}

static uc_status add_key(struct uc_auth *a, const char *k, size_t n, const char *what, char *msg,
                         size_t msg_size)
{
    uc_status rc = check_key(k, n, what, msg, msg_size);
    if (rc != UC_OK) {
        return rc;
    }
    if (a->n_keys >= MAX_KEYS) {
        snprintf(msg, msg_size, "%s: more than %d API keys", what, MAX_KEYS);
        return UC_ERR_INVALID_ARG;
    }
    if (a->n_keys % 16 == 0) {
        char **nk = uc_realloc(a->keys, (size_t)(a->n_keys + 16) * sizeof *nk);
        if (!nk) {
            return UC_ERR_NOMEM;
        }
        a->keys = nk;
        size_t *nl = uc_realloc(a->lens, (size_t)(a->n_keys + 16) * sizeof *nl);
        if (!nl) {
            return UC_ERR_NOMEM;
        }
        a->lens = nl;
    }
    char *d = uc_malloc(n + 1);
    if (!d) {
        return UC_ERR_NOMEM;
    }
    memcpy(d, k, n);
    d[n] = '\0';
    a->keys[a->n_keys] = d;
    a->lens[a->n_keys++] = n;
    return UC_OK;
}

uc_status uc_auth_create(struct uc_auth **out, const char *key, const char *key_file,
                         const char *admin_key, char *msg, size_t msg_size)
{
    *out = NULL;
    msg[0] = '\0';
    struct uc_auth *a = uc_calloc(1, sizeof *a);
    if (!a) {
        return UC_ERR_NOMEM;
    }
    uc_status rc = UC_OK;
    if (key && key[0]) {
        rc = add_key(a, key, strlen(key), "--api-key", msg, msg_size);
    }
    if (rc == UC_OK && key_file && key_file[0]) {
        char *text = NULL;
        size_t n = 0;
        if (uc_file_read_all(&text, &n, key_file) != UC_OK) {
            snprintf(msg, msg_size, "--api-key-file: cannot read %s", key_file);
            rc = UC_ERR_INVALID_ARG;
        } else {
            int line = 0;
            char *save = NULL;
            for (char *l = strtok_r(text, "\n", &save); l && rc == UC_OK;
                 l = strtok_r(NULL, "\n", &save)) {
                line++;
                size_t len = strlen(l);
                while (len && (l[len - 1] == '\r' || l[len - 1] == ' ' || l[len - 1] == '\t')) {
                    l[--len] = '\0';
                }
                while (*l == ' ' || *l == '\t') {
                    l++;
                    len--;
                }
                if (len == 0 || l[0] == '#') {
                    continue;
                }
                char what[96];
                snprintf(what, sizeof what, "--api-key-file %.60s line %d", key_file, line);
                rc = add_key(a, l, len, what, msg, msg_size);
            }
            if (rc == UC_OK && a->n_keys == 0) {
                snprintf(msg, msg_size, "--api-key-file %s holds no key", key_file);
                rc = UC_ERR_INVALID_ARG;
            }
            uc_free(text);
        }
    }
    if (rc == UC_OK && admin_key && admin_key[0]) {
        rc = check_key(admin_key, strlen(admin_key), "--admin-api-key", msg, msg_size);
        if (rc == UC_OK) {
            a->admin = uc_strdup(admin_key);
            a->admin_len = strlen(admin_key);
            rc = a->admin ? UC_OK : UC_ERR_NOMEM;
        }
    }
    if (rc != UC_OK) {
        if (rc == UC_ERR_NOMEM && !msg[0]) {
            snprintf(msg, msg_size, "out of memory");
        }
        uc_auth_destroy(a);
        return rc;
    }
    *out = a;
    return UC_OK;
}

void uc_auth_destroy(struct uc_auth *a)
{
    if (!a) {
        return;
    }
    for (int i = 0; i < a->n_keys; i++) {
        uc_free(a->keys[i]);
    }
    uc_free(a->keys);
    uc_free(a->lens);
    uc_free(a->admin);
    uc_free(a);
}

bool uc_auth_enabled(const struct uc_auth *a) { return a && (a->n_keys > 0 || a->admin); }
bool uc_auth_admin_enabled(const struct uc_auth *a) { return a && a->admin; }

bool uc_auth_check(const struct uc_auth *a, const char *key, size_t len)
{
    if (!uc_auth_enabled(a)) {
        return true;
    }
    if (!key) {
        key = "";
        len = 0;
    }
    bool ok = false;
    for (int i = 0; i < a->n_keys; i++) {
        ok |= ct_equal(key, len, a->keys[i], a->lens[i]);
    }
    if (a->admin) {
        ok |= ct_equal(key, len, a->admin, a->admin_len);
    }
    return ok;
}

bool uc_auth_check_admin(const struct uc_auth *a, const char *key, size_t len)
{
    if (!a || !a->admin) {
        return uc_auth_check(a, key, len);
    }
    if (!key) {
        key = "";
        len = 0;
    }
    return ct_equal(key, len, a->admin, a->admin_len);
}

bool uc_auth_bearer(const char *value, size_t value_len, const char **key, size_t *key_len)
{
    size_t i = 0;
    while (i < value_len && value[i] == ' ') {
        i++;
    }
    if (value_len - i < 7 || strncasecmp(value + i, "bearer ", 7) != 0) {
        return false;
    }
    i += 7;
    while (i < value_len && value[i] == ' ') {
        i++;
    }
    size_t e = value_len;
    while (e > i && (value[e - 1] == ' ' || value[e - 1] == '\t')) {
        e--;
    }
    *key = value + i;
    *key_len = e - i;
    return e > i;
}
