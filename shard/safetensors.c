/* Safetensors reader: 8-byte little-endian header length, a JSON header mapping names to
 * {dtype, shape, data_offsets}, then raw little-endian data. Files are mmap'd read-only; nothing
 * is trusted until checked. */
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"

#define MAX_HEADER_BYTES (100u << 20)

struct st_file {
    char *path;
    unsigned char *map;
    size_t size;
};

struct uc_st {
    struct st_file *files;
    int n_files;
    struct uc_st_tensor *tensors;
    int64_t n_tensors;
    int64_t cap_tensors;
};

const char *uc_dtype_name(enum uc_dtype dt)
{
    switch (dt) {
    case UC_DTYPE_F32: return "F32";
    case UC_DTYPE_F16: return "F16";
    case UC_DTYPE_BF16: return "BF16";
    }
    return "?";
}

size_t uc_dtype_size(enum uc_dtype dt) { return dt == UC_DTYPE_F32 ? 4 : 2; }

static bool parse_dtype(const char *s, enum uc_dtype *out)
{
    if (strcmp(s, "F32") == 0) {
        *out = UC_DTYPE_F32;
    } else if (strcmp(s, "F16") == 0) {
        *out = UC_DTYPE_F16;
    } else if (strcmp(s, "BF16") == 0) {
        *out = UC_DTYPE_BF16;
    } else {
        return false;
    }
    return true;
}

static int cmp_range(const void *a, const void *b)
{
    const struct uc_st_tensor *x = *(const struct uc_st_tensor *const *)a;
    const struct uc_st_tensor *y = *(const struct uc_st_tensor *const *)b;
    return (x->data > y->data) - (x->data < y->data);
}

static uc_status add_tensor(struct uc_st *st, struct uc_st_tensor *t)
{
    if (st->n_tensors == st->cap_tensors) {
        int64_t cap = st->cap_tensors ? st->cap_tensors * 2 : 64;
        struct uc_st_tensor *n = uc_realloc(st->tensors, (size_t)cap * sizeof *n);
        if (!n) {
            return UC_ERRF(UC_ERR_NOMEM, "tensors=%lld", (long long)cap);
        }
        st->tensors = n;
        st->cap_tensors = cap;
    }
    st->tensors[st->n_tensors++] = *t;
    return UC_OK;
}

static uc_status parse_entry(struct uc_st *st, int fi, const cJSON *e, const unsigned char *data,
                             size_t data_size)
{
    const char *path = st->files[fi].path;
    struct uc_st_tensor t = {.file = fi};
    if (!cJSON_IsObject(e)) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s tensor=%s entry is not an object", path, e->string);
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(shape) || !cJSON_IsArray(offs) ||
        cJSON_GetArraySize(offs) != 2) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s tensor=%s needs dtype, shape and data_offsets",
                       path, e->string);
    }
    if (!parse_dtype(dt->valuestring, &t.dtype)) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "file=%s tensor=%s dtype=%s is not supported (F32, F16, "
                       "BF16 are)", path, e->string, dt->valuestring);
    }
    t.n_dims = cJSON_GetArraySize(shape);
    if (t.n_dims > UC_ST_MAX_DIMS) {
        return UC_ERRF(UC_ERR_FORMAT, "file=%s tensor=%s has %d dims", path, e->string, t.n_dims);
    }
    double elems = 1;
    for (int i = 0; i < t.n_dims; i++) {
        const cJSON *d = cJSON_GetArrayItem(shape, i);
        if (!cJSON_IsNumber(d) || d->valuedouble < 0 || d->valuedouble != floor(d->valuedouble) ||
            d->valuedouble > 1e12) {
            return UC_ERRF(UC_ERR_FORMAT, "file=%s tensor=%s bad shape", path, e->string);
        }
        t.shape[i] = (int64_t)d->valuedouble;
        elems *= d->valuedouble;
    }
    double b = cJSON_GetArrayItem(offs, 0)->valuedouble;
    double en = cJSON_GetArrayItem(offs, 1)->valuedouble;
    if (!cJSON_IsNumber(cJSON_GetArrayItem(offs, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(offs, 1))
        || b < 0 || en < b || en > (double)data_size || b != floor(b) || en != floor(en)) {
        return UC_ERRF(UC_ERR_FORMAT,
                       "file=%s tensor=%s data_offsets [%.0f, %.0f] outside the data section of "
                       "%zu bytes",
                       path, e->string, b, en, data_size);
    }
    double want = elems * (double)uc_dtype_size(t.dtype);
    if (en - b != want) {
        return UC_ERRF(UC_ERR_FORMAT,
                       "file=%s tensor=%s holds %.0f bytes but shape x dtype needs %.0f", path,
                       e->string, en - b, want);
    }
    t.data = data + (size_t)b;
    t.size_bytes = (size_t)(en - b);
    t.name = uc_strdup(e->string);
    if (!t.name) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
    }
    uc_status rc = add_tensor(st, &t);
    if (rc != UC_OK) {
        uc_free(t.name);
    }
    return rc;
}

static uc_status map_file(struct uc_st *st, const char *path)
{
    struct st_file *files = uc_realloc(st->files, (size_t)(st->n_files + 1) * sizeof *files);
    if (!files) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
    }
    st->files = files;
    int fi = st->n_files;
    struct st_file *f = &st->files[fi];
    memset(f, 0, sizeof *f);
    f->path = uc_strdup(path);
    if (!f->path) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
    }
    st->n_files++;
    int fd = uc_file_open_regular(path); /* a FIFO would hang the start-up */
    if (fd < 0) {
        return UC_ERR_IO; /* logged */
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        close(fd);
        return UC_ERRF(UC_ERR_IO, "file=%s cannot stat: %s", path, strerror(errno));
    }
    if (sb.st_size < 8) {
        close(fd);
        return UC_ERRF(UC_ERR_FORMAT, "file=%s is %lld bytes, too short for a safetensors header",
                       path, (long long)sb.st_size);
    }
    f->size = (size_t)sb.st_size;
    void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        return UC_ERRF(UC_ERR_IO, "file=%s cannot mmap: %s", path, strerror(errno));
    }
    f->map = m;
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) {
        hlen |= (uint64_t)f->map[i] << (8 * i);
    }
    if (hlen > MAX_HEADER_BYTES || hlen > f->size - 8) {
        return UC_ERRF(UC_ERR_FORMAT,
                       "file=%s header length %llu exceeds the file (%zu bytes): truncated or "
                       "corrupt",
                       path, (unsigned long long)hlen, f->size);
    }
    char *hdr = uc_strndup((const char *)f->map + 8, (size_t)hlen);
    if (!hdr) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
    }
    cJSON *root = cJSON_Parse(hdr);
    uc_free(hdr);
    uc_status rc = UC_OK;
    if (!cJSON_IsObject(root)) {
        rc = UC_ERRF(UC_ERR_FORMAT, "file=%s header is not a JSON object", path);
        goto out;
    }
    int64_t first = st->n_tensors;
    const cJSON *e;
    cJSON_ArrayForEach(e, root)
    {
        if (strcmp(e->string, "__metadata__") == 0) {
            continue;
        }
        UC_CHECK(parse_entry(st, fi, e, f->map + 8 + hlen, f->size - 8 - hlen), rc, out);
    }
    /* No two tensors of this file may overlap (empty tensors occupy no bytes). */
    int64_t n = st->n_tensors - first;
    if (n > 1) {
        const struct uc_st_tensor **v = uc_malloc((size_t)n * sizeof *v);
        if (!v) {
            rc = UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
            goto out;
        }
        int64_t nonempty = 0;
        for (int64_t i = 0; i < n; i++) {
            if (st->tensors[first + i].size_bytes > 0) {
                v[nonempty++] = &st->tensors[first + i];
            }
        }
        qsort(v, (size_t)nonempty, sizeof *v, cmp_range);
        for (int64_t i = 1; i < nonempty && rc == UC_OK; i++) {
            if (v[i - 1]->data + v[i - 1]->size_bytes > v[i]->data) {
                rc = UC_ERRF(UC_ERR_FORMAT, "file=%s tensors %s and %s overlap", path, v[i - 1]->name,
                             v[i]->name);
            }
        }
        uc_free(v);
    }
out:
    cJSON_Delete(root);
    return rc;
}

static uc_status open_sharded(struct uc_st *st, const char *dir, const char *index_path)
{
    char *text = NULL;
    uc_status rc;
    cJSON *root = NULL;
    UC_CHECK(uc_file_read_all(&text, NULL, index_path), rc, out);
    root = cJSON_Parse(text);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map)) {
        rc = UC_ERRF(UC_ERR_FORMAT, "file=%s field=weight_map missing", index_path);
        goto out;
    }
    /* Distinct shard files, in order of first appearance. */
    const cJSON *e;
    cJSON_ArrayForEach(e, map)
    {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/') || e->valuestring[0] == '.') {
            rc = UC_ERRF(UC_ERR_FORMAT, "file=%s tensor=%s has an invalid shard name", index_path,
                         e->string);
            goto out;
        }
        bool seen = false;
        for (int i = 0; i < st->n_files && !seen; i++) {
            const char *base = strrchr(st->files[i].path, '/');
            seen = strcmp(base ? base + 1 : st->files[i].path, e->valuestring) == 0;
        }
        if (!seen) {
            char *p = uc_path_join(dir, e->valuestring);
            if (!p) {
                rc = UC_ERRF(UC_ERR_NOMEM, "dir=%s", dir);
                goto out;
            }
            rc = map_file(st, p);
            uc_free(p);
            if (rc != UC_OK) {
                goto out;
            }
        }
    }
    /* Every tensor of the index must be in the shard it names. */
    cJSON_ArrayForEach(e, map)
    {
        const struct uc_st_tensor *t = uc_st_find(st, e->string);
        const char *path = t ? uc_st_file_name(st, t) : NULL;
        const char *base = path ? strrchr(path, '/') : NULL;
        base = base ? base + 1 : path;
        if (!t || strcmp(base, e->valuestring) != 0) {
            rc = UC_ERRF(UC_ERR_FORMAT, "file=%s tensor=%s listed in the index but absent from %s",
                         index_path, e->string, e->valuestring);
            goto out;
        }
    }
out:
    cJSON_Delete(root);
    uc_free(text);
    return rc;
}

uc_status uc_st_open_file(struct uc_st **out, const char *path)
{
    *out = NULL;
    struct uc_st *st = uc_calloc(1, sizeof *st);
    if (!st) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
    }
    uc_status rc = map_file(st, path);
    if (rc != UC_OK) {
        uc_st_destroy(st);
        return rc;
    }
    *out = st;
    return UC_OK;
}

uc_status uc_st_open(struct uc_st **out, const char *model_dir)
{
    *out = NULL;
    uc_status rc = UC_OK;
    struct uc_st *st = uc_calloc(1, sizeof *st);
    char *index = uc_path_join(model_dir, "model.safetensors.index.json");
    char *single = uc_path_join(model_dir, "model.safetensors");
    if (!st || !index || !single) {
        rc = UC_ERRF(UC_ERR_NOMEM, "dir=%s", model_dir);
        goto out;
    }
    if (uc_file_exists(index)) {
        UC_CHECK(open_sharded(st, model_dir, index), rc, out);
    } else if (uc_file_exists(single)) {
        UC_CHECK(map_file(st, single), rc, out);
    } else {
        rc = UC_ERRF(UC_ERR_IO, "dir=%s has neither model.safetensors nor "
                     "model.safetensors.index.json", model_dir);
        goto out;
    }
    *out = st;
    st = NULL;
out:
    uc_st_destroy(st);
    uc_free(index);
    uc_free(single);
    return rc;
}

void uc_st_destroy(struct uc_st *st)
{
    if (!st) {
        return;
    }
    for (int i = 0; i < st->n_files; i++) {
        if (st->files[i].map) {
            munmap(st->files[i].map, st->files[i].size);
        }
        uc_free(st->files[i].path);
    }
    for (int64_t i = 0; i < st->n_tensors; i++) {
        uc_free(st->tensors[i].name);
    }
    uc_free(st->files);
    uc_free(st->tensors);
    uc_free(st);
}

const struct uc_st_tensor *uc_st_find(const struct uc_st *st, const char *name)
{
    for (int64_t i = 0; i < st->n_tensors; i++) {
        if (strcmp(st->tensors[i].name, name) == 0) {
            return &st->tensors[i];
        }
    }
    return NULL;
}

int64_t uc_st_count(const struct uc_st *st) { return st->n_tensors; }

const struct uc_st_tensor *uc_st_at(const struct uc_st *st, int64_t i) { return &st->tensors[i]; }

const char *uc_st_file_name(const struct uc_st *st, const struct uc_st_tensor *t)
{
    return st->files[t->file].path;
}

uc_status uc_st_expect(const struct uc_st *st, const char *name, int n_dims, const int64_t *shape)
{
    const struct uc_st_tensor *t = uc_st_find(st, name);
    if (!t) {
        return UC_ERRF(UC_ERR_FORMAT, "tensor=%s is missing from the checkpoint", name);
    }
    bool ok = t->n_dims == n_dims;
    for (int i = 0; ok && i < n_dims; i++) {
        ok = t->shape[i] == shape[i];
    }
    if (!ok) {
        char want[96] = "", got[96] = "";
        int a = 0, b = 0;
        for (int i = 0; i < n_dims; i++) {
            a += snprintf(want + a, sizeof want - (size_t)a, "%s%lld", i ? "," : "",
                          (long long)shape[i]);
        }
        for (int i = 0; i < t->n_dims; i++) {
            b += snprintf(got + b, sizeof got - (size_t)b, "%s%lld", i ? "," : "",
                          (long long)t->shape[i]);
        }
        return UC_ERRF(UC_ERR_FORMAT, "tensor=%s in %s has shape [%s], config needs [%s]", name,
                       uc_st_file_name(st, t), got, want);
    }
    return UC_OK;
}

void uc_convert_to_f32(float *restrict dst, const void *src, enum uc_dtype dt, int64_t n)
{
    switch (dt) {
    case UC_DTYPE_F32:
        memcpy(dst, src, (size_t)n * sizeof(float));
        break;
    case UC_DTYPE_BF16: {
        const unsigned char *s = src;
        for (int64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, 2);
            dst[i] = uc_bf16_to_f32(v);
        }
        break;
    }
    case UC_DTYPE_F16: {
        const unsigned char *s = src;
        for (int64_t i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, s + 2 * i, 2);
            dst[i] = uc_f16_to_f32(v);
        }
        break;
    }
    }
}

uc_status uc_st_read_f32(const struct uc_st_tensor *t, int64_t row0, int64_t n_rows, int64_t col0,
                         int64_t n_cols, float *restrict dst)
{
    int64_t rows = t->n_dims == 2 ? t->shape[0] : 1;
    int64_t cols = t->n_dims == 2 ? t->shape[1] : (t->n_dims == 1 ? t->shape[0] : 0);
    if (t->n_dims > 2 || row0 < 0 || col0 < 0 || n_rows < 0 || n_cols < 0 ||
        row0 + n_rows > rows || col0 + n_cols > cols) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "tensor=%s slice [%lld+%lld, %lld+%lld] outside %lldx%lld",
                       t->name, (long long)row0, (long long)n_rows, (long long)col0,
                       (long long)n_cols, (long long)rows, (long long)cols);
    }
    size_t es = uc_dtype_size(t->dtype);
    for (int64_t r = 0; r < n_rows; r++) {
        const unsigned char *src = t->data + ((size_t)(row0 + r) * (size_t)cols + (size_t)col0) * es;
        uc_convert_to_f32(dst + r * n_cols, src, t->dtype, n_cols);
    }
    return UC_OK;
}
