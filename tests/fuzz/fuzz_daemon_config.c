/* libFuzzer: the daemon's command line and config file. The input splits at its first 0xFF byte:
 * before it, argv words separated by NUL bytes; after it, the text of the --config file. */
#include "daemon/config.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    const uint8_t *ff = memchr(data, 0xFF, size);
    size_t n_args = ff ? (size_t)(ff - data) : size;
    char path[128];
    snprintf(path, sizeof path, "%s/uncompd.conf", fz_dir());
    bool with_file = ff != NULL;
    if (with_file && uc_file_write_all(path, ff + 1, size - n_args - 1) != UC_OK) {
        return 0;
    }
    char *args = fz_text(data, n_args);
    if (!args) {
        return 0;
    }
    char *argv[40];
    int argc = 0;
    argv[argc++] = "uncompd";
    if (with_file) {
        argv[argc++] = "--config";
        argv[argc++] = path;
    }
    for (size_t i = 0; i < n_args && argc < 39;) {
        argv[argc++] = args + i;
        i += strlen(args + i) + 1;
    }
    argv[argc] = NULL;
    struct uc_config c;
    char msg[512];
    bool help = false, list = false;
    if (uc_config_load(&c, argc, argv, msg, sizeof msg, &help, &list) == UC_OK) {
        (void)uc_config_validate(&c, 1 + (int)(size % 4), msg, sizeof msg);
        (void)uc_config_hash(&c);
    }
    uc_config_fini(&c);
    free(args);
    return 0;
}
