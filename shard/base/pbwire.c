/* Protocol Buffers wire format helpers (see pbwire.h). */
#include "pbwire.h"

#include <string.h>

/* Reads a varint at p[*at..n); false when truncated or longer than 10 bytes. */
static bool get_varint(const uint8_t *p, size_t n, size_t *at, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 70 && *at < n; shift += 7) {
        uint8_t b = p[(*at)++];
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

static size_t varint_size(uint64_t v)
{
    size_t k = 1;
    while (v >= 0x80) {
        v >>= 7;
        k++;
    }
    return k;
}

static size_t put_varint(uint8_t *out, uint64_t v)
{
    size_t k = 0;
    while (v >= 0x80) {
        out[k++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[k++] = (uint8_t)v;
    return k;
}

/* Reads the field at p[*at..n): its number, and for a length-delimited one (wire type 2) its
 * bytes. Returns 1 for a field, 0 at the end, -1 when the bytes are not a valid message. */
static int next_field(const uint8_t *p, size_t n, size_t *at, uint64_t *num, bool *delimited,
                      const uint8_t **data, size_t *len)
{
    uint64_t key, v;
    if (*at >= n) {
        return 0;
    }
    if (!get_varint(p, n, at, &key)) {
        return -1;
    }
    *num = key >> 3;
    *delimited = false;
    switch (key & 7) {
    case 0:
        return get_varint(p, n, at, &v) ? 1 : -1;
    case 1:
        if (n - *at < 8) {
            return -1;
        }
        *at += 8;
        return 1;
    case 5:
        if (n - *at < 4) {
            return -1;
        }
        *at += 4;
        return 1;
    case 2:
        if (!get_varint(p, n, at, &v) || v > n - *at) {
            return -1;
        }
        *delimited = true;
        *data = p + *at;
        *len = (size_t)v;
        *at += (size_t)v;
        return 1;
    default:
        return -1; /* groups (3, 4) are not used by proto3 */
    }
}

struct find {
    size_t index;        /* the occurrence wanted; SIZE_MAX = the last */
    size_t seen;         /* occurrences passed so far, across every parent occurrence */
    const uint8_t *data;
    size_t len;
    bool found;
};

/* Visits path[0..depth) in p[0..n) in wire order, descending into every occurrence of each
 * embedded message: protobuf merges repeated occurrences of a message field, so a repeated
 * field's elements are those of all of them in order, and a singular field is its last
 * occurrence in any of them. False when the bytes are not a valid message. */
static bool walk(const uint8_t *p, size_t n, const uint32_t *path, int depth, struct find *f)
{
    size_t at = 0;
    for (;;) {
        uint64_t num;
        bool delimited;
        const uint8_t *d = NULL;
        size_t len = 0;
        int r = next_field(p, n, &at, &num, &delimited, &d, &len);
        if (r <= 0) {
            return r == 0;
        }
        if (!delimited || num != path[0]) {
            continue;
        }
        if (depth > 1) {
            if (!walk(d, len, path + 1, depth - 1, f)) {
                return false;
            }
        } else if (f->index == SIZE_MAX || f->seen == f->index) {
            f->data = d;
            f->len = len;
            f->found = true;
            f->seen++;
        } else {
            f->seen++;
        }
        if (f->found && f->index != SIZE_MAX) {
            return true;
        }
    }
}

bool uc_pb_find_bytes(const uint8_t *msg, size_t n, const uint32_t *path, int depth,
                      size_t index, const uint8_t **data, size_t *len)
{
    if (!msg || depth < 1) {
        return false;
    }
    struct find f = {.index = index};
    if (!walk(msg, n, path, depth, &f) || !f.found) {
        return false;
    }
    *data = f.data;
    *len = f.len;
    return true;
}

size_t uc_pb_bytes_field_size(uint32_t field, size_t len)
{
    return varint_size((uint64_t)field << 3 | 2) + varint_size(len) + len;
}

size_t uc_pb_put_bytes_field(uint8_t *out, uint32_t field, const void *data, size_t len)
{
    size_t k = put_varint(out, (uint64_t)field << 3 | 2);
    k += put_varint(out + k, len);
    if (len > 0) {
        memcpy(out + k, data, len);
    }
    return k + len;
}
