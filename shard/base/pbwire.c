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

/* Scans one message level for `field` (wire type 2): occurrence `index` (SIZE_MAX: the last). */
static bool find_level(const uint8_t *p, size_t n, uint32_t field, size_t index,
                       const uint8_t **data, size_t *len)
{
    size_t at = 0, seen = 0;
    bool found = false;
    while (at < n) {
        uint64_t key, v;
        if (!get_varint(p, n, &at, &key)) {
            return false;
        }
        uint32_t wire = (uint32_t)(key & 7);
        uint64_t num = key >> 3;
        switch (wire) {
        case 0:
            if (!get_varint(p, n, &at, &v)) {
                return false;
            }
            break;
        case 1:
            if (n - at < 8) {
                return false;
            }
            at += 8;
            break;
        case 5:
            if (n - at < 4) {
                return false;
            }
            at += 4;
            break;
        case 2:
            if (!get_varint(p, n, &at, &v) || v > n - at) {
                return false;
            }
            if (num == field) {
                if (index == SIZE_MAX || seen == index) {
                    *data = p + at;
                    *len = (size_t)v;
                    found = true;
                    if (index != SIZE_MAX) {
                        return true;
                    }
                }
                seen++;
            }
            at += (size_t)v;
            break;
        default:
            return false; /* groups (3, 4) are not used by proto3 */
        }
    }
    return found;
}

bool uc_pb_find_bytes(const uint8_t *msg, size_t n, const uint32_t *path, int depth,
                      size_t index, const uint8_t **data, size_t *len)
{
    if (!msg || depth < 1) {
        return false;
    }
    const uint8_t *p = msg;
    size_t pn = n;
    for (int i = 0; i + 1 < depth; i++) {
        if (!find_level(p, pn, path[i], SIZE_MAX, &p, &pn)) {
            return false;
        }
    }
    return find_level(p, pn, path[depth - 1], index, data, len);
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
