/* libFuzzer: model.safetensors.index.json (the weight_map naming shard files) beside one small
 * valid shard, opened as a model folder. */
#include "fuzz_common.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    const char *dir = fz_dir();
    char path[160];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    static const char hdr[] = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    unsigned char file[8 + sizeof hdr - 1 + 8] = {0};
    file[0] = (unsigned char)(sizeof hdr - 1);
    memcpy(file + 8, hdr, sizeof hdr - 1);
    (void)uc_file_write_all(path, file, sizeof file);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (uc_file_write_all(path, data, size) != UC_OK) {
        return 0;
    }
    struct uc_st *st = NULL;
    if (uc_st_open(&st, dir) == UC_OK) {
        for (int64_t i = 0; i < uc_st_count(st); i++) {
            (void)uc_st_find(st, uc_st_at(st, i)->name);
        }
        uc_st_destroy(st);
    }
    return 0;
}
