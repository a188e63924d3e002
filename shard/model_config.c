/* config.json parsing for the Llama family: head_dim given or derived, rope_theta or
 * rope_parameters, rope_scaling of type llama3 or linear, tied embeddings, biases, bos/eos as an
 * int or a list. Every refusal names the file and the field. */
#include "model_config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"

static const char *supported_arch[] = {
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
};

static bool get_int(const cJSON *root, const char *key, int64_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsNumber(v)) {
        return false;
    }
    double d = v->valuedouble;
    if (d != floor(d) || d < -9e15 || d > 9e15) {
        return false;
    }
    *out = (int64_t)d;
    return true;
}

static bool get_num(const cJSON *root, const char *key, double *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!cJSON_IsNumber(v)) {
        return false;
    }
    *out = v->valuedouble;
    return true;
}

static bool get_bool(const cJSON *root, const char *key, bool dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (cJSON_IsBool(v)) {
        return cJSON_IsTrue(v);
    }
    return dflt;
}

static uc_status need_pos_int(const cJSON *root, const char *key, int64_t *out, const char *path)
{
    if (!get_int(root, key, out)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s missing or not an integer", path, key);
    }
    if (*out <= 0) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s=%lld must be positive", path, key,
                       (long long)*out);
    }
    return UC_OK;
}

static uc_status parse_rope(struct uc_model_config *cfg, const cJSON *root, const char *path)
{
    cfg->rope_theta = 10000.0;
    cfg->rope_kind = UC_ROPE_DEFAULT;
    cfg->rope_factor = 1.0;
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    double theta;
    if (get_num(root, "rope_theta", &theta)) {
        cfg->rope_theta = theta;
    } else if (cJSON_IsObject(params) && get_num(params, "rope_theta", &theta)) {
        cfg->rope_theta = theta;
    }
    if (!(cfg->rope_theta > 0.0)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=rope_theta must be positive", path);
    }
    const cJSON *sc = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (!cJSON_IsObject(sc)) {
        sc = params; /* transformers 5 keeps the scaling in rope_parameters */
    }
    if (!cJSON_IsObject(sc)) {
        return UC_OK;
    }
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(sc, "rope_type");
    if (!cJSON_IsString(type)) {
        type = cJSON_GetObjectItemCaseSensitive(sc, "type");
    }
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "default") == 0) {
        return UC_OK;
    }
    if (strcmp(type->valuestring, "llama3") == 0) {
        cfg->rope_kind = UC_ROPE_LLAMA3;
        if (!get_num(sc, "factor", &cfg->rope_factor) ||
            !get_num(sc, "low_freq_factor", &cfg->rope_low_freq_factor) ||
            !get_num(sc, "high_freq_factor", &cfg->rope_high_freq_factor) ||
            !get_num(sc, "original_max_position_embeddings", &cfg->rope_orig_max_ctx)) {
            return UC_ERRF(UC_ERR_FORMAT,
                           "file=%s field=rope_scaling type llama3 needs factor, low_freq_factor, "
                           "high_freq_factor and original_max_position_embeddings",
                           path);
        }
        if (!(cfg->rope_factor > 0) || !(cfg->rope_high_freq_factor > cfg->rope_low_freq_factor) ||
            !(cfg->rope_orig_max_ctx > 0)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=rope_scaling has invalid llama3 values",
                           path);
        }
        return UC_OK;
    }
    if (strcmp(type->valuestring, "linear") == 0) {
        cfg->rope_kind = UC_ROPE_LINEAR;
        if (!get_num(sc, "factor", &cfg->rope_factor) || !(cfg->rope_factor > 0)) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s field=rope_scaling.factor missing", path);
        }
        return UC_OK;
    }
    return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=rope_scaling type=%s is not supported", path,
                   type->valuestring);
}

/* A token id from JSON: an integer in [lo, vocab), range-checked before any conversion (a float
 * like 1e20 cast to int32 is undefined behaviour). */
static uc_status get_id(const cJSON *v, int64_t lo, int64_t vocab, const char *key,
                        const char *path, int32_t *out)
{
    double d = cJSON_IsNumber(v) ? v->valuedouble : 0.5;
    if (!cJSON_IsNumber(v) || d != floor(d)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s must be an integer", path, key);
    }
    if (!(d >= (double)lo && d < (double)vocab)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s=%.17g outside vocab %lld", path, key, d,
                       (long long)vocab);
    }
    *out = (int32_t)d;
    return UC_OK;
}

static uc_status parse_eos(struct uc_model_config *cfg, const cJSON *root, const char *path)
{
    uc_status rc;
    cfg->n_eos = 0;
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    if (cJSON_IsNumber(e)) {
        UC_CHECK(get_id(e, 0, cfg->vocab, "eos_token_id", path, &cfg->eos_ids[0]), rc, out);
        cfg->n_eos = 1;
    } else if (cJSON_IsArray(e)) {
        const cJSON *it;
        cJSON_ArrayForEach(it, e)
        {
            if (cfg->n_eos >= UC_MAX_EOS_IDS) {
                return UC_ERRF(UC_ERR_FORMAT, "file=%s field=eos_token_id bad list", path);
            }
            UC_CHECK(get_id(it, 0, cfg->vocab, "eos_token_id", path, &cfg->eos_ids[cfg->n_eos]),
                     rc, out);
            cfg->n_eos++;
        }
    }
    cfg->bos_id = -1;
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(root, "bos_token_id");
    if (cJSON_IsArray(b) && cJSON_GetArraySize(b) > 0) {
        b = cJSON_GetArrayItem(b, 0);
    }
    if (cJSON_IsNumber(b)) {
        UC_CHECK(get_id(b, -1, cfg->vocab, "bos_token_id", path, &cfg->bos_id), rc, out);
    }
    rc = UC_OK;
out:
    return rc;
}

/* Upper bounds of the dimensions, checked at parse so that every product of them the loader and
 * the engine form ((H + 2 Hkv) D, V C, L C ...) fits in int64 with room to spare. */
#define DIM_MAX_LAYERS (1 << 12)
#define DIM_MAX_HIDDEN (1 << 18)
#define DIM_MAX_FFN (1 << 20)
#define DIM_MAX_HEADS (1 << 12)
#define DIM_MAX_VOCAB (1 << 23)
#define DIM_MAX_CTX (1 << 24)

static uc_status check_max(int64_t v, int64_t max, const char *key, const char *path)
{
    if (v > max) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s field=%s=%lld exceeds the supported %lld", path,
                       key, (long long)v, (long long)max);
    }
    return UC_OK;
}

uc_status uc_model_config_parse(struct uc_model_config *cfg, const char *json_text,
                                const char *path)
{
    memset(cfg, 0, sizeof *cfg);
    uc_status rc = UC_OK;
    cJSON *root = cJSON_Parse(json_text);
    if (!cJSON_IsObject(root)) {
        rc = UC_ERRF(UC_ERR_FORMAT, "file=%s is not a JSON object", path);
        goto out;
    }
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const cJSON *a0 = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (cJSON_IsString(mt)) {
        snprintf(cfg->model_type, sizeof cfg->model_type, "%s", mt->valuestring);
    }
    if (!cJSON_IsString(a0)) {
        rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=architectures missing", path);
        goto out;
    }
    snprintf(cfg->arch, sizeof cfg->arch, "%s", a0->valuestring);
    bool ok = false;
    for (size_t i = 0; i < sizeof supported_arch / sizeof supported_arch[0]; i++) {
        ok = ok || strcmp(cfg->arch, supported_arch[i]) == 0;
    }
    if (!ok) {
        rc = UC_ERRF(UC_ERR_UNSUPPORTED,
                     "file=%s field=architectures value=%s is not supported (Llama, Mistral, "
                     "Qwen2 causal LMs are)",
                     path, cfg->arch);
        goto out;
    }
    UC_CHECK(need_pos_int(root, "num_hidden_layers", &cfg->n_layers, path), rc, out);
    UC_CHECK(need_pos_int(root, "hidden_size", &cfg->hidden, path), rc, out);
    UC_CHECK(need_pos_int(root, "intermediate_size", &cfg->ffn, path), rc, out);
    UC_CHECK(need_pos_int(root, "num_attention_heads", &cfg->n_heads, path), rc, out);
    UC_CHECK(need_pos_int(root, "vocab_size", &cfg->vocab, path), rc, out);
    UC_CHECK(check_max(cfg->n_layers, DIM_MAX_LAYERS, "num_hidden_layers", path), rc, out);
    UC_CHECK(check_max(cfg->hidden, DIM_MAX_HIDDEN, "hidden_size", path), rc, out);
    UC_CHECK(check_max(cfg->ffn, DIM_MAX_FFN, "intermediate_size", path), rc, out);
    UC_CHECK(check_max(cfg->n_heads, DIM_MAX_HEADS, "num_attention_heads", path), rc, out);
    UC_CHECK(check_max(cfg->vocab, DIM_MAX_VOCAB, "vocab_size", path), rc, out);
    if (!get_int(root, "num_key_value_heads", &cfg->n_heads_kv)) {
        cfg->n_heads_kv = cfg->n_heads;
    }
    if (cfg->n_heads_kv <= 0 || cfg->n_heads % cfg->n_heads_kv != 0) {
        rc = UC_ERRF(UC_ERR_FORMAT,
                     "file=%s field=num_key_value_heads=%lld must divide num_attention_heads=%lld",
                     path, (long long)cfg->n_heads_kv, (long long)cfg->n_heads);
        goto out;
    }
    const cJSON *hd = cJSON_GetObjectItemCaseSensitive(root, "head_dim");
    if (cJSON_IsNumber(hd)) {
        UC_CHECK(need_pos_int(root, "head_dim", &cfg->head_dim, path), rc, out);
    } else {
        if (cfg->hidden % cfg->n_heads != 0) {
            rc = UC_ERRF(UC_ERR_FORMAT,
                         "file=%s field=hidden_size=%lld not divisible by num_attention_heads",
                         path, (long long)cfg->hidden);
            goto out;
        }
        cfg->head_dim = cfg->hidden / cfg->n_heads;
    }
    UC_CHECK(check_max(cfg->head_dim, DIM_MAX_HIDDEN, "head_dim", path), rc, out);
    if (cfg->head_dim % 2 != 0) {
        rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=head_dim=%lld must be even for RoPE", path,
                     (long long)cfg->head_dim);
        goto out;
    }
    if (!get_int(root, "max_position_embeddings", &cfg->max_ctx) || cfg->max_ctx <= 0) {
        cfg->max_ctx = 2048;
        UC_LOG_WARN("model_config: file=%s max_position_embeddings missing, using %lld", path,
                    (long long)cfg->max_ctx);
    }
    if (cfg->max_ctx > DIM_MAX_CTX) {
        UC_LOG_WARN("model_config: file=%s max_position_embeddings=%lld, using %lld", path,
                    (long long)cfg->max_ctx, (long long)DIM_MAX_CTX);
        cfg->max_ctx = DIM_MAX_CTX;
    }
    cfg->norm_eps = 1e-6;
    if (!get_num(root, "rms_norm_eps", &cfg->norm_eps) || !(cfg->norm_eps > 0)) {
        cfg->norm_eps = 1e-6;
    }
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (cJSON_IsString(act) && strcmp(act->valuestring, "silu") != 0 &&
        strcmp(act->valuestring, "swish") != 0) {
        rc = UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s field=hidden_act=%s is not supported (silu is)",
                     path, act->valuestring);
        goto out;
    }
    UC_CHECK(parse_rope(cfg, root, path), rc, out);
    cfg->tie_embeddings = get_bool(root, "tie_word_embeddings", false);
    bool is_qwen2 = strcmp(cfg->arch, "Qwen2ForCausalLM") == 0;
    cfg->qkv_bias = get_bool(root, "attention_bias", is_qwen2);
    cfg->o_bias = get_bool(root, "attention_bias", false) && !is_qwen2;
    cfg->mlp_bias = get_bool(root, "mlp_bias", false);
    int64_t sw = 0;
    if (get_int(root, "sliding_window", &sw) && sw > 0 && sw < cfg->max_ctx &&
        get_bool(root, "use_sliding_window", !is_qwen2)) {
        cfg->sliding_window = sw;
        UC_LOG_WARN("model_config: file=%s sliding_window=%lld: contexts are limited to it", path,
                    (long long)sw);
        cfg->max_ctx = sw;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(root, "torch_dtype");
    if (!cJSON_IsString(dt)) {
        dt = cJSON_GetObjectItemCaseSensitive(root, "dtype");
    }
    snprintf(cfg->torch_dtype, sizeof cfg->torch_dtype, "%s",
             cJSON_IsString(dt) ? dt->valuestring : "float32");
    UC_CHECK(parse_eos(cfg, root, path), rc, out);
out:
    cJSON_Delete(root);
    return rc;
}

uc_status uc_model_config_load(struct uc_model_config *cfg, const char *model_dir)
{
    char *path = uc_path_join(model_dir, "config.json");
    if (!path) {
        return UC_ERRF(UC_ERR_NOMEM, "dir=%s", model_dir);
    }
    char *text = NULL;
    uc_status rc;
    UC_CHECK(uc_file_read_all(&text, NULL, path), rc, out);
    rc = uc_model_config_parse(cfg, text, path);
out:
    uc_free(text);
    uc_free(path);
    return rc;
}

uint64_t uc_model_config_hash(const struct uc_model_config *cfg)
{
    uint64_t h = UC_FNV_INIT;
    int64_t ints[] = {cfg->n_layers, cfg->hidden,  cfg->ffn,      cfg->n_heads,
                      cfg->n_heads_kv, cfg->head_dim, cfg->vocab, cfg->max_ctx,
                      cfg->rope_kind, cfg->tie_embeddings, cfg->qkv_bias, cfg->o_bias,
                      cfg->mlp_bias, cfg->sliding_window, cfg->bos_id, cfg->n_eos};
    double dbl[] = {cfg->norm_eps, cfg->rope_theta, cfg->rope_factor, cfg->rope_low_freq_factor,
                    cfg->rope_high_freq_factor, cfg->rope_orig_max_ctx};
    h = uc_fnv1a(h, ints, sizeof ints);
    h = uc_fnv1a(h, dbl, sizeof dbl);
    h = uc_fnv1a(h, cfg->eos_ids, sizeof cfg->eos_ids[0] * (size_t)cfg->n_eos);
    h = uc_fnv1a(h, cfg->arch, strlen(cfg->arch));
    return h;
}

bool uc_model_config_is_eos(const struct uc_model_config *cfg, int32_t id)
{
    for (int i = 0; i < cfg->n_eos; i++) {
        if (cfg->eos_ids[i] == id) {
            return true;
        }
    }
    return false;
}

bool uc_model_is_synthetic(const char *model_dir)
{
    return strncmp(model_dir, "synthetic:", 10) == 0;
}

struct preset {
    const char *name;
    int64_t layers, hidden, ffn, heads, heads_kv, head_dim, vocab, ctx;
    double theta;
    bool llama3_rope, tied;
};

static const struct preset presets[] = {
    {"llama3-8b", 32, 4096, 14336, 32, 8, 128, 128256, 131072, 500000.0, true, false},
    {"llama3-1b", 16, 2048, 8192, 32, 8, 64, 128256, 131072, 500000.0, true, true},
    {"llama3-70b", 80, 8192, 28672, 64, 8, 128, 128256, 131072, 500000.0, true, false},
    {"tiny", 8, 256, 768, 8, 4, 32, 4096, 4096, 10000.0, false, false},
};

uc_status uc_model_config_synthetic(struct uc_model_config *cfg, const char *spec)
{
    memset(cfg, 0, sizeof *cfg);
    const char *name = uc_model_is_synthetic(spec) ? spec + 10 : spec;
    const struct preset *p = NULL;
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
        size_t n = strlen(presets[i].name);
        if (strncmp(name, presets[i].name, n) == 0 && (name[n] == '\0' || name[n] == ':')) {
            p = &presets[i];
        }
    }
    if (!p) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "synthetic model %s: known shapes are llama3-8b, "
                       "llama3-1b, llama3-70b, tiny", name);
    }
    snprintf(cfg->arch, sizeof cfg->arch, "LlamaForCausalLM");
    snprintf(cfg->model_type, sizeof cfg->model_type, "llama");
    snprintf(cfg->torch_dtype, sizeof cfg->torch_dtype, "bfloat16");
    cfg->n_layers = p->layers;
    const char *opt = strchr(name, ':');
    if (opt) {
        long l = 0;
        if (sscanf(opt, ":layers=%ld", &l) != 1 || l < 1 || l > p->layers) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "synthetic model %s: option must be :layers=N with "
                           "1 <= N <= %lld", name, (long long)p->layers);
        }
        cfg->n_layers = l;
    }
    cfg->hidden = p->hidden;
    cfg->ffn = p->ffn;
    cfg->n_heads = p->heads;
    cfg->n_heads_kv = p->heads_kv;
    cfg->head_dim = p->head_dim;
    cfg->vocab = p->vocab;
    cfg->max_ctx = p->ctx;
    cfg->norm_eps = 1e-5;
    cfg->rope_theta = p->theta;
    cfg->rope_factor = 1.0;
    if (p->llama3_rope) {
        cfg->rope_kind = UC_ROPE_LLAMA3;
        cfg->rope_factor = 8.0;
        cfg->rope_low_freq_factor = 1.0;
        cfg->rope_high_freq_factor = 4.0;
        cfg->rope_orig_max_ctx = 8192.0;
    }
    cfg->tie_embeddings = p->tied;
    cfg->bos_id = 0;
    cfg->eos_ids[0] = 1;
    cfg->n_eos = 1;
    return UC_OK;
}
