/* The CPU reference backend: float32 activations and weights, OpenBLAS sgemm for every matrix
 * product (projections, and attention's QK^T and PV in row blocks), OpenMP for the element-wise
 * work. Every CUDA op is tested against these. */
#include <cblas.h>
#include <math.h>
#include <sched.h>
#include <stdbool.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "compress/entropy.h"
#include "compress/minicache.h"

#define ATT_BLOCK 64 /* query rows per attention block */

/* The hot loops get an AVX2+FMA clone chosen at load time (the build targets baseline x86-64). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UC_HOT_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define UC_HOT_CLONES
#endif

struct cpu_ctx {
    float *rope_cos; /* (max_pos, D/2) */
    float *rope_sin;
    int64_t rope_half;
    int64_t rope_max_pos;
    float *scores;     /* per-thread attention score rows, grown on demand */
    size_t scores_cap; /* floats */
    /* the eigenvalues of the begun qspec batches (computed at their begin), a ring of slots */
    double *qs[UC_QSPEC_BATCHES];
    int64_t qs_n[UC_QSPEC_BATCHES];
    int qs_first, qs_count;
    struct cpu_ws_slot *ws; /* window scores begun (computed at their begin), by slot */
    int32_t n_ws;
    int32_t *fetch[2]; /* ids_fetch_begin's copies, by slot */
    int64_t fetch_cap[2], fetch_n[2];
};

/* A begun window score result: col (Hkv, n) then row (n) when asked. */
struct cpu_ws_slot {
    double *buf;
    size_t cap;    /* doubles */
    int64_t n_col; /* Hkv n; 0: nothing begun */
    int64_t n;
    bool row;
};

static struct cpu_ctx *ctx_of(struct uc_backend *be) { return be->ctx; }

/* ---- memory ---------------------------------------------------------------------------- */

static uc_status cpu_alloc(struct uc_backend *be, void **out, size_t size_bytes)
{
    *out = uc_malloc(size_bytes ? size_bytes : 1);
    if (!*out) {
        return UC_ERRF(UC_ERR_NOMEM, "cpu alloc bytes=%zu", size_bytes);
    }
    return UC_OK;
}

static void cpu_free(struct uc_backend *be, void *p) { uc_free(p); }

/* MemAvailable of /proc/meminfo (what the kernel could hand out without swapping), else the
 * free physical pages. */
static uc_status cpu_mem_available(struct uc_backend *be, int64_t *bytes)
{
    (void)be;
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long long kb = -1;
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) {
            break;
        }
    }
    if (f) {
        fclose(f);
    }
    if (kb >= 0) {
        *bytes = (int64_t)kb * 1024;
        return UC_OK;
    }
    long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "available host memory unknown");
    }
    *bytes = (int64_t)pages * page;
    return UC_OK;
}

static uc_status cpu_memcpy(struct uc_backend *be, void *dst, const void *src, size_t size_bytes)
{
    if (size_bytes) {
        memmove(dst, src, size_bytes);
    }
    return UC_OK;
}

static uc_status cpu_scatter_ints(struct uc_backend *be, void *dst, const int32_t *pos,
                                  const int32_t *val, int64_t n)
{
    int32_t *d = dst;
    for (int64_t i = 0; i < n; i++) {
        d[pos[i]] = val[i];
    }
    return UC_OK;
}

static uc_status cpu_download_f32(struct uc_backend *be, float *dst, const void *src, int64_t n)
{
    return cpu_memcpy(be, dst, src, (size_t)n * sizeof(float));
}

static uc_status cpu_upload_f32(struct uc_backend *be, void *dst, const float *src, int64_t n)
{
    return cpu_memcpy(be, dst, src, (size_t)n * sizeof(float));
}

static uc_status cpu_sync(struct uc_backend *be) { return UC_OK; }

static size_t cpu_act_size(struct uc_backend *be) { return sizeof(float); }

static uc_status cpu_weight_create(struct uc_backend *be, void **out, const float *host,
                                   int64_t rows, int64_t cols)
{
    size_t n = (size_t)(rows * cols) * sizeof(float);
    uc_status rc = cpu_alloc(be, out, n);
    if (rc == UC_OK) {
        memcpy(*out, host, n);
    }
    return rc;
}

static uc_status cpu_weight_random(struct uc_backend *be, void **out, int64_t rows, int64_t cols,
                                   uint64_t seed, float mean, float std)
{
    int64_t n = rows * cols;
    uc_status rc = cpu_alloc(be, out, (size_t)n * sizeof(float));
    if (rc != UC_OK) {
        return rc;
    }
    float *w = *out;
    uc_test_fill(w, n, seed, 0, 0);
    /* uniform [-1, 1) has variance 1/3: scale to the requested std */
    float k = std * 1.7320508f;
    for (int64_t i = 0; i < n; i++) {
        w[i] = mean + k * w[i];
    }
    return UC_OK;
}

static uc_status cpu_rope_init(struct uc_backend *be, const float *inv_freq, int64_t half_dim,
                               int64_t max_pos)
{
    struct cpu_ctx *c = ctx_of(be);
    uc_free(c->rope_cos);
    uc_free(c->rope_sin);
    c->rope_cos = uc_malloc((size_t)(max_pos * half_dim) * sizeof(float));
    c->rope_sin = uc_malloc((size_t)(max_pos * half_dim) * sizeof(float));
    if (!c->rope_cos || !c->rope_sin) {
        return UC_ERRF(UC_ERR_NOMEM, "rope table positions=%lld", (long long)max_pos);
    }
    for (int64_t p = 0; p < max_pos; p++) {
        for (int64_t i = 0; i < half_dim; i++) {
            /* as transformers: the angle is a float32 product, its cos/sin taken exactly */
            float ang = (float)p * inv_freq[i];
            c->rope_cos[p * half_dim + i] = (float)cos((double)ang);
            c->rope_sin[p * half_dim + i] = (float)sin((double)ang);
        }
    }
    c->rope_half = half_dim;
    c->rope_max_pos = max_pos;
    return UC_OK;
}

/* ---- element-wise ops ------------------------------------------------------------------ */

static uc_status cpu_rmsnorm(struct uc_backend *be, void *y, const void *x, const void *w,
                             int64_t n_tok, int64_t dim, float eps)
{
    float *out = y;
    const float *in = x, *wt = w;
#pragma omp parallel for schedule(static) if (n_tok > 16)
    for (int64_t i = 0; i < n_tok; i++) {
        const float *r = in + i * dim;
        float ss = 0.0f;
        for (int64_t j = 0; j < dim; j++) {
            ss += r[j] * r[j];
        }
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        float *o = out + i * dim;
        for (int64_t j = 0; j < dim; j++) {
            o[j] = wt[j] * (r[j] * inv);
        }
    }
    return UC_OK;
}

static uc_status cpu_matmul(struct uc_backend *be, void *y, const void *x, const void *w,
                            int64_t n_tok, int64_t n_out, int64_t n_in)
{
    if (n_tok == 1) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)n_out, (int)n_in, 1.0f, w, (int)n_in, x, 1,
                    0.0f, y, 1);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n_tok, (int)n_out, (int)n_in,
                    1.0f, x, (int)n_in, w, (int)n_in, 0.0f, y, (int)n_out);
    }
    return UC_OK;
}

static uc_status cpu_add_rmsnorm(struct uc_backend *be, void *y, void *x, const void *d,
                                 const void *w, int64_t n_tok, int64_t dim, float eps)
{
    uc_status rc = be->ops->add(be, x, d, n_tok * dim);
    return rc == UC_OK ? be->ops->rmsnorm(be, y, x, w, n_tok, dim, eps) : rc;
}

static uc_status cpu_matmul_swiglu(struct uc_backend *be, void *y, void *gu, const void *x,
                                   const void *wgu, int64_t n_tok, int64_t n_ffn, int64_t n_in)
{
    uc_status rc = be->ops->matmul(be, gu, x, wgu, n_tok, 2 * n_ffn, n_in);
    return rc == UC_OK ? be->ops->swiglu(be, y, gu, n_tok, n_ffn) : rc;
}

static uc_status cpu_add_bias(struct uc_backend *be, void *y, const void *b, int64_t n_tok,
                              int64_t n_out)
{
    float *o = y;
    const float *bb = b;
    for (int64_t i = 0; i < n_tok; i++) {
        for (int64_t j = 0; j < n_out; j++) {
            o[i * n_out + j] += bb[j];
        }
    }
    return UC_OK;
}

static uc_status cpu_add(struct uc_backend *be, void *y, const void *x, int64_t n)
{
    float *o = y;
    const float *in = x;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        o[i] += in[i];
    }
    return UC_OK;
}

static uc_status cpu_rope(struct uc_backend *be, void *x, int64_t ld, int64_t n_heads,
                          int64_t head_dim, const int32_t *pos, int64_t n_tok)
{
    struct cpu_ctx *c = ctx_of(be);
    int64_t half = head_dim / 2;
    if (half != c->rope_half) {
        return UC_ERRF(UC_ERR_INTERNAL, "rope table half_dim=%lld, op asks %lld",
                       (long long)c->rope_half, (long long)half);
    }
    for (int64_t t = 0; t < n_tok; t++) {
        if (pos[t] < 0 || pos[t] >= c->rope_max_pos) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "position %d outside the rope table (%lld)", pos[t],
                           (long long)c->rope_max_pos);
        }
    }
    float *xs = x;
#pragma omp parallel for schedule(static) if (n_tok > 16)
    for (int64_t t = 0; t < n_tok; t++) {
        const float *cs = c->rope_cos + (int64_t)pos[t] * half;
        const float *sn = c->rope_sin + (int64_t)pos[t] * half;
        for (int64_t h = 0; h < n_heads; h++) {
            float *v = xs + t * ld + h * head_dim;
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = b * cs[i] + a * sn[i];
            }
        }
    }
    return UC_OK;
}

static uc_status cpu_swiglu(struct uc_backend *be, void *y, const void *gu, int64_t n_tok,
                            int64_t n_ffn)
{
    float *o = y;
    const float *in = gu;
#pragma omp parallel for schedule(static) if (n_tok > 4)
    for (int64_t t = 0; t < n_tok; t++) {
        const float *g = in + t * 2 * n_ffn, *u = g + n_ffn;
        float *r = o + t * n_ffn;
        for (int64_t j = 0; j < n_ffn; j++) {
            r[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        }
    }
    return UC_OK;
}

static uc_status cpu_copy_rows(struct uc_backend *be, void *dst, int64_t dst_ld, const void *src,
                               int64_t src_ld, int64_t width, int64_t n_rows)
{
    float *d = dst;
    const float *s = src;
    for (int64_t i = 0; i < n_rows; i++) {
        memmove(d + i * dst_ld, s + i * src_ld, (size_t)width * sizeof(float));
    }
    return UC_OK;
}

static uc_status cpu_gather_rows(struct uc_backend *be, void *dst, const void *src,
                                 const int32_t *idx, int64_t n_idx, int64_t width)
{
    float *d = dst;
    const float *s = src;
    for (int64_t i = 0; i < n_idx; i++) {
        memcpy(d + i * width, s + (int64_t)idx[i] * width, (size_t)width * sizeof(float));
    }
    return UC_OK;
}

/* ---- attention ------------------------------------------------------------------------- */

static float *score_buf(struct cpu_ctx *c, size_t n)
{
    if (n > c->scores_cap) {
        float *s = uc_realloc(c->scores, n * sizeof(float));
        if (!s) {
            return NULL;
        }
        c->scores = s;
        c->scores_cap = n;
    }
    return c->scores;
}

/* exp(x) for x <= 0 to about 2 ulp, in plain arithmetic the compiler vectorises (range
 * reduction by a power of two, Cephes' degree-6 polynomial). Arguments below -87 give ~0. */
static inline float exp_neg(float x)
{
    float xin = x;
    /* NaN and positive arguments are clamped before the integer conversion below (a NaN or a
     * huge float cast to int is undefined); a NaN is passed through at the end */
    x = x >= -87.0f ? x : -87.0f;
    x = x <= 0.0f ? x : 0.0f;
    float t = x * 1.44269504088896341f + 12582912.0f; /* round to nearest via the magic */
    float n = t - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23}; /* 2^n */
    return xin == xin ? p * scale.f : xin;
}

/* Eight-lane reductions: they vectorise without reassociation flags. */
static inline float row_max(const float *restrict x, int64_t n)
{
    float m[8];
    for (int k = 0; k < 8; k++) {
        m[k] = -3.0e38f;
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) {
            m[k] = x[i + k] > m[k] ? x[i + k] : m[k];
        }
    }
    float r = -3.0e38f;
    for (; i < n; i++) {
        r = x[i] > r ? x[i] : r;
    }
    for (int k = 0; k < 8; k++) {
        r = m[k] > r ? m[k] : r;
    }
    return r;
}

static inline float row_sum(const float *restrict x, int64_t n)
{
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) {
            a[k] += x[i + k];
        }
    }
    float r = 0.0f;
    for (; i < n; i++) {
        r += x[i];
    }
    for (int k = 0; k < 8; k++) {
        r += a[k];
    }
    return r;
}

/* Softmax of row[0..n) in place after scaling by `scale`. */
static void softmax_row(float *restrict row, int64_t n, float scale)
{
    for (int64_t j = 0; j < n; j++) {
        row[j] *= scale;
    }
    float mx = row_max(row, n);
    for (int64_t j = 0; j < n; j++) {
        row[j] = exp_neg(row[j] - mx);
    }
    float inv = 1.0f / row_sum(row, n);
    for (int64_t j = 0; j < n; j++) {
        row[j] *= inv;
    }
}

/* Masked softmax of each row r of s (rows, ld): columns > limit0 + r are masked out (causal);
 * cols = number of columns computed. */
UC_HOT_CLONES
static void softmax_causal(float *s, int64_t rows, int64_t ld, int64_t limit0, int64_t cols,
                           float scale)
{
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * ld;
        int64_t n = limit0 + r + 1;
        if (n > cols) {
            n = cols;
        }
        softmax_row(row, n, scale);
        for (int64_t j = n; j < cols; j++) {
            row[j] = 0.0f;
        }
    }
}

/* Computes P (rows x nk) for query rows [a, a+rows) (absolute index q0+a..) of head h into s:
 * the shared first half of attention, colsum and window scores. */
static void attn_probs(float *s, const float *q, int64_t ld_q, const float *k, int64_t ld_kv,
                       int64_t rows, int64_t first_abs, int64_t nk, int64_t h, int64_t kvh,
                       int64_t d)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, (int)nk, (int)d, 1.0f,
                q + h * d, (int)ld_q, k + kvh * d, (int)ld_kv, 0.0f, s, (int)nk);
    softmax_causal(s, rows, nk, first_abs, nk, 1.0f / sqrtf((float)d));
}

/* Threads split the (head, query block) pairs; each computes its block's probabilities with a
 * single-threaded sgemm (OpenBLAS's OpenMP build runs serially inside a parallel region) and
 * multiplies by V. Work per pair grows with the block's keys, so scheduling is dynamic. */
static uc_status cpu_attn_prefill(struct uc_backend *be, void *out, const void *q, int64_t ld_q,
                                  const void *k, const void *v, int64_t ld_kv, int64_t n_tok,
                                  int64_t q0, int64_t n_heads, int64_t n_heads_kv, int64_t head_dim)
{
    struct cpu_ctx *c = ctx_of(be);
    int64_t group = n_heads / n_heads_kv;
    int64_t nk_max = q0 + n_tok;
    int n_thr = omp_get_max_threads();
    float *sbuf = score_buf(c, (size_t)(n_thr * ATT_BLOCK * nk_max));
    if (!sbuf) {
        return UC_ERRF(UC_ERR_NOMEM, "attention scores keys=%lld", (long long)nk_max);
    }
    const float *qf = q, *kf = k, *vf = v;
    float *o = out;
    int64_t n_blocks = (n_tok + ATT_BLOCK - 1) / ATT_BLOCK, n_items = n_blocks * n_heads;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t it = n_items - 1; it >= 0; it--) { /* longest blocks first */
        int64_t a = (it / n_heads) * ATT_BLOCK, h = it % n_heads, kvh = h / group;
        int64_t rows = n_tok - a < ATT_BLOCK ? n_tok - a : ATT_BLOCK;
        int64_t nk = q0 + a + rows; /* causal: the block's last row sees keys < nk */
        float *s = sbuf + (int64_t)omp_get_thread_num() * ATT_BLOCK * nk_max;
        attn_probs(s, qf + a * ld_q, ld_q, kf, ld_kv, rows, q0 + a, nk, h, kvh, head_dim);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)head_dim,
                    (int)nk, 1.0f, s, (int)nk, vf + kvh * head_dim, (int)ld_kv, 0.0f,
                    o + a * n_heads * head_dim + h * head_dim, (int)(n_heads * head_dim));
    }
    return UC_OK;
}

static uc_status cpu_window_probs(struct uc_backend *be, float *out, const void *q_win,
                                  int64_t ld_q, const void *k, int64_t ld_kv, int64_t n_win,
                                  int64_t n, int64_t n_heads, int64_t n_heads_kv, int64_t head_dim)
{
    int64_t group = n_heads / n_heads_kv;
    for (int64_t h = 0; h < n_heads; h++) {
        attn_probs(out + h * n_win * n, q_win, ld_q, k, ld_kv, n_win, n - n_win, n, h, h / group,
                   head_dim);
    }
    return UC_OK;
}

static uc_status cpu_window_scores(struct uc_backend *be, double *col, double *row, bool row_max,
                                   const void *q_win, int64_t ld_q, const void *k, int64_t ld_kv,
                                   int64_t n_win, int64_t n, int64_t n_heads, int64_t n_heads_kv,
                                   int64_t head_dim)
{
    int64_t group = n_heads / n_heads_kv;
    float *p = uc_malloc((size_t)(n_win * n) * sizeof(float));
    double *hs = uc_malloc((size_t)n * sizeof(double));
    if (!p || !hs) {
        uc_free(p);
        uc_free(hs);
        return UC_ERRF(UC_ERR_NOMEM, "window scores keys=%lld", (long long)n);
    }
    for (int64_t j = 0; j < n_heads_kv * n; j++) {
        col[j] = 0.0;
    }
    for (int64_t i = 0; row && i < n; i++) {
        row[i] = row_max ? -INFINITY : 0.0;
    }
    for (int64_t h = 0; h < n_heads; h++) {
        attn_probs(p, q_win, ld_q, k, ld_kv, n_win, n - n_win, n, h, h / group, head_dim);
        for (int64_t i = 0; i < n; i++) {
            hs[i] = 0.0;
        }
        for (int64_t r = 0; r < n_win; r++) {
            for (int64_t i = 0; i < n; i++) {
                hs[i] += p[r * n + i];
            }
        }
        double *c = col + (h / group) * n;
        for (int64_t i = 0; i < n; i++) {
            c[i] += hs[i];
            if (row) {
                row[i] = row_max ? (hs[i] > row[i] ? hs[i] : row[i]) : row[i] + hs[i];
            }
        }
    }
    uc_free(p);
    uc_free(hs);
    return UC_OK;
}

/* The scores are computed at their begin: the host has no stream to queue them on. */
static uc_status cpu_window_scores_begin(struct uc_backend *be, int32_t slot, bool row,
                                         bool row_max, const void *q_win, int64_t ld_q,
                                         const void *k, int64_t ld_kv, int64_t n_win, int64_t n,
                                         int64_t n_heads, int64_t n_heads_kv, int64_t head_dim)
{
    struct cpu_ctx *c = ctx_of(be);
    if (slot < 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "window scores slot=%d", (int)slot);
    }
    if (!uc_grow_zeroed((void **)&c->ws, &c->n_ws, slot + 1, sizeof *c->ws)) {
        return UC_ERRF(UC_ERR_NOMEM, "window score slots=%d", (int)slot + 1);
    }
    struct cpu_ws_slot *w = &c->ws[slot];
    size_t need = (size_t)((n_heads_kv + 1) * n);
    if (need > w->cap) {
        double *b = uc_realloc(w->buf, need * sizeof(double));
        if (!b) {
            return UC_ERRF(UC_ERR_NOMEM, "window scores keys=%lld", (long long)n);
        }
        w->buf = b;
        w->cap = need;
    }
    w->n_col = n_heads_kv * n;
    w->n = n;
    w->row = row;
    return cpu_window_scores(be, w->buf, row ? w->buf + w->n_col : NULL, row_max, q_win, ld_q, k,
                             ld_kv, n_win, n, n_heads, n_heads_kv, head_dim);
}

static uc_status cpu_window_scores_end(struct uc_backend *be, int32_t slot, double *col,
                                       double *row)
{
    struct cpu_ctx *c = ctx_of(be);
    if (slot < 0 || slot >= c->n_ws || !c->ws[slot].n_col) {
        return UC_ERRF(UC_ERR_INTERNAL, "window_scores_end: slot %d was not begun", (int)slot);
    }
    struct cpu_ws_slot *w = &c->ws[slot];
    memcpy(col, w->buf, (size_t)w->n_col * sizeof(double));
    if (row && w->row) {
        memcpy(row, w->buf + w->n_col, (size_t)w->n * sizeof(double));
    }
    w->n_col = 0;
    return UC_OK;
}

static uc_status cpu_attn_colsum(struct uc_backend *be, double *out, const void *q, int64_t ld_q,
                                 const void *k, int64_t ld_kv, int64_t n, int64_t n_heads,
                                 int64_t n_heads_kv, int64_t head_dim)
{
    struct cpu_ctx *c = ctx_of(be);
    int64_t group = n_heads / n_heads_kv;
    float *s = score_buf(c, (size_t)(ATT_BLOCK * n));
    if (!s) {
        return UC_ERRF(UC_ERR_NOMEM, "colsum keys=%lld", (long long)n);
    }
    const float *qf = q;
    for (int64_t h = 0; h < n_heads; h++) {
        double *o = out + h * n;
        for (int64_t j = 0; j < n; j++) {
            o[j] = 0.0;
        }
        for (int64_t a = 0; a < n; a += ATT_BLOCK) {
            int64_t rows = n - a < ATT_BLOCK ? n - a : ATT_BLOCK;
            int64_t nk = a + rows;
            attn_probs(s, qf + a * ld_q, ld_q, k, ld_kv, rows, a, nk, h, h / group, head_dim);
            for (int64_t r = 0; r < rows; r++) {
                for (int64_t j = 0; j < nk; j++) {
                    o[j] += s[r * nk + j];
                }
            }
        }
    }
    return UC_OK;
}

static uc_status cpu_qcov(struct uc_backend *be, double *out, const void *q, int64_t ld, int64_t n,
                          int64_t n_heads, int64_t head_dim)
{
    const float *qf = q;
    for (int64_t h = 0; h < n_heads; h++) {
        uc_status rc = uc_entropy_cov(out + h * head_dim * head_dim, qf + h * head_dim, n,
                                      head_dim, ld);
        if (rc != UC_OK) {
            return rc;
        }
    }
    return UC_OK;
}

static uc_status cpu_qspec(struct uc_backend *be, double *out, const void *q, int64_t ld, int64_t n,
                           int64_t n_heads, int64_t head_dim, int64_t n_top)
{
    int64_t d = head_dim;
    double *cov = uc_malloc((size_t)(n_heads * d * d) * sizeof(double));
    if (!cov) {
        return UC_ERRF(UC_ERR_NOMEM, "query spectra heads=%lld d=%lld", (long long)n_heads,
                       (long long)d);
    }
    uc_status rc = cpu_qcov(be, cov, q, ld, n, n_heads, head_dim);
    int failed = rc != UC_OK;
    /* one small eigensolve per head: in parallel (LAPACK runs serially inside the region) */
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int64_t h = 0; h < n_heads; h++) {
        if (!failed) {
            failed |= uc_entropy_eigvals(out + h * d, cov + h * d * d, d) != UC_OK;
        }
    }
    uc_free(cov);
    uc_entropy_keep_top(out, n_heads, d, n_top); /* the whole spectrum was solved all the same */
    return rc != UC_OK ? rc : failed ? UC_ERRF(UC_ERR_INTERNAL, "eigensolver failed") : UC_OK;
}

/* A batch is computed at its begin: the host has no second stream to overlap it with. */
static uc_status cpu_qspec_begin(struct uc_backend *be, const void *const *q, const int64_t *n,
                                 int64_t count, int64_t ld, int64_t n_heads, int64_t head_dim,
                                 int64_t n_top)
{
    struct cpu_ctx *c = ctx_of(be);
    if (c->qs_count == UC_QSPEC_BATCHES) {
        return UC_ERRF(UC_ERR_INTERNAL, "qspec_begin: %d batches are pending", UC_QSPEC_BATCHES);
    }
    int k = (c->qs_first + c->qs_count) % UC_QSPEC_BATCHES;
    int64_t per = n_heads * head_dim;
    double *buf = uc_realloc(c->qs[k], (size_t)(count * per) * sizeof(double));
    if (!buf) {
        return UC_ERRF(UC_ERR_NOMEM, "query spectra of %lld sequences", (long long)count);
    }
    c->qs[k] = buf;
    for (int64_t i = 0; i < count; i++) {
        uc_status rc = cpu_qspec(be, buf + i * per, q[i], ld, n[i], n_heads, head_dim, n_top);
        if (rc != UC_OK) {
            return rc;
        }
    }
    c->qs_n[k] = count * per;
    c->qs_count++;
    return UC_OK;
}

static uc_status cpu_qspec_fence(struct uc_backend *be) { return UC_OK; } /* read at its begin */

static uc_status cpu_qspec_end(struct uc_backend *be, double *out)
{
    struct cpu_ctx *c = ctx_of(be);
    if (!c->qs_count) {
        return UC_ERRF(UC_ERR_INTERNAL, "qspec_end: no batch was begun");
    }
    int k = c->qs_first;
    memcpy(out, c->qs[k], (size_t)c->qs_n[k] * sizeof(double));
    c->qs_first = (k + 1) % UC_QSPEC_BATCHES;
    c->qs_count--;
    return UC_OK;
}

/* ---- paged KV -------------------------------------------------------------------------- */

static uc_status cpu_kv_pool_create(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                    int64_t n_blocks, int64_t block_tokens, int64_t head_dim)
{
    size_t n = (size_t)(n_blocks * block_tokens * head_dim) * sizeof(float);
    pool->k = uc_malloc(n);
    pool->v = uc_malloc(n);
    if (!pool->k || !pool->v) {
        UC_FREE(pool->k);
        UC_FREE(pool->v);
        return UC_ERRF(UC_ERR_NOMEM, "kv pool blocks=%lld bytes=%zu", (long long)n_blocks, 2 * n);
    }
    pool->block_tokens = block_tokens;
    pool->head_dim = head_dim;
    return UC_OK;
}

static void cpu_kv_pool_destroy(struct uc_backend *be, struct uc_kv_pool_view *pool)
{
    UC_FREE(pool->k);
    UC_FREE(pool->v);
}

static uc_status cpu_kv_scatter(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                const void *k_src, const void *v_src, int64_t ld,
                                const int32_t *src_row, const int32_t *src_head,
                                const int32_t *slot, int64_t n)
{
    int64_t d = pool->head_dim;
    float *pk = pool->k, *pv = pool->v;
    const float *ks = k_src, *vs = v_src;
    for (int64_t e = 0; e < n; e++) {
        int64_t off = (int64_t)src_row[e] * ld + (int64_t)src_head[e] * d;
        memcpy(pk + (int64_t)slot[e] * d, ks + off, (size_t)d * sizeof(float));
        memcpy(pv + (int64_t)slot[e] * d, vs + off, (size_t)d * sizeof(float));
    }
    return UC_OK;
}

static uc_status cpu_rope_append(struct uc_backend *be, struct uc_kv_pool_view *pool, void *qkv,
                                  int64_t ld, int64_t n_heads, int64_t n_heads_kv,
                                  int64_t head_dim, const int32_t *pos, const int32_t *slot,
                                  int64_t n_tok)
{
    uc_status rc = cpu_rope(be, qkv, ld, n_heads + n_heads_kv, head_dim, pos, n_tok);
    const float *x = qkv;
    for (int64_t e = 0; rc == UC_OK && e < n_tok * n_heads_kv; e++) {
        if (slot[e] < 0) {
            continue; /* a shared layer appends nothing; a packed head: kv_append_packed */
        }
        const float *k = x + e / n_heads_kv * ld + (n_heads + e % n_heads_kv) * head_dim;
        memcpy((float *)pool->k + (int64_t)slot[e] * head_dim, k,
               (size_t)head_dim * sizeof(float));
        memcpy((float *)pool->v + (int64_t)slot[e] * head_dim, k + n_heads_kv * head_dim,
               (size_t)head_dim * sizeof(float));
    }
    return rc;
}

static uc_status cpu_kv_copy_blocks(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                   const int32_t *dst, const int32_t *src, int64_t n)
{
    size_t bytes = (size_t)(pool->block_tokens * pool->head_dim) * sizeof(float);
    char *pk = pool->k, *pv = pool->v;
    for (int64_t i = 0; i < n; i++) {
        memcpy(pk + (size_t)dst[i] * bytes, pk + (size_t)src[i] * bytes, bytes);
        memcpy(pv + (size_t)dst[i] * bytes, pv + (size_t)src[i] * bytes, bytes);
    }
    return UC_OK;
}

static uc_status cpu_kv_nonfinite(struct uc_backend *be, const struct uc_kv_pool_view *pool,
                                  const int32_t *blocks, const int32_t *n_valid,
                                  const int32_t *kdim, int64_t n, int32_t *bad)
{
    int64_t per_block = pool->block_tokens * pool->head_dim;
    for (int64_t e = 0; e < n; e++) {
        const float *k = (const float *)pool->k + (int64_t)blocks[e] * per_block;
        const float *v = (const float *)pool->v + (int64_t)blocks[e] * per_block;
        int32_t hit = 0;
        if (kdim && kdim[e] > 0) { /* packed rows: a stream over the K area, then the V area */
            int64_t used = (int64_t)n_valid[e] * (kdim[e] + pool->head_dim);
            for (int64_t i = 0; i < used; i++) {
                hit |= !isfinite(i < per_block ? k[i] : v[i - per_block]);
            }
        } else {
            for (int64_t i = 0; i < (int64_t)n_valid[e] * pool->head_dim; i++) {
                hit |= !isfinite(k[i]) || !isfinite(v[i]);
            }
        }
        bad[e] = hit;
    }
    return UC_OK;
}

/* ---- packed heads (ThinK) --------------------------------------------------------------- */

/* Element i of packed row `slot` (kdim kept key channels, then D values): its address. */
static inline float *packed_elem(const struct uc_kv_pool_view *pool, int64_t kdim, int64_t slot,
                                 int64_t i)
{
    int64_t d = pool->head_dim, bt = pool->block_tokens, per = bt * d;
    int64_t tpb = uc_kv_packed_tokens(bt, d, kdim);
    int64_t b = slot / tpb, at = (slot % tpb) * (kdim + d) + i;
    return at < per ? (float *)pool->k + b * per + at : (float *)pool->v + b * per + at - per;
}

/* Writes one packed row from a key head (D values, kept channels chan) and a value head. */
static void packed_put(struct uc_kv_pool_view *pool, int64_t kdim, const int32_t *chan,
                       int64_t slot, const float *k, const float *v)
{
    int64_t d = pool->head_dim;
    for (int64_t c = 0; c < kdim; c++) {
        *packed_elem(pool, kdim, slot, c) = k[chan[c]];
    }
    for (int64_t i = 0; i < d; i++) {
        *packed_elem(pool, kdim, slot, kdim + i) = v[i];
    }
}

static uc_status cpu_kv_scatter_packed(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                       const void *k_src, const void *v_src, int64_t ld,
                                       const int32_t *src_row, const int32_t *src_head,
                                       const int32_t *slot, int64_t n, int64_t kdim,
                                       const int32_t *chan)
{
    int64_t d = pool->head_dim;
    const float *ks = k_src, *vs = v_src;
    for (int64_t e = 0; e < n; e++) {
        int64_t off = (int64_t)src_row[e] * ld + (int64_t)src_head[e] * d;
        packed_put(pool, kdim, chan, slot[e], ks + off, vs + off);
    }
    return UC_OK;
}

static uc_status cpu_kv_append_packed(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                      const void *qkv, int64_t ld, int64_t n_heads,
                                      int64_t n_heads_kv, const int32_t *slot,
                                      const int32_t *kdim, const int32_t *coff,
                                      const int32_t *chan, int64_t n_tok)
{
    int64_t d = pool->head_dim;
    const float *x = qkv;
    for (int64_t e = 0; e < n_tok * n_heads_kv; e++) {
        if (kdim[e] <= 0) {
            continue;
        }
        const float *k = x + e / n_heads_kv * ld + (n_heads + e % n_heads_kv) * d;
        packed_put(pool, kdim[e], chan + coff[e], -(int64_t)slot[e] - 1, k, k + n_heads_kv * d);
    }
    return UC_OK;
}

static uc_status cpu_kv_move_packed(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                    int32_t dst_slot, int32_t src_slot, int64_t kdim)
{
    for (int64_t i = 0; i < kdim + pool->head_dim; i++) {
        *packed_elem(pool, kdim, dst_slot, i) = *packed_elem(pool, kdim, src_slot, i);
    }
    return UC_OK;
}

/* ---- merged rows (MiniCache) ------------------------------------------------------------ */

/* Element i of merged row `slot` (2 D + 4 values, backend.h): its address. */
static inline float *merged_elem(const struct uc_kv_pool_view *pool, int64_t slot, int64_t i)
{
    int64_t d = pool->head_dim, bt = pool->block_tokens, per = bt * d;
    int64_t tpb = uc_kv_merged_tokens(bt, d);
    int64_t b = slot / tpb, at = (slot % tpb) * (2 * d + UC_KV_MERGED_EXTRA) + i;
    return at < per ? (float *)pool->k + b * per + at : (float *)pool->v + b * per + at - per;
}

static uc_status cpu_kv_merge_dist(struct uc_backend *be, double *dist,
                                   const struct uc_kv_pool_view *pool, const int32_t *a_slot,
                                   const void *k_src, const void *v_src, int64_t ld,
                                   const int32_t *src_row, int64_t head, int64_t n)
{
    int64_t d = pool->head_dim;
    const float *ks = k_src, *vs = v_src, *pk = pool->k, *pv = pool->v;
    for (int64_t e = 0; e < n; e++) {
        int64_t off = (int64_t)src_row[e] * ld + head * d;
        dist[2 * e] = uc_minicache_distance(pk + (int64_t)a_slot[e] * d, ks + off, d);
        dist[2 * e + 1] = uc_minicache_distance(pv + (int64_t)a_slot[e] * d, vs + off, d);
    }
    return UC_OK;
}

static uc_status cpu_kv_merge_write(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                    const int32_t *a_slot, const void *k_src, const void *v_src,
                                    int64_t ld, const int32_t *src_row, int64_t head,
                                    const int32_t *m_slot, int64_t n, float t)
{
    int64_t d = pool->head_dim;
    const float *ks = k_src, *vs = v_src, *pk = pool->k, *pv = pool->v;
    float kdir[1024], vdir[1024], m[4];
    if (d > 1024) {
        return UC_ERRF(UC_ERR_UNSUPPORTED, "minicache: head_dim=%lld above 1024", (long long)d);
    }
    for (int64_t e = 0; e < n; e++) {
        int64_t off = (int64_t)src_row[e] * ld + head * d;
        uc_minicache_merge(kdir, &m[0], &m[1], pk + (int64_t)a_slot[e] * d, ks + off, d, t);
        uc_minicache_merge(vdir, &m[2], &m[3], pv + (int64_t)a_slot[e] * d, vs + off, d, t);
        for (int64_t i = 0; i < d; i++) {
            *merged_elem(pool, m_slot[e], i) = kdir[i];
            *merged_elem(pool, m_slot[e], d + i) = vdir[i];
        }
        for (int64_t i = 0; i < UC_KV_MERGED_EXTRA; i++) {
            *merged_elem(pool, m_slot[e], 2 * d + i) = m[i];
        }
    }
    return UC_OK;
}

static uc_status cpu_chan_sumsq(struct uc_backend *be, double *out, const void *x, int64_t ld,
                                const int32_t *rows, int64_t n_rows, int64_t width)
{
    const float *xf = x;
    for (int64_t c = 0; c < width; c++) {
        out[c] = 0.0;
    }
    for (int64_t i = 0; i < n_rows; i++) {
        const float *r = xf + (int64_t)rows[i] * ld;
        for (int64_t c = 0; c < width; c++) {
            out[c] += (double)r[c] * (double)r[c];
        }
    }
    return UC_OK;
}

static uc_status cpu_kv_move(struct uc_backend *be, struct uc_kv_pool_view *pool, int32_t dst_slot,
                             int32_t src_slot)
{
    int64_t d = pool->head_dim;
    float *pk = pool->k, *pv = pool->v;
    memcpy(pk + (int64_t)dst_slot * d, pk + (int64_t)src_slot * d, (size_t)d * sizeof(float));
    memcpy(pv + (int64_t)dst_slot * d, pv + (int64_t)src_slot * d, (size_t)d * sizeof(float));
    return UC_OK;
}

/* ---- latent heads (LoRC) --------------------------------------------------------------- */

/* Element i of latent row `slot` of width w (the position's element, then 2 r latents). */
static inline float *latent_elem(const struct uc_kv_pool_view *pool, int64_t w, int64_t slot,
                                 int64_t i)
{
    int64_t d = pool->head_dim, bt = pool->block_tokens, per = bt * d;
    int64_t tpb = uc_kv_latent_tokens(bt, d, w);
    int64_t b = slot / tpb, at = (slot % tpb) * w + i;
    return at < per ? (float *)pool->k + b * per + at : (float *)pool->v + b * per + at - per;
}

/* Copies latent row `slot` (w elements; it may run from a block's K area into its V area) to
 * out. */
static inline void latent_row(float *restrict out, const struct uc_kv_pool_view *pool, int64_t w,
                              int64_t slot)
{
    int64_t d = pool->head_dim, bt = pool->block_tokens, per = bt * d;
    int64_t tpb = uc_kv_latent_tokens(bt, d, w);
    int64_t b = slot / tpb, at = (slot % tpb) * w;
    const float *pk = (const float *)pool->k + b * per, *pv = (const float *)pool->v + b * per;
    int64_t in_k = at < per ? (per - at < w ? per - at : w) : 0;
    if (in_k > 0) {
        memcpy(out, pk + at, (size_t)in_k * sizeof(float));
    }
    if (in_k < w) {
        memcpy(out + in_k, pv + (at + in_k - per), (size_t)(w - in_k) * sizeof(float));
    }
}

/* Writes one latent row: pos, then U_k^T k and U_v^T v (k before RoPE), the first `rank` rows of
 * the bases bk, bv (D, D). */
static void latent_put(struct uc_kv_pool_view *pool, int64_t rank, int64_t slot, int32_t pos,
                       const float *k, const float *v, const float *bk, const float *bv)
{
    int64_t d = pool->head_dim, w = uc_kv_latent_width(rank, sizeof(float));
    memcpy(latent_elem(pool, w, slot, 0), &pos, sizeof pos);
    for (int64_t i = 0; i < rank; i++) {
        float zk = 0.0f, zv = 0.0f;
        for (int64_t c = 0; c < d; c++) {
            zk += bk[i * d + c] * k[c];
            zv += bv[i * d + c] * v[c];
        }
        *latent_elem(pool, w, slot, 1 + i) = zk;
        *latent_elem(pool, w, slot, 1 + rank + i) = zv;
    }
}

static uc_status cpu_kv_scatter_latent(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                       const void *k_src, const void *v_src, int64_t ld,
                                       const int32_t *src_row, const int32_t *src_head,
                                       const int32_t *pos, const int32_t *slot, int64_t n,
                                       int64_t rank, const void *basis)
{
    struct cpu_ctx *c = ctx_of(be);
    int64_t d = pool->head_dim, half = d / 2;
    if (half != c->rope_half || d > UC_LATENT_MAX_D || rank < 1 || rank > d) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "latent scatter: D=%lld rank=%lld (rope half %lld)",
                       (long long)d, (long long)rank, (long long)c->rope_half);
    }
    const float *ks = k_src, *vs = v_src, *bs = basis;
    for (int64_t e = 0; e < n; e++) {
        if (pos[e] < 0 || pos[e] >= c->rope_max_pos) {
            return UC_ERRF(UC_ERR_INVALID_ARG, "latent scatter: position %d outside the rope "
                           "table", pos[e]);
        }
        int64_t off = (int64_t)src_row[e] * ld + (int64_t)src_head[e] * d;
        const float *kr = ks + off, *cs = c->rope_cos + (int64_t)pos[e] * half;
        const float *sn = c->rope_sin + (int64_t)pos[e] * half;
        float k[UC_LATENT_MAX_D];
        for (int64_t i = 0; i < half; i++) { /* RoPE undone: the latent is of the raw key */
            float a = kr[i], b = kr[i + half];
            k[i] = a * cs[i] + b * sn[i];
            k[i + half] = b * cs[i] - a * sn[i];
        }
        const float *bk = bs + (int64_t)src_head[e] * 2 * d * d;
        latent_put(pool, rank, slot[e], pos[e], k, vs + off, bk, bk + d * d);
    }
    return UC_OK;
}

static uc_status cpu_kv_append_latent(struct uc_backend *be, struct uc_kv_pool_view *pool,
                                      const void *qkv, int64_t ld, int64_t n_heads,
                                      int64_t n_heads_kv, const int32_t *pos, const int32_t *slot,
                                      const int32_t *rank, const void *basis, int64_t n_tok)
{
    int64_t d = pool->head_dim;
    const float *x = qkv, *bs = basis;
    for (int64_t e = 0; e < n_tok * n_heads_kv; e++) {
        if (rank[e] <= 0) {
            continue;
        }
        int64_t j = e % n_heads_kv;
        const float *k = x + e / n_heads_kv * ld + (n_heads + j) * d;
        const float *bk = bs + j * 2 * d * d;
        latent_put(pool, rank[e], -(int64_t)slot[e] - 1, pos[e / n_heads_kv], k,
                   k + n_heads_kv * d, bk, bk + d * d);
    }
    return UC_OK;
}

/* Dot product with eight partial sums, so it vectorises without reassociation flags. */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int k = 0; k < 8; k++) {
            acc[k] += a[i + k] * b[i + k];
        }
    }
    float sum = 0.0f;
    for (; i < n; i++) {
        sum += a[i] * b[i];
    }
    for (int k = 0; k < 8; k++) {
        sum += acc[k];
    }
    return sum;
}

/* One query row of one head over its paged cache: scores block by block (each block holds bt
 * contiguous rows of D values), softmax, then the V rows weighted. s receives the
 * probabilities (nt floats). */
UC_HOT_CLONES
static void decode_one(float *restrict ov, const float *restrict qv, const float *pk,
                       const float *pv, const int32_t *blocks, int64_t nt, int64_t bt, int64_t d,
                       float scale, float *restrict s)
{
    for (int64_t t0 = 0; t0 < nt; t0 += bt) {
        const float *kb = pk + (int64_t)blocks[t0 / bt] * bt * d;
        int64_t m = nt - t0 < bt ? nt - t0 : bt;
        for (int64_t t = 0; t < m; t++) {
            s[t0 + t] = dot(qv, kb + t * d, d);
        }
    }
    softmax_row(s, nt, scale);
    for (int64_t i = 0; i < d; i++) {
        ov[i] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < nt; t0 += bt) {
        const float *vb = pv + (int64_t)blocks[t0 / bt] * bt * d;
        int64_t m = nt - t0 < bt ? nt - t0 : bt;
        for (int64_t t = 0; t < m; t++) {
            float p = s[t0 + t];
            const float *vv = vb + t * d;
            for (int64_t i = 0; i < d; i++) {
                ov[i] += p * vv[i];
            }
        }
    }
}

/* decode_one for a packed head: the query's kept channels against the packed rows' keys. */
static void decode_packed(float *restrict ov, const float *restrict qv,
                          const struct uc_kv_pool_view *pool, const int32_t *blocks, int64_t nt,
                          int64_t kdim, const int32_t *chan, float scale, float *restrict s)
{
    int64_t d = pool->head_dim, tpb = uc_kv_packed_tokens(pool->block_tokens, d, kdim);
    for (int64_t t = 0; t < nt; t++) {
        int64_t slot = (int64_t)blocks[t / tpb] * tpb + t % tpb;
        float acc = 0.0f;
        for (int64_t c = 0; c < kdim; c++) {
            acc += qv[chan[c]] * *packed_elem(pool, kdim, slot, c);
        }
        s[t] = acc;
    }
    softmax_row(s, nt, scale);
    for (int64_t i = 0; i < d; i++) {
        ov[i] = 0.0f;
    }
    for (int64_t t = 0; t < nt; t++) {
        int64_t slot = (int64_t)blocks[t / tpb] * tpb + t % tpb;
        for (int64_t i = 0; i < d; i++) {
            ov[i] += s[t] * *packed_elem(pool, kdim, slot, kdim + i);
        }
    }
}

/* decode_one over a head's own tokens (unpacked) and its pair's merged rows, restored with
 * the magnitudes of `side`: one softmax over both sets (nt + mn probabilities in s). */
static void decode_merged(float *restrict ov, const float *restrict qv,
                          const struct uc_kv_pool_view *pool, const int32_t *blocks, int64_t nt,
                          const int32_t *mblocks, int64_t mn, int64_t side, float scale,
                          float *restrict s)
{
    int64_t d = pool->head_dim, bt = pool->block_tokens, tpb = uc_kv_merged_tokens(bt, d);
    const float *pk = pool->k, *pv = pool->v;
    for (int64_t t = 0; t < nt; t++) {
        s[t] = dot(qv, pk + ((int64_t)blocks[t / bt] * bt + t % bt) * d, d);
    }
    for (int64_t t = 0; t < mn; t++) {
        int64_t slot = (int64_t)mblocks[t / tpb] * tpb + t % tpb;
        float acc = 0.0f;
        for (int64_t i = 0; i < d; i++) {
            acc += qv[i] * *merged_elem(pool, slot, i);
        }
        s[nt + t] = acc * *merged_elem(pool, slot, 2 * d + side);
    }
    softmax_row(s, nt + mn, scale);
    for (int64_t i = 0; i < d; i++) {
        ov[i] = 0.0f;
    }
    for (int64_t t = 0; t < nt; t++) {
        const float *vv = pv + ((int64_t)blocks[t / bt] * bt + t % bt) * d;
        for (int64_t i = 0; i < d; i++) {
            ov[i] += s[t] * vv[i];
        }
    }
    for (int64_t t = 0; t < mn; t++) {
        int64_t slot = (int64_t)mblocks[t / tpb] * tpb + t % tpb;
        float p = s[nt + t] * *merged_elem(pool, slot, 2 * d + 2 + side);
        for (int64_t i = 0; i < d; i++) {
            ov[i] += p * *merged_elem(pool, slot, d + i);
        }
    }
}

/* One latent entry (a KV head of one row, LoRC) for its `group` query heads q (D each, rotated)
 * into ov (group x D): each cached key rebuilt once from its latents (k = U_r z), rotated at the
 * row's position into kb (nt x D), then per query head the scores, softmax, the value latents
 * summed by probability and one product by U_v. s receives the last head's probabilities; with
 * ps non-NULL, their sum over the group's heads is added there (nt floats). */
UC_HOT_CLONES
static void decode_latent(float *restrict ov, const float *restrict qv, int64_t group,
                          const struct uc_kv_pool_view *pool, const int32_t *blocks, int64_t nt,
                          int64_t rank, const float *bk, const float *bv, const float *rcos,
                          const float *rsin, float scale, float *restrict s, float *restrict kb,
                          float *restrict ps)
{
    int64_t d = pool->head_dim, half = d / 2, w = uc_kv_latent_width(rank, sizeof(float));
    int64_t tpb = uc_kv_latent_tokens(pool->block_tokens, d, w);
    float k[UC_LATENT_MAX_D], zacc[UC_LATENT_MAX_D], row[2 * UC_LATENT_MAX_D + 1];
    for (int64_t t = 0; t < nt; t++) {
        latent_row(row, pool, w, (int64_t)blocks[t / tpb] * tpb + t % tpb);
        int32_t pos;
        memcpy(&pos, row, sizeof pos);
        for (int64_t c = 0; c < d; c++) {
            k[c] = 0.0f;
        }
        for (int64_t i = 0; i < rank; i++) {
            float z = row[1 + i];
            const float *bi = bk + i * d;
            for (int64_t c = 0; c < d; c++) {
                k[c] += z * bi[c];
            }
        }
        const float *cs = rcos + (int64_t)pos * half, *sn = rsin + (int64_t)pos * half;
        float *kr = kb + t * d;
        for (int64_t i = 0; i < half; i++) {
            float a = k[i], b = k[i + half];
            kr[i] = a * cs[i] - b * sn[i];
            kr[i + half] = b * cs[i] + a * sn[i];
        }
    }
    for (int64_t g = 0; g < group; g++) {
        const float *q = qv + g * d;
        for (int64_t t = 0; t < nt; t++) {
            s[t] = dot(q, kb + t * d, d);
        }
        softmax_row(s, nt, scale);
        for (int64_t i = 0; i < rank; i++) {
            zacc[i] = 0.0f;
        }
        for (int64_t t = 0; t < nt; t++) {
            latent_row(row, pool, w, (int64_t)blocks[t / tpb] * tpb + t % tpb);
            for (int64_t i = 0; i < rank; i++) {
                zacc[i] += s[t] * row[1 + rank + i];
            }
        }
        float *o = ov + g * d;
        for (int64_t c = 0; c < d; c++) {
            o[c] = 0.0f;
        }
        for (int64_t i = 0; i < rank; i++) {
            for (int64_t c = 0; c < d; c++) {
                o[c] += zacc[i] * bv[i * d + c];
            }
        }
        for (int64_t t = 0; ps && t < nt; t++) {
            ps[t] += s[t];
        }
    }
}

static uc_status cpu_attn_decode(struct uc_backend *be, void *out, const void *q, int64_t ld_q,
                                 const struct uc_kv_pool_view *pool,
                                 const struct uc_kv_batch_view *view, int64_t n_rows,
                                 int64_t n_heads, int64_t n_heads_kv, float *psum)
{
    struct cpu_ctx *c = ctx_of(be);
    int64_t d = pool->head_dim, bt = pool->block_tokens;
    int64_t group = n_heads / n_heads_kv;
    int64_t maxn = view->max_tokens;
    if (maxn <= 0) { /* backend memory is host memory here */
        for (int64_t e = 0; e < n_rows * n_heads_kv; e++) {
            int64_t nt = view->n_tokens[e] + (view->mc_n ? view->mc_n[e] : 0);
            maxn = nt > maxn ? nt : maxn;
        }
    }
    maxn = maxn > 0 ? maxn : 1;
    if (psum && view->max_tokens <= 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "decode probabilities need max_tokens");
    }
    int n_thr = omp_get_max_threads();
    float *sbuf = score_buf(c, (size_t)(n_thr * maxn));
    if (!sbuf) {
        return UC_ERRF(UC_ERR_NOMEM, "decode scores tokens=%lld", (long long)maxn);
    }
    if (psum) {
        memset(psum, 0, (size_t)(n_rows * n_heads_kv * maxn) * sizeof(float));
    }
    const float *qf = q, *pk = pool->k, *pv = pool->v;
    float *o = out;
    float scale = 1.0f / sqrtf((float)d);
    int64_t n_items = n_rows * n_heads;
#pragma omp parallel for schedule(dynamic, 1) if (n_items > 1)
    for (int64_t it = 0; it < n_items; it++) {
        int64_t b = it / n_heads, h = it % n_heads, j = h / group;
        int64_t e = b * n_heads_kv + j;
        float *s = sbuf + (int64_t)omp_get_thread_num() * maxn;
        if (view->mc_n && view->mc_n[e] > 0) {
            decode_merged(o + b * n_heads * d + h * d, qf + b * ld_q + h * d, pool,
                          view->blocks + view->offset[e], view->n_tokens[e],
                          view->blocks + view->mc_off[e], view->mc_n[e], view->mc_side[e], scale,
                          s);
        } else if (view->lat_rank && view->lat_rank[e] > 0) {
            continue; /* latent entries: the loop below, a KV head at a time */
        } else if (view->kdim && view->kdim[e] > 0) {
            decode_packed(o + b * n_heads * d + h * d, qf + b * ld_q + h * d, pool,
                          view->blocks + view->offset[e], view->n_tokens[e], view->kdim[e],
                          view->chan + view->coff[e], scale, s);
        } else {
            decode_one(o + b * n_heads * d + h * d, qf + b * ld_q + h * d, pk, pv,
                       view->blocks + view->offset[e], view->n_tokens[e], bt, d, scale, s);
        }
        if (psum) {
            float *ps = psum + e * maxn;
            int64_t nt = view->n_tokens[e];
#pragma omp critical(uc_psum)
            for (int64_t t = 0; t < nt; t++) {
                ps[t] += s[t];
            }
        }
    }
    if (view->lat_rank) {
        /* each thread: its score row, then room for the entry's rebuilt keys (maxn x D) */
        float *kbuf = score_buf(c, (size_t)(n_thr * maxn * (1 + d)));
        if (!kbuf) {
            return UC_ERRF(UC_ERR_NOMEM, "latent decode keys tokens=%lld", (long long)maxn);
        }
        int64_t n_ent = n_rows * n_heads_kv;
#pragma omp parallel for schedule(dynamic, 1) if (n_ent > 1)
        for (int64_t e = 0; e < n_ent; e++) {
            if (view->lat_rank[e] <= 0) {
                continue;
            }
            int64_t b = e / n_heads_kv, j = e % n_heads_kv;
            float *s = kbuf + (int64_t)omp_get_thread_num() * maxn * (1 + d);
            const float *bk = (const float *)view->lat_basis + j * 2 * d * d;
            decode_latent(o + b * n_heads * d + j * group * d, qf + b * ld_q + j * group * d,
                          group, pool, view->blocks + view->offset[e], view->n_tokens[e],
                          view->lat_rank[e], bk, bk + d * d, c->rope_cos, c->rope_sin, scale, s,
                          s + maxn, psum ? psum + e * maxn : NULL);
        }
    }
    return UC_OK;
}

static uc_status cpu_argmax(struct uc_backend *be, int32_t *out, const void *x, int64_t n_tok,
                            int64_t n)
{
    const float *xf = x;
    for (int64_t t = 0; t < n_tok; t++) {
        int64_t best = 0;
        bool finite = isfinite(xf[t * n]);
        for (int64_t j = 1; j < n; j++) {
            if (xf[t * n + j] > xf[t * n + best]) {
                best = j;
            }
            finite = finite && isfinite(xf[t * n + j]);
        }
        out[t] = finite ? (int32_t)best : -1; /* -1: a NaN or Inf logit (the caller fails) */
    }
    return UC_OK;
}

/* The ids of argmax_keep and ids_fetch_*: backend memory is host memory here, and every op has
 * run by the time it returns, so a fetch is a copy. */
static uc_status cpu_embed_ids(struct uc_backend *be, void *dst, const void *table,
                               const int32_t *ids, int64_t n_ids, int64_t n_table, int64_t width)
{
    (void)be;
    float *d = dst;
    const float *t = table;
    for (int64_t i = 0; i < n_ids; i++) {
        if (ids[i] >= 0 && ids[i] < n_table) {
            memcpy(d + i * width, t + (int64_t)ids[i] * width, (size_t)width * sizeof(float));
        } else {
            memset(d + i * width, 0, (size_t)width * sizeof(float));
        }
    }
    return UC_OK;
}

static uc_status cpu_ids_fetch_begin(struct uc_backend *be, int slot, const int32_t *dev,
                                     int64_t n)
{
    struct cpu_ctx *c = ctx_of(be);
    if (slot < 0 || slot > 1 || n < 0) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "ids fetch slot %d of %lld ids", slot, (long long)n);
    }
    if (n > c->fetch_cap[slot]) {
        int32_t *p = uc_realloc(c->fetch[slot], (size_t)n * sizeof(int32_t));
        if (!p) {
            return UC_ERRF(UC_ERR_NOMEM, "ids fetch of %lld", (long long)n);
        }
        c->fetch[slot] = p;
        c->fetch_cap[slot] = n;
    }
    if (n > 0) {
        memcpy(c->fetch[slot], dev, (size_t)n * sizeof(int32_t));
    }
    c->fetch_n[slot] = n;
    return UC_OK;
}

static uc_status cpu_ids_fetch_end(struct uc_backend *be, int slot, int32_t *out, int64_t n)
{
    struct cpu_ctx *c = ctx_of(be);
    if (slot < 0 || slot > 1 || n != c->fetch_n[slot]) {
        return UC_ERRF(UC_ERR_INVALID_ARG, "ids fetch slot %d: %lld ids asked, %lld begun", slot,
                       (long long)n, (long long)(slot >= 0 && slot <= 1 ? c->fetch_n[slot] : 0));
    }
    if (n > 0) {
        memcpy(out, c->fetch[slot], (size_t)n * sizeof(int32_t));
    }
    c->fetch_n[slot] = -1;
    return UC_OK;
}

static void cpu_destroy(struct uc_backend *be)
{
    struct cpu_ctx *c = ctx_of(be);
    if (c) {
        uc_free(c->rope_cos);
        uc_free(c->rope_sin);
        uc_free(c->scores);
        uc_free(c->fetch[0]);
        uc_free(c->fetch[1]);
        for (int i = 0; i < UC_QSPEC_BATCHES; i++) {
            uc_free(c->qs[i]);
        }
        for (int32_t i = 0; i < c->n_ws; i++) {
            uc_free(c->ws[i].buf);
        }
        uc_free(c->ws);
        uc_free(c);
    }
    uc_free(be);
}

static void cpu_weight_free(struct uc_backend *be, void *w) { uc_free(w); }

static const struct uc_backend_ops cpu_ops = {
    .alloc = cpu_alloc,
    .mem_available = cpu_mem_available,
    .free = cpu_free,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .scatter_ints = cpu_scatter_ints,
    .download_f32 = cpu_download_f32,
    .upload_f32 = cpu_upload_f32,
    .sync = cpu_sync,
    .act_size = cpu_act_size,
    .weight_create = cpu_weight_create,
    .weight_free = cpu_weight_free,
    .weight_random = cpu_weight_random,
    .rope_init = cpu_rope_init,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .add_rmsnorm = cpu_add_rmsnorm,
    .matmul_residual = uc_backend_matmul_residual_parts, /* the same sums as the parts */
    .matmul_swiglu = cpu_matmul_swiglu,
    .add_bias = cpu_add_bias,
    .add = cpu_add,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .copy_rows = cpu_copy_rows,
    .gather_rows = cpu_gather_rows,
    .attn_prefill = cpu_attn_prefill,
    .window_probs = cpu_window_probs,
    .window_scores = cpu_window_scores,
    .window_scores_begin = cpu_window_scores_begin,
    .window_scores_end = cpu_window_scores_end,
    .attn_colsum = cpu_attn_colsum,
    .qcov = cpu_qcov,
    .qspec = cpu_qspec,
    .qspec_begin = cpu_qspec_begin,
    .qspec_fence = cpu_qspec_fence,
    .qspec_end = cpu_qspec_end,
    .kv_pool_create = cpu_kv_pool_create,
    .kv_pool_destroy = cpu_kv_pool_destroy,
    .kv_scatter = cpu_kv_scatter,
    .rope_append = cpu_rope_append,
    .attn_decode = cpu_attn_decode,
    .kv_move = cpu_kv_move,
    .kv_merge_dist = cpu_kv_merge_dist,
    .kv_merge_write = cpu_kv_merge_write,
    .kv_copy_blocks = cpu_kv_copy_blocks,
    .kv_nonfinite = cpu_kv_nonfinite,
    .kv_scatter_packed = cpu_kv_scatter_packed,
    .kv_scatter_latent = cpu_kv_scatter_latent,
    .kv_append_latent = cpu_kv_append_latent,
    .kv_append_packed = cpu_kv_append_packed,
    .kv_move_packed = cpu_kv_move_packed,
    .chan_sumsq = cpu_chan_sumsq,
    .argmax = cpu_argmax,
    .argmax_keep = cpu_argmax,
    .embed_ids = cpu_embed_ids,
    .ids_fetch_begin = cpu_ids_fetch_begin,
    .ids_fetch_end = cpu_ids_fetch_end,
    .destroy = cpu_destroy,
};

uc_status uc_backend_cpu_create(struct uc_backend **out, const struct uc_backend_params *p)
{
    *out = NULL;
    struct uc_backend *be = uc_calloc(1, sizeof *be);
    struct cpu_ctx *c = uc_calloc(1, sizeof *c);
    if (!be || !c) {
        uc_free(be);
        uc_free(c);
        return UC_ERRF(UC_ERR_NOMEM, "cpu backend");
    }
    /* Ranks on one host share its cores: give each rank its share, for OpenMP and OpenBLAS
     * alike, or oversubscribed ranks spin against each other. */
    int threads = p ? p->n_threads : 0;
    if (threads <= 0) {
        /* the cores this process may run on (mpirun may have bound it), shared with the other
         * ranks of this host when it did not */
        cpu_set_t set;
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        bool bound = false;
        if (sched_getaffinity(0, sizeof set, &set) == 0) {
            bound = CPU_COUNT(&set) < cores;
            cores = CPU_COUNT(&set);
        }
        const char *ls = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
        long local = ls && !bound ? atol(ls) : 1;
        threads = (int)(cores / (local > 0 ? local : 1));
        threads = threads > 0 ? threads : 1;
    }
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    be->ops = &cpu_ops;
    be->ctx = c;
    be->kind = UC_BACKEND_CPU;
    be->name = "cpu";
    snprintf(be->device_name, sizeof be->device_name, "cpu (%d threads, OpenBLAS)",
             omp_get_max_threads());
    *out = be;
    return UC_OK;
}

struct uc_backend_params uc_backend_default_params(void)
{
    struct uc_backend_params p = {.kind = UC_BACKEND_CPU, .device_index = -1};
    return p;
}

uc_status uc_backend_matmul_residual_parts(struct uc_backend *be, void *x, void *y, void *tmp,
                                           const void *a, const void *w, const void *norm_w,
                                           int64_t n_tok, int64_t n_out, int64_t n_in, float eps)
{
    uc_status rc = be->ops->matmul(be, tmp, a, w, n_tok, n_out, n_in);
    if (rc != UC_OK) {
        return rc;
    }
    return norm_w ? be->ops->add_rmsnorm(be, y, x, tmp, norm_w, n_tok, n_out, eps)
                  : be->ops->add(be, x, tmp, n_tok * n_out);
}

uc_status uc_backend_create(struct uc_backend **out, const struct uc_backend_params *p)
{
    if (p->kind == UC_BACKEND_CUDA) {
        return uc_backend_cuda_create(out, p);
    }
    return uc_backend_cpu_create(out, p);
}

void uc_backend_destroy(struct uc_backend *be)
{
    if (be) {
        be->ops->destroy(be);
    }
}

bool uc_backend_parse(const char *name, enum uc_backend_kind *out)
{
    if (strcmp(name, "cpu") == 0) {
        *out = UC_BACKEND_CPU;
    } else if (strcmp(name, "cuda") == 0) {
        *out = UC_BACKEND_CUDA;
    } else {
        return false;
    }
    return true;
}

const char *uc_backend_kind_name(enum uc_backend_kind k)
{
    return k == UC_BACKEND_CUDA ? "cuda" : "cpu";
}
