/* libFuzzer: encode and decode of arbitrary bytes with the bundled model's tokenizer
 * (UC_FUZZ_MODEL, else models/uncomp-tiny beside the harness's source); the first bytes also
 * decode as token ids. */
#include "fuzz_common.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct uc_tokenizer *tok;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    if (!tok) {
        const char *dir = getenv("UC_FUZZ_MODEL");
        if (uc_tokenizer_create(&tok, dir ? dir : UC_FUZZ_DEFAULT_MODEL) != UC_OK) {
            fprintf(stderr, "fuzz_tokenize: no tokenizer (set UC_FUZZ_MODEL)\n");
            abort();
        }
    }
    int32_t *ids = NULL;
    int64_t n = 0;
    if (uc_tokenizer_encode(tok, (const char *)data, size, size % 2 == 0, &ids, &n) == UC_OK) {
        char *out = NULL;
        size_t len = 0;
        if (uc_tokenizer_decode(tok, ids, n, size % 3 == 0, &out, &len) == UC_OK) {
            uc_free(out);
        }
    }
    uc_free(ids);
    /* raw ids, in and out of the vocabulary */
    int32_t raw[64];
    int64_t k = (int64_t)(size / 4 < 64 ? size / 4 : 64);
    memcpy(raw, data, (size_t)k * 4);
    char *out = NULL;
    size_t len = 0;
    if (uc_tokenizer_decode(tok, raw, k, false, &out, &len) == UC_OK) {
        uc_free(out);
    }
    for (int64_t i = 0; i < k; i++) {
        char b[64];
        (void)uc_tokenizer_token_bytes(tok, raw[i], i == 0, b, sizeof b);
    }
    return 0;
}
