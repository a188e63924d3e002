/* Profile JSON: written with cJSON, read back with every field and shape checked. */
#include "compress/profile.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/mem.h"
#include "base/util.h"
#include "compress/lorc.h"

uc_status uc_profile_init(struct uc_profile *p, int64_t n_layers, int64_t n_heads,
                          int64_t n_heads_kv, int64_t head_dim, int64_t hidden)
{
    memset(p, 0, sizeof *p);
    p->n_layers = n_layers;
    p->n_heads = n_heads;
    p->n_heads_kv = n_heads_kv;
    p->head_dim = head_dim;
    p->hidden = hidden;
    p->layer_entropy = uc_calloc((size_t)n_layers, sizeof(double));
    p->head_entropy = uc_calloc((size_t)(n_layers * n_heads), sizeof(double));
    p->kv_entropy = uc_calloc((size_t)(n_layers * n_heads_kv), sizeof(double));
    p->kv_group = uc_calloc((size_t)(n_layers * n_heads_kv), sizeof(int32_t));
    if (!p->layer_entropy || !p->head_entropy || !p->kv_entropy || !p->kv_group) {
        uc_profile_fini(p);
        return UC_ERRF(UC_ERR_NOMEM, "profile L=%lld H=%lld", (long long)n_layers,
                       (long long)n_heads);
    }
    p->head_groups = 2;
    p->stage_eps = 1.0;
    return UC_OK;
}

void uc_profile_fini(struct uc_profile *p)
{
    uc_free(p->layer_entropy);
    uc_free(p->head_entropy);
    uc_free(p->kv_entropy);
    uc_free(p->kv_group);
    uc_free(p->lorc_log_cond);
    uc_free(p->lorc_rank);
    uc_free(p->mc_dist);
    memset(p, 0, sizeof *p);
}

void uc_profile_finish(struct uc_profile *p, int32_t head_groups, double stage_eps)
{
    int64_t g = p->n_heads / p->n_heads_kv;
    p->head_groups = head_groups;
    p->stage_eps = stage_eps;
    for (int64_t l = 0; l < p->n_layers; l++) {
        for (int64_t j = 0; j < p->n_heads_kv; j++) {
            double s = 0;
            for (int64_t q = 0; q < g; q++) {
                s += p->head_entropy[l * p->n_heads + j * g + q];
            }
            p->kv_entropy[l * p->n_heads_kv + j] = s / (double)g;
        }
        uc_group_heads(p->kv_group + l * p->n_heads_kv, p->kv_entropy + l * p->n_heads_kv,
                       p->n_heads_kv, head_groups);
    }
    double scores[1024];
    int64_t n = p->n_layers < 1024 ? p->n_layers : 1024;
    for (int64_t l = 0; l < n; l++) {
        scores[l] = 100.0 * p->layer_entropy[l];
    }
    p->n_stage_starts = uc_stage_starts_from_scores(p->stage_starts, UC_MAX_STAGES - 1, scores, n,
                                                    stage_eps);
}

uc_status uc_profile_set_lorc(struct uc_profile *p, const double *log_cond, double rho)
{
    if (p->n_layers < 1 || p->n_layers > UC_LORC_MAX_LAYERS || !(rho > 0.0 && rho <= 1.0)) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "profile lorc: L=%lld ratio=%g", (long long)p->n_layers,
                       rho);
    }
    if (!p->lorc_log_cond) {
        p->lorc_log_cond = uc_malloc((size_t)p->n_layers * sizeof(double));
        p->lorc_rank = uc_malloc((size_t)p->n_layers * sizeof(int32_t));
        if (!p->lorc_log_cond || !p->lorc_rank) {
            UC_FREE(p->lorc_log_cond);
            UC_FREE(p->lorc_rank);
            return UC_ERRF(UC_ERR_NOMEM, "profile lorc L=%lld", (long long)p->n_layers);
        }
    }
    memcpy(p->lorc_log_cond, log_cond, (size_t)p->n_layers * sizeof(double));
    p->lorc_ratio = rho;
    uc_lorc_ranks(p->lorc_rank, log_cond, p->n_layers, p->head_dim, (float)rho);
    p->has_lorc = true;
    return UC_OK;
}

/* The 1e-9 grid the file's numbers are written on (num_array). */
static double round9(double v)
{
    return round(v * 1e9) / 1e9;
}

uc_status uc_profile_set_minicache(struct uc_profile *p, const double *dist, int32_t n_pairs,
                                   int64_t tokens)
{
    int64_t L = p->n_layers;
    if (L < 2 || L > UC_MINICACHE_MAX_LAYERS) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "profile minicache: L=%lld", (long long)L);
    }
    double *d = uc_malloc((size_t)(L - 1) * sizeof(double));
    if (!d) {
        return UC_ERRF(UC_ERR_NOMEM, "profile minicache L=%lld", (long long)L);
    }
    for (int64_t l = 0; l + 1 < L; l++) {
        d[l] = round9(dist[l]);
    }
    int16_t first[UC_MINICACHE_MAX_PAIRS];
    uc_status rc = uc_minicache_select(first, d, L, n_pairs);
    if (rc != UC_OK) {
        uc_free(d);
        return rc;
    }
    uc_free(p->mc_dist);
    p->mc_dist = d;
    p->mc_n_pairs = n_pairs;
    memcpy(p->mc_first, first, (size_t)n_pairs * sizeof *first);
    p->mc_tokens = tokens;
    p->has_minicache = true;
    return UC_OK;
}

static cJSON *num_array(const double *v, int64_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (int64_t i = 0; a && i < n; i++) {
        cJSON_AddItemToArray(a, cJSON_CreateNumber(round9(v[i])));
    }
    return a;
}

static cJSON *int_array(const int32_t *v, int64_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (int64_t i = 0; a && i < n; i++) {
        cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    }
    return a;
}

char *uc_profile_to_json(const struct uc_profile *p)
{
    cJSON *root = cJSON_CreateObject();
    if (!root) {
        return NULL;
    }
    char hash[32];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)p->model_hash);
    cJSON_AddStringToObject(root, "format", "uncomp-profile-v1");
    cJSON_AddStringToObject(root, "model_hash", hash);
    cJSON_AddStringToObject(root, "source", p->source);
    cJSON_AddNumberToObject(root, "created_unix_ms", (double)p->created_unix_ms);
    cJSON_AddNumberToObject(root, "calib_tokens", (double)p->calib_tokens);
    cJSON_AddNumberToObject(root, "calib_windows", (double)p->calib_windows);
    cJSON_AddNumberToObject(root, "num_layers", (double)p->n_layers);
    cJSON_AddNumberToObject(root, "num_heads", (double)p->n_heads);
    cJSON_AddNumberToObject(root, "num_kv_heads", (double)p->n_heads_kv);
    cJSON_AddNumberToObject(root, "head_dim", (double)p->head_dim);
    cJSON_AddNumberToObject(root, "hidden_size", (double)p->hidden);
    cJSON_AddNumberToObject(root, "entropy_k_head", p->entropy_k_head);
    cJSON_AddNumberToObject(root, "entropy_k_hidden", p->entropy_k_hidden);
    cJSON_AddNumberToObject(root, "head_groups", p->head_groups);
    cJSON_AddNumberToObject(root, "stage_eps", p->stage_eps);
    cJSON_AddItemToObject(root, "stage_starts", int_array(p->stage_starts, p->n_stage_starts));
    cJSON_AddItemToObject(root, "layer_entropy", num_array(p->layer_entropy, p->n_layers));
    cJSON *layers = cJSON_AddArrayToObject(root, "layers");
    for (int64_t l = 0; layers && l < p->n_layers; l++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "layer", (double)l);
        cJSON_AddNumberToObject(o, "score", round(p->layer_entropy[l] * 100.0 * 1e6) / 1e6);
        cJSON_AddItemToObject(o, "head_entropy",
                              num_array(p->head_entropy + l * p->n_heads, p->n_heads));
        cJSON_AddItemToObject(o, "kv_entropy",
                              num_array(p->kv_entropy + l * p->n_heads_kv, p->n_heads_kv));
        cJSON_AddItemToObject(o, "kv_group",
                              int_array(p->kv_group + l * p->n_heads_kv, p->n_heads_kv));
        cJSON_AddItemToArray(layers, o);
    }
    if (p->has_share) {
        cJSON *ks = cJSON_AddObjectToObject(root, "kvsharer");
        cJSON_AddNumberToObject(ks, "threshold", p->share_threshold);
        cJSON_AddNumberToObject(ks, "target_layers", p->share_target);
        cJSON_AddNumberToObject(ks, "cosine", round(p->share_cosine * 1e9) / 1e9);
        cJSON_AddNumberToObject(ks, "calib_tokens", (double)p->share_tokens);
        cJSON *pairs = cJSON_AddArrayToObject(ks, "pairs");
        for (int32_t i = 0; pairs && i < p->n_share; i++) {
            int32_t ab[2] = {p->share[i].src, p->share[i].dst};
            cJSON_AddItemToArray(pairs, int_array(ab, 2));
        }
    }
    if (p->has_lorc) {
        cJSON *lo = cJSON_AddObjectToObject(root, "lorc");
        cJSON_AddNumberToObject(lo, "ratio", p->lorc_ratio);
        cJSON_AddItemToObject(lo, "log_cond", num_array(p->lorc_log_cond, p->n_layers));
        cJSON_AddItemToObject(lo, "ranks", int_array(p->lorc_rank, p->n_layers));
    }
    if (p->has_minicache) {
        cJSON *mc = cJSON_AddObjectToObject(root, "minicache");
        cJSON_AddNumberToObject(mc, "calib_tokens", (double)p->mc_tokens);
        cJSON_AddItemToObject(mc, "distances", num_array(p->mc_dist, p->n_layers - 1));
        cJSON_AddNumberToObject(mc, "n_pairs", p->mc_n_pairs);
        cJSON *pairs = cJSON_AddArrayToObject(mc, "pairs");
        for (int32_t i = 0; pairs && i < p->mc_n_pairs; i++) {
            int32_t ab[2] = {p->mc_first[i], p->mc_first[i] + 1};
            cJSON_AddItemToArray(pairs, int_array(ab, 2));
        }
    }
    char *s = cJSON_Print(root);
    cJSON_Delete(root);
    if (!s) {
        return NULL;
    }
    char *out = uc_strdup(s);
    cJSON_free(s);
    return out;
}

uc_status uc_profile_save(const struct uc_profile *p, const char *path)
{
    char *s = uc_profile_to_json(p);
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "profile=%s", path);
    }
    uc_status rc = uc_file_write_all(path, s, strlen(s));
    uc_free(s);
    return rc;
}

static uc_status read_nums(double *out, const cJSON *a, int64_t n, const char *path,
                           const char *field)
{
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != n) {
        return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=%s must be an array of %lld numbers", path,
                       field, (long long)n);
    }
    int64_t i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, a)
    {
        if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble)) {
            return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=%s[%lld] is not a number", path, field,
                           (long long)i);
        }
        out[i++] = it->valuedouble;
    }
    return UC_OK;
}

static int64_t get_i(const cJSON *root, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    return cJSON_IsNumber(v) ? (int64_t)v->valuedouble : -1;
}

/* The "kvsharer" object: threshold, target_layers, cosine, calib_tokens and pairs [[src, dst]]
 * checked as uc_share_pairs_validate checks them. */
static uc_status parse_kvsharer(struct uc_profile *p, const cJSON *ks, const char *path,
                                int64_t n_layers)
{
    const cJSON *th = cJSON_GetObjectItemCaseSensitive(ks, "threshold");
    const cJSON *cs = cJSON_GetObjectItemCaseSensitive(ks, "cosine");
    const cJSON *pairs = cJSON_GetObjectItemCaseSensitive(ks, "pairs");
    if (!cJSON_IsObject(ks) || !cJSON_IsNumber(th) || !cJSON_IsArray(pairs) ||
        cJSON_GetArraySize(pairs) > UC_MAX_SHARE_PAIRS) {
        return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=kvsharer needs a threshold and at most "
                       "%d pairs", path, UC_MAX_SHARE_PAIRS);
    }
    int32_t n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, pairs)
    {
        const cJSON *a = cJSON_GetArrayItem(it, 0), *b = cJSON_GetArrayItem(it, 1);
        if (!cJSON_IsArray(it) || cJSON_GetArraySize(it) != 2 || !cJSON_IsNumber(a) ||
            !cJSON_IsNumber(b) || a->valuedouble < 0 || b->valuedouble >= (double)n_layers) {
            return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=kvsharer.pairs[%d] must be [source, "
                           "target] layers below %lld", path, n, (long long)n_layers);
        }
        p->share[n].src = (int16_t)a->valuedouble;
        p->share[n].dst = (int16_t)b->valuedouble;
        n++;
    }
    char msg[256];
    if (uc_share_pairs_validate(p->share, n, n_layers, msg, sizeof msg) != UC_OK) {
        return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=%s", path, msg);
    }
    p->n_share = n;
    p->share_threshold = th->valuedouble;
    p->share_cosine = cJSON_IsNumber(cs) ? cs->valuedouble : NAN;
    p->share_target = (int32_t)get_i(ks, "target_layers");
    p->share_tokens = get_i(ks, "calib_tokens");
    p->has_share = true;
    return UC_OK;
}

/* The "lorc" object: ratio, log_cond (L numbers); the ranks are derived again from them and
 * must equal the file's "ranks" when it has them (a file edited by hand fails loudly). */
static uc_status parse_lorc(struct uc_profile *p, const cJSON *lo, const char *path,
                            int64_t n_layers)
{
    const cJSON *ratio = cJSON_GetObjectItemCaseSensitive(lo, "ratio");
    if (!cJSON_IsObject(lo) || !cJSON_IsNumber(ratio) || !(ratio->valuedouble > 0.0) ||
        ratio->valuedouble > 1.0 || n_layers > UC_LORC_MAX_LAYERS || p->head_dim < 1) {
        return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=lorc needs a ratio in (0, 1] and "
                       "log_cond", path);
    }
    double lc[UC_LORC_MAX_LAYERS];
    uc_status rc = read_nums(lc, cJSON_GetObjectItemCaseSensitive(lo, "log_cond"), n_layers, path,
                             "lorc.log_cond");
    if (rc != UC_OK) {
        return rc;
    }
    UC_CHECK(uc_profile_set_lorc(p, lc, ratio->valuedouble), rc, out);
    const cJSON *rk = cJSON_GetObjectItemCaseSensitive(lo, "ranks");
    if (rk) {
        double r[UC_LORC_MAX_LAYERS];
        UC_CHECK(read_nums(r, rk, n_layers, path, "lorc.ranks"), rc, out);
        for (int64_t l = 0; l < n_layers; l++) {
            if (r[l] != (double)p->lorc_rank[l]) {
                return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=lorc.ranks[%lld]=%g but log_cond "
                               "and ratio give %d", path, (long long)l, r[l], p->lorc_rank[l]);
            }
        }
    }
out:
    return rc;
}

/* "[[a, a + 1], ...]" of n pairs, for messages. */
static void pairs_text(char *buf, size_t size, const int16_t *first, int32_t n)
{
    size_t len = (size_t)snprintf(buf, size, "[");
    for (int32_t i = 0; i < n && len < size; i++) {
        len += (size_t)snprintf(buf + len, size - len, "%s[%d, %d]", i ? ", " : "", first[i],
                                first[i] + 1);
    }
    if (len < size) {
        snprintf(buf + len, size - len, "]");
    }
}

/* The "minicache" object: distances (L - 1 numbers in [0, 1]), n_pairs and pairs
 * [[a, a + 1], ...]; the pairs are derived again from the distances (uc_minicache_select) and
 * must equal the file's (a file edited by hand fails loudly). */
static uc_status parse_minicache(struct uc_profile *p, const cJSON *mc, const char *path,
                                 int64_t n_layers)
{
    const cJSON *np = cJSON_GetObjectItemCaseSensitive(mc, "n_pairs");
    const cJSON *pairs = cJSON_GetObjectItemCaseSensitive(mc, "pairs");
    if (!cJSON_IsObject(mc) || !cJSON_IsNumber(np) || !cJSON_IsArray(pairs) || n_layers < 2 ||
        n_layers > UC_MINICACHE_MAX_LAYERS || np->valuedouble < 1 ||
        np->valuedouble > UC_MINICACHE_MAX_PAIRS || np->valuedouble != floor(np->valuedouble)) {
        return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=minicache needs distances, n_pairs (1 "
                       "to %d) and pairs", path, UC_MINICACHE_MAX_PAIRS);
    }
    double d[UC_MINICACHE_MAX_LAYERS];
    uc_status rc = read_nums(d, cJSON_GetObjectItemCaseSensitive(mc, "distances"), n_layers - 1,
                             path, "minicache.distances");
    if (rc != UC_OK) {
        return rc;
    }
    for (int64_t l = 0; l + 1 < n_layers; l++) {
        if (d[l] < 0.0 || d[l] > 1.0) {
            return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=minicache.distances[%lld]=%g is not "
                           "an angular distance in [0, 1]", path, (long long)l, d[l]);
        }
    }
    int32_t n = (int32_t)np->valuedouble;
    if (2 * (int64_t)n > n_layers) {
        return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=minicache.n_pairs=%d but the model has "
                       "%lld layers", path, n, (long long)n_layers);
    }
    int16_t file[UC_MINICACHE_MAX_PAIRS];
    int32_t nf = 0;
    bool shape = cJSON_GetArraySize(pairs) == n;
    const cJSON *it;
    cJSON_ArrayForEach(it, pairs)
    {
        const cJSON *a = cJSON_GetArrayItem(it, 0), *b = cJSON_GetArrayItem(it, 1);
        if (!shape || !cJSON_IsArray(it) || cJSON_GetArraySize(it) != 2 || !cJSON_IsNumber(a) ||
            !cJSON_IsNumber(b) || a->valuedouble < 0 || a->valuedouble + 1 >= (double)n_layers ||
            b->valuedouble != a->valuedouble + 1 || a->valuedouble != floor(a->valuedouble)) {
            return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=minicache.pairs must be n_pairs=%d "
                           "adjacent layer pairs [a, a + 1] below %lld", path, n,
                           (long long)n_layers);
        }
        file[nf++] = (int16_t)a->valuedouble;
    }
    UC_CHECK(uc_profile_set_minicache(p, d, n, get_i(mc, "calib_tokens")), rc, out);
    if (memcmp(file, p->mc_first, (size_t)n * sizeof *file) != 0) {
        char got[512], want[512];
        pairs_text(got, sizeof got, file, n);
        pairs_text(want, sizeof want, p->mc_first, n);
        p->has_minicache = false;
        return UC_ERRF(UC_ERR_FORMAT, "profile=%s field=minicache.pairs=%s but its distances "
                       "give %s (the least total distance, uc_minicache_select)", path, got,
                       want);
    }
out:
    return rc;
}

uc_status uc_profile_parse(struct uc_profile *p, const char *json, const char *path,
                           int64_t n_layers, int64_t n_heads, int64_t n_heads_kv)
{
    uc_status rc = UC_OK;
    cJSON *root = cJSON_Parse(json);
    if (!cJSON_IsObject(root)) {
        rc = UC_ERRF(UC_ERR_FORMAT, "profile=%s is not a JSON object", path);
        goto out;
    }
    const char *dims[3] = {"num_layers", "num_heads", "num_kv_heads"};
    int64_t want[3] = {n_layers, n_heads, n_heads_kv};
    for (int i = 0; i < 3; i++) {
        if (get_i(root, dims[i]) != want[i]) {
            rc = UC_ERRF(UC_ERR_FORMAT, "profile=%s field=%s=%lld but the model has %lld", path,
                         dims[i], (long long)get_i(root, dims[i]), (long long)want[i]);
            goto out;
        }
    }
    UC_CHECK(uc_profile_init(p, n_layers, n_heads, n_heads_kv, get_i(root, "head_dim"),
                             get_i(root, "hidden_size")),
             rc, out);
    p->entropy_k_head = (int32_t)get_i(root, "entropy_k_head");
    p->entropy_k_hidden = (int32_t)get_i(root, "entropy_k_hidden");
    p->calib_tokens = get_i(root, "calib_tokens");
    p->calib_windows = get_i(root, "calib_windows");
    p->created_unix_ms = get_i(root, "created_unix_ms");
    const cJSON *src = cJSON_GetObjectItemCaseSensitive(root, "source");
    snprintf(p->source, sizeof p->source, "%s", cJSON_IsString(src) ? src->valuestring : "?");
    const cJSON *mh = cJSON_GetObjectItemCaseSensitive(root, "model_hash");
    if (cJSON_IsString(mh)) {
        p->model_hash = strtoull(mh->valuestring, NULL, 16);
    }
    UC_CHECK(read_nums(p->layer_entropy, cJSON_GetObjectItemCaseSensitive(root, "layer_entropy"),
                       n_layers, path, "layer_entropy"),
             rc, out_fini);
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(root, "layers");
    if (!cJSON_IsArray(layers) || cJSON_GetArraySize(layers) != n_layers) {
        rc = UC_ERRF(UC_ERR_FORMAT, "profile=%s field=layers must have %lld entries", path,
                     (long long)n_layers);
        goto out_fini;
    }
    for (int64_t l = 0; l < n_layers; l++) {
        const cJSON *o = cJSON_GetArrayItem(layers, (int)l);
        UC_CHECK(read_nums(p->head_entropy + l * n_heads,
                           cJSON_GetObjectItemCaseSensitive(o, "head_entropy"), n_heads, path,
                           "layers[].head_entropy"),
                 rc, out_fini);
    }
    int64_t m = get_i(root, "head_groups");
    const cJSON *eps = cJSON_GetObjectItemCaseSensitive(root, "stage_eps");
    if (m < 1 || m > UC_MAX_HEAD_GROUPS || !cJSON_IsNumber(eps)) {
        rc = UC_ERRF(UC_ERR_FORMAT, "profile=%s fields head_groups and stage_eps are required",
                     path);
        goto out_fini;
    }
    uc_profile_finish(p, (int32_t)m, eps->valuedouble);
    /* Explicitly pinned stage boundaries in the file win over the derived ones. */
    const cJSON *ss = cJSON_GetObjectItemCaseSensitive(root, "stage_starts");
    if (cJSON_IsArray(ss)) {
        int32_t n = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, ss)
        {
            int64_t v = cJSON_IsNumber(it) ? (int64_t)it->valuedouble : -1;
            if (v < 1 || v >= n_layers || n >= UC_MAX_STAGES - 1 ||
                (n > 0 && v <= p->stage_starts[n - 1])) {
                rc = UC_ERRF(UC_ERR_FORMAT, "profile=%s field=stage_starts must be increasing "
                             "layers in [1, %lld)", path, (long long)n_layers);
                goto out_fini;
            }
            p->stage_starts[n++] = (int32_t)v;
        }
        p->n_stage_starts = n;
    }
    const cJSON *ks = cJSON_GetObjectItemCaseSensitive(root, "kvsharer");
    if (ks) {
        UC_CHECK(parse_kvsharer(p, ks, path, n_layers), rc, out_fini);
    }
    const cJSON *lo = cJSON_GetObjectItemCaseSensitive(root, "lorc");
    if (lo) {
        UC_CHECK(parse_lorc(p, lo, path, n_layers), rc, out_fini);
    }
    const cJSON *mc = cJSON_GetObjectItemCaseSensitive(root, "minicache");
    if (mc) {
        UC_CHECK(parse_minicache(p, mc, path, n_layers), rc, out_fini);
    }
    goto out;
out_fini:
    uc_profile_fini(p);
out:
    cJSON_Delete(root);
    return rc;
}

uc_status uc_profile_load(struct uc_profile *p, const char *path, int64_t n_layers,
                          int64_t n_heads, int64_t n_heads_kv)
{
    char *text = NULL;
    uc_status rc = uc_file_read_all(&text, NULL, path);
    if (rc == UC_OK) {
        rc = uc_profile_parse(p, text, path, n_layers, n_heads, n_heads_kv);
    }
    uc_free(text);
    return rc;
}
