/* libFuzzer: a safetensors file (header JSON, offsets, dtypes, shapes), then every tensor read
 * back as float32 (one row and the whole tensor, when small). */
#include "fuzz_common.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    char path[128];
    snprintf(path, sizeof path, "%s/model.safetensors", fz_dir());
    if (uc_file_write_all(path, data, size) != UC_OK) {
        return 0;
    }
    struct uc_st *st = NULL;
    if (uc_st_open_file(&st, path) == UC_OK) {
        for (int64_t i = 0; i < uc_st_count(st); i++) {
            const struct uc_st_tensor *t = uc_st_at(st, i);
            int64_t rows = t->n_dims >= 1 ? t->shape[0] : 1;
            int64_t cols = 1;
            for (int d = 1; d < t->n_dims; d++) {
                cols *= t->shape[d];
            }
            if (t->n_dims == 1) {
                cols = rows;
                rows = 1;
            }
            if (rows <= 0 || cols <= 0 || cols > (1 << 16) || rows > (1 << 16) ||
                rows * cols > (1 << 20)) {
                continue;
            }
            float *buf = malloc((size_t)(rows * cols) * sizeof(float));
            if (buf) {
                (void)uc_st_read_f32(t, 0, rows, 0, cols, buf);
                (void)uc_st_read_f32(t, rows - 1, 1, cols / 2, cols - cols / 2, buf);
                free(buf);
            }
        }
        (void)uc_st_find(st, "model.norm.weight");
        uc_st_destroy(st);
    }
    return 0;
}
