/* libFuzzer: the decoding and validation of every gRPC request message. The first byte picks the
 * method (its index in the server's table, modulo the count); the rest is the message's wire
 * bytes, validated as the handler does (Generate: every field, text tokenized with the bundled
 * model's tokenizer). */
#include "fuzz_common.h"
#include "daemon/server.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct uc_tokenizer *tok;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    if (!tok) {
        const char *dir = getenv("UC_FUZZ_MODEL");
        if (uc_tokenizer_create(&tok, dir ? dir : UC_FUZZ_DEFAULT_MODEL) != UC_OK) {
            fprintf(stderr, "fuzz_grpc_request: no tokenizer (set UC_FUZZ_MODEL)\n");
            abort();
        }
    }
    if (size == 0) {
        return 0;
    }
    static int n_methods; /* the server's method table, counted once */
    if (n_methods == 0) {
        while (uc_grpc_fuzz_request(n_methods, NULL, 0, tok, 4096, 8) >= 0) {
            n_methods++;
        }
    }
    (void)uc_grpc_fuzz_request(data[0] % n_methods, data + 1, size - 1, tok, 4096, 8);
    return 0;
}
