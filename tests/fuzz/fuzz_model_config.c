/* libFuzzer: config.json of the Llama family; a config that parses must also give a shard
 * layout for 1, 2 and 4 ranks without overflow. */
#include "fuzz_common.h"
#include "model.h"
#include "model_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    char *text = fz_text(data, size);
    if (!text) {
        return 0;
    }
    struct uc_model_config cfg;
    if (uc_model_config_parse(&cfg, text, "fuzz/config.json") == UC_OK) {
        (void)uc_model_config_hash(&cfg);
        for (int r = 1; r <= 4; r *= 2) {
            char msg[256];
            if (uc_model_tp_check(&cfg, r, msg, sizeof msg) == UC_OK) {
                struct uc_model_shard sh;
                uc_model_shard_of(&sh, &cfg, r - 1, r);
            }
        }
    }
    free(text);
    return 0;
}
