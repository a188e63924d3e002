/* libFuzzer: tokenizer.json loading; a tokenizer that loads must encode and decode a fixed text
 * (and decode its own ids back). */
#include "fuzz_common.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    char *text = fz_text(data, size);
    if (!text) {
        return 0;
    }
    struct uc_tokenizer *tok = NULL;
    if (uc_tokenizer_create_from_json(&tok, text, "fuzz/tokenizer.json") == UC_OK) {
        static const char s[] = "Hello, world! 123 <s> caf\xc3\xa9 \xe2\x82\xac  \n\tend";
        int32_t *ids = NULL;
        int64_t n = 0;
        if (uc_tokenizer_encode(tok, s, sizeof s - 1, true, &ids, &n) == UC_OK) {
            char *out = NULL;
            size_t len = 0;
            if (uc_tokenizer_decode(tok, ids, n, false, &out, &len) == UC_OK) {
                uc_free(out);
            }
        }
        uc_free(ids);
        uc_tokenizer_destroy(tok);
    }
    free(text);
    return 0;
}
