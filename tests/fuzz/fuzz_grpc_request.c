/* libFuzzer: the decoding and validation of every request the daemon takes. The first byte
 * picks what the rest is: 0 .. UC_GRPC_METHOD_COUNT - 1 the wire bytes of that gRPC method's
 * request message (grpc_codec.h's order: Generate, Tokenize, Detokenize, Abort, GetServerInfo,
 * GetModelInfo, GetStats, GetCompressionProfile, SetCompressionPolicy, Calibrate, Drain,
 * Health.Check, Health.Watch, Chat), decoded and validated as the server does before acting
 * (Generate and Chat by the shared request model: text tokenized with the bundled model's
 * tokenizer, Chat's messages rendered by a ChatML template, every choice's scheduler request
 * built); then the JSON body of HTTP /v1/completions and /v1/chat/completions through the same
 * validation. Byte values past those wrap around. One harness, so CI's fuzzing time grows by one
 * slot, not fifteen. */
#include "fuzz_common.h"
#include "daemon/chat_template.h"
#include "daemon/grpc_codec.h"
#include "daemon/openai_api.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define N_HTTP 2 /* /v1/completions, /v1/chat/completions */

static struct uc_tokenizer *tok;
static struct uc_chat_template *chat;

static void setup(void)
{
    const char *dir = getenv("UC_FUZZ_MODEL");
    dir = dir ? dir : UC_FUZZ_DEFAULT_MODEL;
    char msg[256];
    if (uc_tokenizer_create(&tok, dir) != UC_OK ||
        uc_chat_template_load(&chat, dir, UC_FUZZ_CHAT_TEMPLATE, msg, sizeof msg) != UC_OK ||
        !chat) {
        fprintf(stderr, "fuzz_grpc_request: no tokenizer or chat template (set UC_FUZZ_MODEL)\n");
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_quiet();
    if (!tok) {
        setup();
    }
    if (size == 0) {
        return 0;
    }
    /* uncomp-tiny's shape: ids are checked against its vocabulary, stages against its layers */
    struct uc_req_ctx ctx = {.tok = tok, .chat = chat, .vocab = uc_tokenizer_vocab_size(tok),
                             .n_layers = 8, .defaults = uc_compress_default_params()};
    int which = data[0] % (UC_GRPC_METHOD_COUNT + N_HTTP);
    if (which < UC_GRPC_METHOD_COUNT) {
        (void)uc_grpc_request_check(which, data + 1, size - 1, &ctx);
        return 0;
    }
    struct uc_oai_ctx octx = {.req = ctx, .model_name = "uncomp-tiny"};
    struct uc_oai_request r;
    char msg[512], param[64];
    int status = 0;
    enum uc_oai_kind kind = which == UC_GRPC_METHOD_COUNT ? UC_OAI_COMPLETION : UC_OAI_CHAT;
    if (uc_oai_parse(&r, kind, (const char *)data + 1, size - 1, &octx, &status, msg, sizeof msg,
                     param, sizeof param) == UC_OK) {
        /* what the HTTP front submits: one scheduler request per prompt */
        for (int32_t i = 0; i < r.gen.n_inputs * (int32_t)r.gen.n; i += (int32_t)r.gen.n) {
            struct uc_request q;
            uc_req_choice(&r.gen, i, (int32_t)r.gen.n, &q);
            if (!q.prompt || q.n_prompt < 1) {
                abort();
            }
        }
    }
    uc_oai_request_fini(&r);
    return 0;
}
