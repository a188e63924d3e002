/* Protocol Buffers wire format, for the one thing protobuf-c cannot do: carry a `string` or
 * `bytes` field with its length. protobuf-c unpacks strings NUL-terminated and packs them with
 * strlen, so text with a NUL byte would be cut short. These helpers read such a field's bytes
 * straight from the encoded message, and write one after a message protobuf-c packed (fields
 * may come in any order on the wire; for a singular field the last one wins, so the packed
 * message must leave that field empty). No allocation; any thread. */
#ifndef UC_BASE_PBWIRE_H
#define UC_BASE_PBWIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Finds a length-delimited field in msg[0..n): path[0..depth) are field numbers, each but the
 * last an embedded message, and the last the field wanted; `index` picks among repeated
 * occurrences (0 = first; a singular field should ask for its last with index = SIZE_MAX).
 * Several occurrences of an embedded message are merged as protobuf merges them: the elements
 * of a repeated field are counted across all of them in wire order, and the last occurrence of
 * a singular field wins. Sets *data (pointing into msg) and *len and returns true when found;
 * false when absent or when the bytes are not a valid message. */
bool uc_pb_find_bytes(const uint8_t *msg, size_t n, const uint32_t *path, int depth,
                      size_t index, const uint8_t **data, size_t *len);

/* Bytes a length-delimited field `field` of `len` bytes takes on the wire (tag, length, data). */
size_t uc_pb_bytes_field_size(uint32_t field, size_t len);

/* Writes the field (tag, length, data) at out, which must hold uc_pb_bytes_field_size() bytes;
 * returns the bytes written. */
size_t uc_pb_put_bytes_field(uint8_t *out, uint32_t field, const void *data, size_t len);

#ifdef __cplusplus
}
#endif
#endif
