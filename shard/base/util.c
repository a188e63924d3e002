/* Helpers shared by every module: files, clocks, hashing, buffers, number formats, RNG. */
#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "mem.h"

/* strict: regular files only; else character devices (/dev/null as an empty config) pass too.
 * A FIFO, socket or folder is refused either way. */
static int open_readable(const char *path, bool strict)
{
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        (void)UC_ERRF(UC_ERR_IO, "file=%s cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !(S_ISREG(sb.st_mode) || (!strict && S_ISCHR(sb.st_mode)))) {
        (void)UC_ERRF(UC_ERR_IO, "file=%s is not a regular file", path);
        close(fd);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) {
        (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    }
    return fd;
}

int uc_file_open_regular(const char *path)
{
    return open_readable(path, true);
}

uc_status uc_file_read_all(char **out, size_t *size_bytes, const char *path)
{
    *out = NULL;
    int fd = open_readable(path, false);
    if (fd < 0) {
        return UC_ERR_IO; /* logged */
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return UC_ERRF(UC_ERR_IO, "file=%s cannot open: %s", path, strerror(errno));
    }
    uc_status rc = UC_OK;
    char *data = NULL;
    if (fseek(f, 0, SEEK_END) != 0) {
        rc = UC_ERRF(UC_ERR_IO, "file=%s cannot seek: %s", path, strerror(errno));
        goto out_close;
    }
    long n = ftell(f);
    if (n < 0 || fseek(f, 0, SEEK_SET) != 0) {
        rc = UC_ERRF(UC_ERR_IO, "file=%s cannot size: %s", path, strerror(errno));
        goto out_close;
    }
    data = uc_malloc((size_t)n + 1);
    if (!data) {
        rc = UC_ERRF(UC_ERR_NOMEM, "file=%s bytes=%ld", path, n);
        goto out_close;
    }
    if (n > 0 && fread(data, 1, (size_t)n, f) != (size_t)n) {
        rc = UC_ERRF(UC_ERR_IO, "file=%s short read", path);
        UC_FREE(data);
        goto out_close;
    }
    data[n] = '\0';
    if (size_bytes) {
        *size_bytes = (size_t)n;
    }
    *out = data;
out_close:
    fclose(f);
    return rc;
}

uc_status uc_file_write_all(const char *path, const void *data, size_t size_bytes)
{
    size_t n = strlen(path) + 16;
    char *tmp = uc_malloc(n);
    if (!tmp) {
        return UC_ERRF(UC_ERR_NOMEM, "file=%s", path);
    }
    snprintf(tmp, n, "%s.tmp%d", path, (int)getpid());
    uc_status rc = UC_OK;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        rc = UC_ERRF(UC_ERR_IO, "file=%s cannot create: %s", tmp, strerror(errno));
        goto out;
    }
    bool ok = fwrite(data, 1, size_bytes, f) == size_bytes;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        rc = UC_ERRF(UC_ERR_IO, "file=%s cannot write: %s", path, strerror(errno));
        unlink(tmp);
    }
out:
    uc_free(tmp);
    return rc;
}

bool uc_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

char *uc_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = uc_malloc(a + b + 2);
    if (!p) {
        return NULL;
    }
    memcpy(p, dir, a);
    size_t k = a;
    if (a > 0 && dir[a - 1] != '/') {
        p[k++] = '/';
    }
    memcpy(p + k, name, b + 1);
    return p;
}

double uc_time_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int64_t uc_time_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t uc_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t uc_fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int64_t uc_round_half_up(double x) { return (int64_t)floor(x + 0.5); }

float uc_bf16_to_f32(uc_bf16 v)
{
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

uc_bf16 uc_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uc_bf16)((u >> 16) | 0x40u); /* quiet NaN */
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uc_bf16)(u >> 16);
}

float uc_f16_to_f32(uc_f16 h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400u) == 0) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ffu;
            u = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

uc_f16 uc_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xffu) - 127 + 15;
    uint32_t mant = u & 0x7fffffu;
    if (((u >> 23) & 0xffu) == 0xffu) {
        return (uc_f16)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    }
    if (exp >= 0x1f) {
        return (uc_f16)(sign | 0x7c00u);
    }
    if (exp <= 0) {
        if (exp < -10) {
            return (uc_f16)sign;
        }
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) {
            half++;
        }
        return (uc_f16)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) {
        half++;
    }
    return (uc_f16)half;
}

void uc_buf_init(struct uc_buf *b) { memset(b, 0, sizeof *b); }

void uc_buf_fini(struct uc_buf *b)
{
    uc_free(b->data);
    memset(b, 0, sizeof *b);
}

static bool buf_reserve(struct uc_buf *b, size_t extra)
{
    if (b->oom) {
        return false;
    }
    if (b->len + extra + 1 <= b->cap) {
        return true;
    }
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1) {
        cap *= 2;
    }
    char *d = uc_realloc(b->data, cap);
    if (!d) {
        b->oom = true;
        return false;
    }
    b->data = d;
    b->cap = cap;
    return true;
}

void uc_buf_append(struct uc_buf *b, const void *data, size_t n)
{
    if (!buf_reserve(b, n)) {
        return;
    }
    if (n > 0) { /* data may be NULL when there is nothing to copy */
        memcpy(b->data + b->len, data, n);
    }
    b->len += n;
    b->data[b->len] = '\0';
}

void uc_buf_puts(struct uc_buf *b, const char *s) { uc_buf_append(b, s, strlen(s)); }

void uc_buf_printf(struct uc_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !buf_reserve(b, (size_t)n)) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

char *uc_buf_take(struct uc_buf *b)
{
    char *d = b->data;
    if (!d) {
        d = uc_strdup("");
    }
    memset(b, 0, sizeof *b);
    return d;
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void uc_rng_seed(struct uc_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) {
        r->s[i] = splitmix64(&x);
    }
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t uc_rng_next(struct uc_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double uc_rng_uniform(struct uc_rng *r) { return (double)(uc_rng_next(r) >> 11) * 0x1.0p-53; }

void uc_test_fill(float *buf, int64_t n, uint64_t seed, int rank, int64_t index0)
{
    for (int64_t i = 0; i < n; i++) {
        uint64_t x = seed * 0x9e3779b97f4a7c15ULL ^ ((uint64_t)rank << 48) ^ (uint64_t)(index0 + i);
        uint64_t z = splitmix64(&x);
        buf[i] = (float)((double)(z >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    }
}
