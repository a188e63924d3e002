/* Safetensors: memory-mapped, single file or sharded through model.safetensors.index.json.
 * Every header is validated (offsets inside the file, sizes equal to shape x dtype, no overlap)
 * before any tensor is read; tensors are read as float32 slices so each rank converts only its
 * own part of a weight. */
#ifndef UC_SHARD_SAFETENSORS_H
#define UC_SHARD_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

enum uc_dtype {
    UC_DTYPE_F32 = 0,
    UC_DTYPE_F16 = 1,
    UC_DTYPE_BF16 = 2,
};

#define UC_ST_MAX_DIMS 4

struct uc_st_tensor {
    char *name;
    enum uc_dtype dtype;
    int n_dims;
    int64_t shape[UC_ST_MAX_DIMS];
    const unsigned char *data; /* into the mapping */
    size_t size_bytes;
    int file; /* index of the file that holds it */
};

struct uc_st;

/* Opens every safetensors file of a model directory (model.safetensors, or the shards listed in
 * model.safetensors.index.json) and validates all headers. */
uc_status uc_st_open(struct uc_st **out, const char *model_dir);
/* Opens exactly one .safetensors file. */
uc_status uc_st_open_file(struct uc_st **out, const char *path);
void uc_st_destroy(struct uc_st *st);

/* Finds a tensor by name; NULL when absent. */
const struct uc_st_tensor *uc_st_find(const struct uc_st *st, const char *name);
int64_t uc_st_count(const struct uc_st *st);
const struct uc_st_tensor *uc_st_at(const struct uc_st *st, int64_t i);
/* Name of the file holding tensor t (for messages). */
const char *uc_st_file_name(const struct uc_st *st, const struct uc_st_tensor *t);
const char *uc_dtype_name(enum uc_dtype dt);
size_t uc_dtype_size(enum uc_dtype dt);

/* Checks that tensor `name` exists with exactly the given shape (n_dims dims). */
uc_status uc_st_expect(const struct uc_st *st, const char *name, int n_dims, const int64_t *shape);

/* Converts a 2D block of tensor t (rows [row0, row0+n_rows), cols [col0, col0+n_cols) of a 2D
 * tensor, or of a 1D tensor viewed as one row) to float32 in dst (n_rows, n_cols). */
uc_status uc_st_read_f32(const struct uc_st_tensor *t, int64_t row0, int64_t n_rows, int64_t col0,
                         int64_t n_cols, float *UC_RESTRICT dst);
/* Converts n contiguous elements of any dtype to float32. */
void uc_convert_to_f32(float *UC_RESTRICT dst, const void *src, enum uc_dtype dt, int64_t n);

#ifdef __cplusplus
}
#endif
#endif
