/* Unit tests for the request model both fronts share (daemon/request.c) and the gRPC codec
 * (daemon/grpc_codec.c), without a network: every gRPC request message is packed with
 * protobuf-c, decoded and validated as the server does it; the HTTP JSON bodies go through
 * openai_api.c's decoding. The same request sent through either front decodes to equal common
 * requests, validates to equal scheduler requests, and a bad one gets the same error (same
 * status and field; the same message once both use one front's names). Responses are encoded
 * and unpacked again, text with NUL bytes included. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "base/mem.h"
#include "base/util.h"
#include "base/pbwire.h"
#include "chat_template.h"
#include "grpc/health/v1/health.pb-c.h"
#include "grpc_codec.h"
#include "openai_api.h"
#include "request.h"
#include "test_util.h"
#include "tokenizer.h"
#include "uncomp/v1/uncomp.pb-c.h"

static struct uc_tokenizer *tok;
static struct uc_chat_template *chat;

#define N_LAYERS 8

static struct uc_req_ctx ctx(void)
{
    struct uc_req_ctx c = {.tok = tok, .chat = chat, .vocab = uc_tokenizer_vocab_size(tok),
                           .n_layers = N_LAYERS, .defaults = uc_compress_default_params()};
    return c;
}

static const char *str0(const char *s) { return s ? s : ""; }

/* ---- the two fronts ------------------------------------------------------------------------- */

static uint8_t wire[1 << 16];

/* A gRPC message decoded as the server decodes it (must succeed). */
static void grpc_decode(struct uc_grpc_request *r, enum uc_grpc_method m,
                        const ProtobufCMessage *pm)
{
    size_t n = protobuf_c_message_get_packed_size(pm);
    assert_true(n <= sizeof wire);
    protobuf_c_message_pack(pm, wire);
    struct uc_req_error err;
    uc_status rc = uc_grpc_request_decode(r, m, wire, n, &err);
    if (rc != UC_OK) {
        fail_msg("decode %s: %s", uc_grpc_method_path(m), err.message);
    }
}

/* An HTTP body decoded as the HTTP front decodes it (must succeed). */
static void http_decode(struct uc_oai_request *r, enum uc_oai_kind kind, const char *json)
{
    struct uc_oai_ctx oc = {.req = ctx(), .model_name = "uncomp-tiny"};
    char msg[512], param[64];
    int st = 0;
    uc_status rc = uc_oai_decode(r, kind, json, strlen(json), &oc, &st, msg, sizeof msg, param,
                                 sizeof param);
    if (rc != UC_OK) {
        fail_msg("decode %s: %s (param %s)", json, msg, param);
    }
}

/* Every field of two decoded requests but the front (whose names errors use). */
static void assert_decoded_equal(const struct uc_req *a, const struct uc_req *b)
{
    assert_int_equal(a->kind, b->kind);
    assert_string_equal(str0(a->request_id), str0(b->request_id));
    assert_int_equal(a->n_prompts, b->n_prompts);
    for (int32_t i = 0; i < a->n_prompts; i++) {
        const struct uc_req_prompt *x = &a->prompts[i], *y = &b->prompts[i];
        assert_int_equal(x->text != NULL, y->text != NULL);
        assert_int_equal(x->text_len, y->text_len);
        if (x->text) {
            assert_memory_equal(x->text, y->text, x->text_len);
        }
        assert_int_equal(x->n_ids, y->n_ids);
        if (x->n_ids) {
            assert_memory_equal(x->ids, y->ids, (size_t)x->n_ids * sizeof *x->ids);
        }
    }
    assert_int_equal(a->add_special_tokens, b->add_special_tokens);
    assert_int_equal(a->messages != NULL, b->messages != NULL);
    if (a->messages) {
        assert_true(cJSON_Compare(a->messages, b->messages, true));
    }
    assert_int_equal(a->add_generation_prompt, b->add_generation_prompt);
    assert_int_equal(a->n, b->n);
    assert_int_equal(a->echo, b->echo);
    assert_int_equal(a->logprobs, b->logprobs);
    assert_int_equal(a->top_logprobs, b->top_logprobs);
    assert_int_equal(a->has_temperature, b->has_temperature);
    assert_int_equal(a->has_top_p, b->has_top_p);
    assert_int_equal(a->has_min_p, b->has_min_p);
    assert_int_equal(a->has_repetition_penalty, b->has_repetition_penalty);
    assert_int_equal(a->has_seed, b->has_seed);
    assert_true(a->temperature == b->temperature && a->top_p == b->top_p &&
                a->min_p == b->min_p && a->repetition_penalty == b->repetition_penalty &&
                a->frequency_penalty == b->frequency_penalty &&
                a->presence_penalty == b->presence_penalty);
    assert_int_equal(a->top_k, b->top_k);
    assert_int_equal(a->seed, b->seed);
    assert_int_equal(a->has_max_tokens, b->has_max_tokens);
    assert_int_equal(a->max_tokens, b->max_tokens);
    assert_int_equal(a->min_tokens, b->min_tokens);
    assert_int_equal(a->ignore_eos, b->ignore_eos);
    assert_int_equal(a->n_stop, b->n_stop);
    for (size_t i = 0; i < a->n_stop; i++) {
        assert_int_equal(a->stop_len[i], b->stop_len[i]);
        assert_memory_equal(a->stop[i], b->stop[i], a->stop_len[i]);
    }
    assert_int_equal(a->n_stop_ids, b->n_stop_ids);
    if (a->n_stop_ids) {
        assert_memory_equal(a->stop_ids, b->stop_ids, a->n_stop_ids * sizeof *a->stop_ids);
    }
    assert_int_equal(a->has_compress, b->has_compress);
    const struct uc_req_compress *x = &a->compress, *y = &b->compress;
    assert_string_equal(str0(x->policy), str0(y->policy));
    assert_string_equal(str0(x->decode_mode), str0(y->decode_mode));
    assert_string_equal(str0(x->grouping), str0(y->grouping));
    assert_true(x->kv_budget == y->kv_budget && x->window == y->window &&
                x->pool_kernel == y->pool_kernel && x->sink_tokens == y->sink_tokens &&
                x->head_groups == y->head_groups);
    assert_int_equal(x->n_stage_starts, y->n_stage_starts);
    if (x->n_stage_starts) {
        assert_memory_equal(x->stage_starts, y->stage_starts,
                            x->n_stage_starts * sizeof *x->stage_starts);
    }
    assert_int_equal(x->has_r_min, y->has_r_min);
    assert_true(x->r_min == y->r_min);
    assert_int_equal(x->has_think_ratio, y->has_think_ratio);
    assert_true(x->think_ratio == y->think_ratio);
    assert_int_equal(x->has_minicache_t, y->has_minicache_t);
    assert_true(x->minicache_t == y->minicache_t);
    assert_int_equal(x->has_minicache_gamma, y->has_minicache_gamma);
    assert_true(x->minicache_gamma == y->minicache_gamma);
    assert_int_equal(x->has_minicache_start, y->has_minicache_start);
    assert_int_equal(x->minicache_start, y->minicache_start);
}

static void assert_compress_equal(const struct uc_compress_params *a,
                                  const struct uc_compress_params *b)
{
    assert_int_equal(a->policy, b->policy);
    assert_int_equal(a->kv_budget, b->kv_budget);
    assert_int_equal(a->window, b->window);
    assert_int_equal(a->pool_kernel, b->pool_kernel);
    assert_int_equal(a->sink_tokens, b->sink_tokens);
    assert_int_equal(a->head_groups, b->head_groups);
    assert_true(a->r_min == b->r_min && a->spread == b->spread);
    assert_true(a->think_ratio == b->think_ratio);
    assert_true(a->minicache_t == b->minicache_t && a->minicache_gamma == b->minicache_gamma);
    assert_int_equal(a->minicache_start, b->minicache_start);
    assert_int_equal(a->stages, b->stages);
    assert_int_equal(a->decode_mode, b->decode_mode);
    assert_int_equal(a->grouping, b->grouping);
    assert_int_equal(a->n_stage_starts, b->n_stage_starts);
    for (int32_t i = 0; i < a->n_stage_starts; i++) {
        assert_int_equal(a->stage_starts[i], b->stage_starts[i]);
    }
}

/* The scheduler requests of every choice, as each front submits them. */
static void assert_sched_equal(const struct uc_req *a, const struct uc_req *b)
{
    assert_true(a->valid && b->valid);
    assert_int_equal(a->n_inputs, b->n_inputs);
    for (int32_t i = 0; i < a->n_inputs * (int32_t)a->n; i++) {
        struct uc_request x, y;
        uc_req_choice(a, i, 1, &x);
        uc_req_choice(b, i, 1, &y);
        assert_int_equal(x.n_prompt, y.n_prompt);
        assert_memory_equal(x.prompt, y.prompt, (size_t)x.n_prompt * sizeof *x.prompt);
        assert_true(x.sampling.temperature == y.sampling.temperature &&
                    x.sampling.top_p == y.sampling.top_p && x.sampling.min_p == y.sampling.min_p &&
                    x.sampling.repetition_penalty == y.sampling.repetition_penalty &&
                    x.sampling.frequency_penalty == y.sampling.frequency_penalty &&
                    x.sampling.presence_penalty == y.sampling.presence_penalty);
        assert_int_equal(x.sampling.top_k, y.sampling.top_k);
        assert_int_equal(x.sampling.has_seed, y.sampling.has_seed);
        assert_int_equal(x.sampling.seed, y.sampling.seed);
        assert_int_equal(x.max_tokens, y.max_tokens);
        assert_int_equal(x.min_tokens, y.min_tokens);
        assert_int_equal(x.ignore_eos, y.ignore_eos);
        assert_int_equal(x.logprobs, y.logprobs);
        assert_int_equal(x.prompt_logprobs, y.prompt_logprobs);
        assert_int_equal(x.n_stop, y.n_stop);
        for (int32_t k = 0; k < x.n_stop; k++) {
            assert_int_equal(x.stop_len[k], y.stop_len[k]);
            assert_memory_equal(x.stop[k], y.stop[k], x.stop_len[k]);
        }
        assert_int_equal(x.n_stop_ids, y.n_stop_ids);
        if (x.n_stop_ids) {
            assert_memory_equal(x.stop_ids, y.stop_ids, (size_t)x.n_stop_ids * sizeof(int32_t));
        }
        assert_int_equal(x.has_compress, y.has_compress);
        if (x.has_compress) {
            assert_compress_equal(&x.compress, &y.compress);
        }
        assert_int_equal(x.n, y.n);
    }
}

/* ---- gRPC message builders ------------------------------------------------------------------ */

static char *stops[80];

/* The sampling and compression that the JSON body FULL_JSON below carries too (values exact in
 * float, so gRPC's floats and JSON's doubles agree). */
static void full_sampling(Uncomp__V1__SamplingParams *s, Uncomp__V1__CompressionParams *c,
                          uint32_t *stop_ids, uint32_t *stage_starts)
{
    uncomp__v1__sampling_params__init(s);
    s->max_tokens = 7;
    s->min_tokens = 2;
    s->temperature = 0.5f;
    s->has_temperature = true;
    s->top_p = 0.75f;
    s->top_k = 40;
    s->min_p = 0.125f;
    s->repetition_penalty = 1.25f;
    s->frequency_penalty = -0.5f;
    s->presence_penalty = 0.25f;
    stops[0] = (char *)(uintptr_t)"a";
    stops[1] = (char *)(uintptr_t)"bc";
    s->stop = stops;
    s->n_stop = 2;
    stop_ids[0] = 5;
    stop_ids[1] = 9;
    s->stop_token_ids = stop_ids;
    s->n_stop_token_ids = 2;
    s->seed = 11;
    s->has_seed = true;
    s->ignore_eos = true;
    s->logprobs = 2;
    uncomp__v1__compression_params__init(c);
    c->policy = (char *)(uintptr_t)"uncomp-stage+think";
    c->kv_budget = 64;
    c->window = 4;
    c->pool_kernel = 5;
    c->sink_tokens = 2;
    c->head_groups = 3;
    c->decode_mode = (char *)(uintptr_t)"evict";
    c->grouping = (char *)(uintptr_t)"prompt";
    stage_starts[0] = 2;
    stage_starts[1] = 5;
    c->stage_starts = stage_starts;
    c->n_stage_starts = 2;
    c->r_min = 0.5f;
    c->think_ratio = 0.25f;
}

#define FULL_JSON                                                                                  \
    "\"max_tokens\":7,\"min_tokens\":2,\"temperature\":0.5,\"top_p\":0.75,\"top_k\":40,"         \
    "\"min_p\":0.125,\"repetition_penalty\":1.25,\"frequency_penalty\":-0.5,"                     \
    "\"presence_penalty\":0.25,\"stop\":[\"a\",\"bc\"],\"stop_token_ids\":[5,9],\"seed\":11,"     \
    "\"ignore_eos\":true,\"n\":3,\"uncomp\":{\"policy\":\"uncomp-stage+think\","                \
    "\"kv_budget\":64,\"window\":4,\"pool_kernel\":5,\"sink_tokens\":2,\"head_groups\":3,"        \
    "\"decode_mode\":\"evict\",\"grouping\":\"prompt\",\"stage_starts\":[2,5],\"r_min\":0.5,"      \
    "\"think_ratio\":0.25}"

/* ---- the same request through both fronts --------------------------------------------------- */

/* MiniCache's parameters through both fronts: the same resolved parameters. */
static void test_req_minicache_both_fronts(void **state)
{
    (void)state;
    struct uc_req_ctx c = ctx();
    Uncomp__V1__CompressionParams cp;
    uncomp__v1__compression_params__init(&cp);
    cp.policy = (char *)(uintptr_t)"snapkv+minicache";
    cp.minicache_t = 0.5f;
    cp.minicache_retain_none = true;
    cp.minicache_start = 2;
    Uncomp__V1__GenerateRequest g;
    uncomp__v1__generate_request__init(&g);
    g.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT;
    g.text = (char *)(uintptr_t)"Hello";
    g.compression = &cp;
    struct uc_grpc_request gr;
    grpc_decode(&gr, UC_GRPC_GENERATE, &g.base);
    struct uc_oai_request hr;
    http_decode(&hr, UC_OAI_COMPLETION,
                "{\"prompt\":\"Hello\",\"uncomp\":{\"policy\":\"snapkv+minicache\","
                "\"minicache_t\":0.5,\"minicache_gamma\":0,\"minicache_start\":2}}");
    assert_decoded_equal(&gr.gen, &hr.gen);
    struct uc_req_error e1, e2;
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e1), UC_OK);
    assert_int_equal(uc_req_validate(&hr.gen, &c, &e2), UC_OK);
    assert_sched_equal(&gr.gen, &hr.gen);
    struct uc_request q;
    uc_req_choice(&hr.gen, 0, 1, &q);
    assert_int_equal(q.compress.policy, UC_POLICY_SNAPKV);
    assert_int_equal(q.compress.stages, UC_STAGE_MINICACHE);
    assert_true(q.compress.minicache_t == 0.5f);
    assert_true(q.compress.minicache_gamma < 0.0f); /* none retained */
    assert_int_equal(q.compress.minicache_start, 2);
    uc_grpc_request_fini(&gr);
    uc_oai_request_fini(&hr);
}

static void test_req_same_request_both_fronts(void **state)
{
    (void)state;
    struct uc_req_ctx c = ctx();
    Uncomp__V1__SamplingParams s;
    Uncomp__V1__CompressionParams cp;
    uint32_t stop_ids[2], stage_starts[2];
    full_sampling(&s, &cp, stop_ids, stage_starts);

    /* a text prompt with every field */
    Uncomp__V1__GenerateRequest g;
    uncomp__v1__generate_request__init(&g);
    g.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT;
    g.text = (char *)(uintptr_t)"Once upon a time";
    g.sampling = &s;
    g.compression = &cp;
    g.n = 3;
    struct uc_grpc_request gr;
    grpc_decode(&gr, UC_GRPC_GENERATE, &g.base);
    struct uc_oai_request hr;
    http_decode(&hr, UC_OAI_COMPLETION, "{\"prompt\":\"Once upon a time\",\"logprobs\":2,"
                FULL_JSON "}");
    assert_int_equal(gr.gen.front, UC_REQ_FRONT_GRPC);
    assert_int_equal(hr.gen.front, UC_REQ_FRONT_HTTP);
    assert_decoded_equal(&gr.gen, &hr.gen);
    struct uc_req_error e1, e2;
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e1), UC_OK);
    assert_int_equal(uc_req_validate(&hr.gen, &c, &e2), UC_OK);
    assert_sched_equal(&gr.gen, &hr.gen);
    /* validating again starts over (nothing leaks: ASan's run checks) */
    assert_int_equal(uc_req_validate(&hr.gen, &c, &e2), UC_OK);
    assert_sched_equal(&gr.gen, &hr.gen);
    /* and the values are the ones sent */
    struct uc_request q;
    uc_req_choice(&gr.gen, 2, 1, &q);
    assert_int_equal(q.sampling.seed, 13); /* choice 2: seed + 2 */
    assert_true(q.sampling.temperature == 0.5f && q.sampling.top_p == 0.75f);
    assert_int_equal(q.max_tokens, 7);
    assert_int_equal(q.logprobs, 2);
    assert_int_equal(q.stop_ids[1], 9);
    assert_int_equal(q.compress.policy, UC_POLICY_UNCOMP_STAGE);
    assert_int_equal(q.compress.decode_mode, UC_DECODE_EVICT);
    assert_int_equal(q.compress.stage_starts[1], 5);
    int32_t *ids = NULL;
    int64_t n = 0;
    assert_int_equal(uc_tokenizer_encode(tok, "Once upon a time", 16, true, &ids, &n), UC_OK);
    assert_int_equal(q.n_prompt, n);
    assert_memory_equal(q.prompt, ids, (size_t)n * sizeof *ids);
    uc_free(ids);
    uc_req_choice(&gr.gen, 0, 3, &q); /* gRPC: one request forks its n choices */
    assert_int_equal(q.n, 3);
    uc_grpc_request_fini(&gr);
    uc_oai_request_fini(&hr);

    /* token ids, special tokens off, no sampling or compression message at all */
    uint32_t pids[] = {1, 200, 300};
    Uncomp__V1__TokenIds t;
    uncomp__v1__token_ids__init(&t);
    t.ids = pids;
    t.n_ids = 3;
    uncomp__v1__generate_request__init(&g);
    g.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS;
    g.token_ids = &t;
    grpc_decode(&gr, UC_GRPC_GENERATE, &g.base);
    http_decode(&hr, UC_OAI_COMPLETION, "{\"prompt\":[1,200,300]}");
    assert_decoded_equal(&gr.gen, &hr.gen);
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e1), UC_OK);
    assert_int_equal(uc_req_validate(&hr.gen, &c, &e2), UC_OK);
    assert_sched_equal(&gr.gen, &hr.gen);
    assert_false(gr.gen.base.has_compress);
    assert_int_equal(gr.gen.tokens[0][1], 200);
    uc_grpc_request_fini(&gr);
    uc_oai_request_fini(&hr);

    /* chat: the messages rendered by the one template, tokenized without added tokens */
    Uncomp__V1__ChatMessage m0, m1;
    Uncomp__V1__ChatMessage *msgs[] = {&m0, &m1};
    uncomp__v1__chat_message__init(&m0);
    uncomp__v1__chat_message__init(&m1);
    m0.role = (char *)(uintptr_t)"system";
    m0.content = (char *)(uintptr_t)"Be brief.";
    m1.role = (char *)(uintptr_t)"user";
    m1.content = (char *)(uintptr_t)"Hi";
    Uncomp__V1__ChatRequest ch;
    uncomp__v1__chat_request__init(&ch);
    ch.messages = msgs;
    ch.n_messages = 2;
    ch.sampling = &s;
    ch.compression = &cp;
    ch.n = 3;
    ch.request_id = (char *)(uintptr_t)"chat-1";
    grpc_decode(&gr, UC_GRPC_CHAT, &ch.base);
    http_decode(&hr, UC_OAI_CHAT, "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                "{\"role\":\"user\",\"content\":\"Hi\"}],\"logprobs\":true,\"top_logprobs\":2,"
                FULL_JSON "}");
    assert_int_equal(uc_req_set_str(&hr.gen.request_id, "chat-1"), UC_OK); /* HTTP has none */
    assert_decoded_equal(&gr.gen, &hr.gen);
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e1), UC_OK);
    assert_int_equal(uc_req_validate(&hr.gen, &c, &e2), UC_OK);
    assert_sched_equal(&gr.gen, &hr.gen);
    assert_string_equal(gr.gen.rendered,
                        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n");
    assert_string_equal(gr.gen.base.request_id, "chat-1");
    uc_grpc_request_fini(&gr);
    uc_oai_request_fini(&hr);
}

/* ---- the same error through both fronts ----------------------------------------------------- */

/* A bad request both ways: gRPC fields set by `set`, the same JSON `body`. */
struct err_case {
    const char *json;                   /* HTTP completions body (chat when it has messages) */
    void (*set)(Uncomp__V1__GenerateRequest *g, Uncomp__V1__SamplingParams *s,
                Uncomp__V1__CompressionParams *c);
    enum uc_req_field field;
    const char *grpc_needle;            /* in the gRPC message */
    const char *http_param;
};

static uint32_t big_ids[70];

/* "stop":["s", ... 65 times] */
#define STOP_S4 "\"s\",\"s\",\"s\",\"s\","
#define STOP_S16 STOP_S4 STOP_S4 STOP_S4 STOP_S4
#define STOPS_65 "\"stop\":[" STOP_S16 STOP_S16 STOP_S16 STOP_S16 "\"s\"]"
static char long_stop[1100];

#define SETTER(name, body)                                                                         \
    static void name(Uncomp__V1__GenerateRequest *g, Uncomp__V1__SamplingParams *s,                \
                     Uncomp__V1__CompressionParams *c)                                             \
    {                                                                                              \
        (void)g;                                                                                   \
        (void)s;                                                                                   \
        (void)c;                                                                                   \
        body;                                                                                      \
    }
SETTER(set_temp, s->temperature = 150.0f)
SETTER(set_top_p, s->top_p = 1.5f)
SETTER(set_top_k, s->top_k = 3000000000u)
SETTER(set_min_p, s->min_p = 2.0f)
SETTER(set_rep, s->repetition_penalty = 200.0f)
SETTER(set_freq, s->frequency_penalty = 5.0f)
SETTER(set_pres, s->presence_penalty = -3.0f)
SETTER(set_logprobs, s->logprobs = 21)
SETTER(set_max, s->max_tokens = 2147483648u)
SETTER(set_min_max, (s->max_tokens = 2, s->min_tokens = 5))
SETTER(set_stop_many, (s->n_stop = 65, s->stop = stops))
SETTER(set_stop_empty, (stops[70] = (char *)(uintptr_t)"ok", stops[71] = (char *)(uintptr_t)"",
                        s->stop = stops + 70, s->n_stop = 2))
SETTER(set_stop_long, (stops[72] = long_stop, s->stop = stops + 72, s->n_stop = 1))
SETTER(set_stop_id, (big_ids[0] = 5, big_ids[1] = 5000, s->stop_token_ids = big_ids,
                     s->n_stop_token_ids = 2))
SETTER(set_n, g->n = 17)
SETTER(set_policy, c->policy = (char *)(uintptr_t)"zip")
SETTER(set_policy_stage, c->policy = (char *)(uintptr_t)"snapkv+kvshare")
SETTER(set_policy_combo, c->policy = (char *)(uintptr_t)"uncomp-stage+kvsharer")
SETTER(set_budget, (c->policy = (char *)(uintptr_t)"snapkv", c->kv_budget = 2))
SETTER(set_window, c->window = 100)
SETTER(set_mode, c->decode_mode = (char *)(uintptr_t)"later")
SETTER(set_grouping, c->grouping = (char *)(uintptr_t)"random")
SETTER(set_stage, (big_ids[0] = 3, big_ids[1] = 9, c->stage_starts = big_ids,
                   c->n_stage_starts = 2))
SETTER(set_stage_order, (big_ids[0] = 5, big_ids[1] = 3, c->policy = (char *)(uintptr_t)
                         "uncomp-stage", c->stage_starts = big_ids, c->n_stage_starts = 2))
SETTER(set_r_min, c->r_min = 2.0f)
SETTER(set_think_alone, c->think_ratio = 0.5f)
SETTER(set_think_range, (c->policy = (char *)(uintptr_t)"snapkv+think", c->think_ratio = 1.5f))
SETTER(set_mc_alone, c->minicache_gamma = 0.5f)
SETTER(set_mc_range, (c->policy = (char *)(uintptr_t)"snapkv+minicache", c->minicache_t = 1.5f))
SETTER(set_mc_start, (c->policy = (char *)(uintptr_t)"minicache", c->minicache_start = 7))
SETTER(set_mc_think, c->policy = (char *)(uintptr_t)"snapkv+think+minicache")
SETTER(set_none, (void)0)
SETTER(set_empty_text, (g->input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT,
                        g->text = (char *)(uintptr_t)""))
SETTER(set_bad_id, (big_ids[0] = 1, big_ids[1] = 4096, g->input_case =
                    UNCOMP__V1__GENERATE_REQUEST__INPUT_TOKEN_IDS))
#undef SETTER

static void test_req_same_errors_both_fronts(void **state)
{
    (void)state;
    memset(long_stop, 'x', 1030);
    for (int i = 0; i < 65; i++) {
        stops[i] = (char *)(uintptr_t)"s";
    }
    static const struct err_case cases[] = {
        {"\"temperature\":150", set_temp, UC_REQ_F_TEMPERATURE, "sampling.temperature=150",
         "temperature"},
        {"\"top_p\":1.5", set_top_p, UC_REQ_F_TOP_P, "sampling.top_p=1.5 must be in (0, 1]",
         "top_p"},
        {"\"top_k\":3000000000", set_top_k, UC_REQ_F_TOP_K, "sampling.top_k=3000000000", "top_k"},
        {"\"min_p\":2", set_min_p, UC_REQ_F_MIN_P, "sampling.min_p=2", "min_p"},
        {"\"repetition_penalty\":200", set_rep, UC_REQ_F_REPETITION_PENALTY,
         "sampling.repetition_penalty=200", "repetition_penalty"},
        {"\"frequency_penalty\":5", set_freq, UC_REQ_F_FREQUENCY_PENALTY,
         "sampling.frequency_penalty=5", "frequency_penalty"},
        {"\"presence_penalty\":-3", set_pres, UC_REQ_F_PRESENCE_PENALTY,
         "sampling.presence_penalty=-3", "presence_penalty"},
        {"\"logprobs\":21", set_logprobs, UC_REQ_F_LOGPROBS, "sampling.logprobs=21", "logprobs"},
        {"\"max_tokens\":2147483648", set_max, UC_REQ_F_MAX_TOKENS,
         "sampling.max_tokens=2147483648", "max_tokens"},
        {"\"max_tokens\":2,\"min_tokens\":5", set_min_max, UC_REQ_F_MIN_TOKENS,
         "sampling.min_tokens=5 must be <= sampling.max_tokens=2", "min_tokens"},
        {STOPS_65, set_stop_many, UC_REQ_F_STOP,
         "sampling.stop has 65 strings; at most 64", "stop"},
        {"\"stop\":[\"ok\",\"\"]", set_stop_empty, UC_REQ_F_STOP, "sampling.stop[1] is empty",
         "stop"},
        {NULL, set_stop_long, UC_REQ_F_STOP, "sampling.stop[0] is 1030 bytes", "stop"},
        {"\"stop_token_ids\":[5,5000]", set_stop_id, UC_REQ_F_STOP_TOKEN_IDS,
         "sampling.stop_token_ids[1]=5000 is out of range [0, 4096)", "stop_token_ids"},
        {"\"n\":17", set_n, UC_REQ_F_N, "n=17 must be in [1, 16]", "n"},
        {"\"uncomp\":{\"policy\":\"zip\"}", set_policy, UC_REQ_F_POLICY,
         "compression.policy=\"zip\" is unknown", "uncomp.policy"},
        {"\"uncomp\":{\"policy\":\"snapkv+kvshare\"}", set_policy_stage, UC_REQ_F_POLICY,
         "compression.policy=\"snapkv+kvshare\" is unknown; use one of: full", "uncomp.policy"},
        {"\"uncomp\":{\"policy\":\"uncomp-stage+kvsharer\"}", set_policy_combo, UC_REQ_F_POLICY,
         "kvsharer does not combine with uncomp-stage", "uncomp.policy"},
        {"\"uncomp\":{\"policy\":\"snapkv\",\"kv_budget\":2}", set_budget, UC_REQ_F_COMPRESSION,
         "compression.kv_budget=2 must be at least", "uncomp"},
        {"\"uncomp\":{\"window\":100}", set_window, UC_REQ_F_COMPRESSION, "compression.window=100",
         "uncomp"},
        {"\"uncomp\":{\"decode_mode\":\"later\"}", set_mode, UC_REQ_F_DECODE_MODE,
         "compression.decode_mode=\"later\" must be append or evict", "uncomp.decode_mode"},
        {"\"uncomp\":{\"grouping\":\"random\"}", set_grouping, UC_REQ_F_GROUPING,
         "compression.grouping=\"random\"", "uncomp.grouping"},
        {"\"uncomp\":{\"stage_starts\":[3,9]}", set_stage, UC_REQ_F_STAGE_STARTS,
         "compression.stage_starts[1]=9 must be a layer in [1, 8)", "uncomp.stage_starts"},
        {"\"uncomp\":{\"policy\":\"uncomp-stage\",\"stage_starts\":[5,3]}", set_stage_order,
         UC_REQ_F_COMPRESSION, "compression.stage_starts", "uncomp"},
        {"\"uncomp\":{\"r_min\":2}", set_r_min, UC_REQ_F_R_MIN, "compression.r_min=2",
         "uncomp.r_min"},
        {"\"uncomp\":{\"think_ratio\":0.5}", set_think_alone, UC_REQ_F_THINK_RATIO,
         "compression.think_ratio needs a policy with +think", "uncomp.think_ratio"},
        {"\"uncomp\":{\"policy\":\"snapkv+think\",\"think_ratio\":1.5}", set_think_range,
         UC_REQ_F_THINK_RATIO, "compression.think_ratio=1.5 must be in (0, 1)",
         "uncomp.think_ratio"},
        {"\"uncomp\":{\"minicache_gamma\":0.5}", set_mc_alone, UC_REQ_F_MINICACHE_GAMMA,
         "compression.minicache_gamma needs a policy with +minicache", "uncomp.minicache_gamma"},
        {"\"uncomp\":{\"policy\":\"snapkv+minicache\",\"minicache_t\":1.5}", set_mc_range,
         UC_REQ_F_MINICACHE_T, "compression.minicache_t=1.5 must be in (0, 1]",
         "uncomp.minicache_t"},
        {"\"uncomp\":{\"policy\":\"minicache\",\"minicache_start\":7}", set_mc_start,
         UC_REQ_F_MINICACHE_START, "compression.minicache_start=7 must be in [1, 7)",
         "uncomp.minicache_start"},
        {"\"uncomp\":{\"policy\":\"snapkv+think+minicache\"}", set_mc_think,
         UC_REQ_F_COMPRESSION, "minicache does not combine with kvsharer or think", "uncomp"},
    };
    struct uc_req_ctx c = ctx();
    char body[4096];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct err_case *k = &cases[i];
        Uncomp__V1__GenerateRequest g;
        Uncomp__V1__SamplingParams s;
        Uncomp__V1__CompressionParams cp;
        uncomp__v1__generate_request__init(&g);
        uncomp__v1__sampling_params__init(&s);
        uncomp__v1__compression_params__init(&cp);
        g.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT;
        g.text = (char *)(uintptr_t)"Hello";
        g.sampling = &s;
        g.compression = &cp;
        k->set(&g, &s, &cp);
        struct uc_grpc_request gr;
        grpc_decode(&gr, UC_GRPC_GENERATE, &g.base);
        struct uc_oai_request hr;
        if (k->json) {
            snprintf(body, sizeof body, "{\"prompt\":\"Hello\",%s}", k->json);
        } else {
            snprintf(body, sizeof body, "{\"prompt\":\"Hello\",\"stop\":[\"%s\"]}", long_stop);
        }
        http_decode(&hr, UC_OAI_COMPLETION, body);
        struct uc_req_error ge, he;
        uc_status grc = uc_grpc_request_validate(&gr, &c, &ge);
        uc_status hrc = uc_req_validate(&hr.gen, &c, &he);
        if (grc != UC_ERR_INVALID_ARG || hrc != grc || ge.field != k->field ||
            he.field != k->field || !strstr(ge.message, k->grpc_needle) ||
            strcmp(he.param, k->http_param) != 0) {
            fail_msg("case %zu: grpc rc=%d field=%d '%s'; http rc=%d field=%d param=%s '%s'", i,
                     grc, ge.field, ge.message, hrc, he.field, he.param, he.message);
        }
        /* one validation: in the HTTP front's names, gRPC's request gets HTTP's very message */
        uc_grpc_request_fini(&gr);
        grpc_decode(&gr, UC_GRPC_GENERATE, &g.base);
        gr.gen.front = UC_REQ_FRONT_HTTP;
        assert_int_equal(uc_req_validate(&gr.gen, &c, &ge), hrc);
        if (strcmp(ge.message, he.message) != 0 || strcmp(ge.param, he.param) != 0) {
            fail_msg("case %zu: '%s' (%s) != '%s' (%s)", i, ge.message, ge.param, he.message,
                     he.param);
        }
        uc_grpc_request_fini(&gr);
        uc_oai_request_fini(&hr);
    }
}

/* issue 15: a policy with a stage ("snapkv+kvsharer") reaches the request the same way
 * through gRPC's policy string and HTTP's uncomp object. */
static void test_req_policy_stage_both_fronts(void **state)
{
    (void)state;
    struct uc_req_ctx c = ctx();
    const char *specs[] = {"snapkv+kvsharer", "kvsharer", "uncomp+kvsharer"};
    const enum uc_policy want[] = {UC_POLICY_SNAPKV, UC_POLICY_FULL, UC_POLICY_UNCOMP};
    for (int i = 0; i < 3; i++) {
        Uncomp__V1__GenerateRequest g;
        Uncomp__V1__CompressionParams cp;
        uncomp__v1__generate_request__init(&g);
        uncomp__v1__compression_params__init(&cp);
        g.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT;
        g.text = (char *)(uintptr_t)"Hello";
        g.compression = &cp;
        cp.policy = (char *)(uintptr_t)specs[i];
        struct uc_grpc_request gr;
        grpc_decode(&gr, UC_GRPC_GENERATE, &g.base);
        char body[256];
        snprintf(body, sizeof body, "{\"prompt\":\"Hello\",\"uncomp\":{\"policy\":\"%s\"}}",
                 specs[i]);
        struct uc_oai_request hr;
        http_decode(&hr, UC_OAI_COMPLETION, body);
        struct uc_req_error e1, e2;
        assert_int_equal(uc_grpc_request_validate(&gr, &c, &e1), UC_OK);
        assert_int_equal(uc_req_validate(&hr.gen, &c, &e2), UC_OK);
        struct uc_request q1, q2;
        uc_req_choice(&gr.gen, 0, 1, &q1);
        uc_req_choice(&hr.gen, 0, 1, &q2);
        assert_int_equal(q1.compress.policy, want[i]);
        assert_int_equal(q1.compress.stages, UC_STAGE_KVSHARER);
        assert_int_equal(q2.compress.policy, want[i]);
        assert_int_equal(q2.compress.stages, UC_STAGE_KVSHARER);
        assert_int_equal(q2.compress.n_share, 0);
        uc_grpc_request_fini(&gr);
        uc_oai_request_fini(&hr);
    }
}

/* The prompt's own errors: missing, empty, ids out of range, chat messages. */
static void test_req_prompt_errors_both_fronts(void **state)
{
    (void)state;
    struct uc_req_ctx c = ctx();
    static const struct {
        const char *json;
        void (*set)(Uncomp__V1__GenerateRequest *g, Uncomp__V1__SamplingParams *s,
                    Uncomp__V1__CompressionParams *c);
        enum uc_req_field field;
        const char *grpc_msg, *http_msg;
    } cases[] = {
        {"{}", set_none, UC_REQ_F_INPUT, "input is missing", "prompt is missing"},
        {"{\"prompt\":\"\"}", set_empty_text, UC_REQ_F_TEXT, "text is empty",
         "prompt is empty"},
        {"{\"prompt\":[1,4096]}", set_bad_id, UC_REQ_F_TOKEN_IDS,
         "token_ids[1]=4096 is out of range [0, 4096)", "prompt[1]=4096 is out of range"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Uncomp__V1__GenerateRequest g;
        uncomp__v1__generate_request__init(&g);
        Uncomp__V1__TokenIds t;
        uncomp__v1__token_ids__init(&t);
        t.ids = big_ids;
        t.n_ids = 2;
        g.token_ids = &t;
        cases[i].set(&g, NULL, NULL);
        struct uc_grpc_request gr;
        struct uc_oai_request hr;
        grpc_decode(&gr, UC_GRPC_GENERATE, &g.base);
        http_decode(&hr, UC_OAI_COMPLETION, cases[i].json);
        struct uc_req_error ge, he;
        assert_int_equal(uc_grpc_request_validate(&gr, &c, &ge), UC_ERR_INVALID_ARG);
        assert_int_equal(uc_req_validate(&hr.gen, &c, &he), UC_ERR_INVALID_ARG);
        assert_int_equal(ge.field, cases[i].field);
        assert_int_equal(he.field, cases[i].field);
        assert_non_null(strstr(ge.message, cases[i].grpc_msg));
        assert_non_null(strstr(he.message, cases[i].http_msg));
        assert_string_equal(he.param, "prompt");
        uc_grpc_request_fini(&gr);
        uc_oai_request_fini(&hr);
    }
    /* invalid UTF-8: the tokenizer's reason, named */
    uint8_t buf[16];
    size_t n = uc_pb_put_bytes_field(buf, 2, "a\xc3\x28", 3); /* GenerateRequest.text */
    struct uc_grpc_request gr;
    struct uc_req_error e;
    assert_int_equal(uc_grpc_request_decode(&gr, UC_GRPC_GENERATE, buf, n, &e), UC_OK);
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(e.message, "text: "));
    assert_non_null(strstr(e.message, "UTF-8"));
    uc_grpc_request_fini(&gr);

    /* chat: a bad role, no messages, no template (FAILED_PRECONDITION / HTTP 400) */
    Uncomp__V1__ChatMessage m0;
    Uncomp__V1__ChatMessage *msgs[] = {&m0};
    uncomp__v1__chat_message__init(&m0);
    m0.role = (char *)(uintptr_t)"wizard";
    m0.content = (char *)(uintptr_t)"hi";
    Uncomp__V1__ChatRequest ch;
    uncomp__v1__chat_request__init(&ch);
    ch.messages = msgs;
    ch.n_messages = 1;
    struct uc_oai_request hr;
    grpc_decode(&gr, UC_GRPC_CHAT, &ch.base);
    http_decode(&hr, UC_OAI_CHAT, "{\"messages\":[{\"role\":\"wizard\",\"content\":\"hi\"}]}");
    struct uc_req_error he;
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_req_validate(&hr.gen, &c, &he), UC_ERR_INVALID_ARG);
    assert_string_equal(e.message, he.message);
    assert_non_null(strstr(e.message, "messages[0].role=\"wizard\""));
    assert_int_equal(e.field, UC_REQ_F_MESSAGES);
    uc_grpc_request_fini(&gr);
    uc_oai_request_fini(&hr);
    ch.n_messages = 0;
    grpc_decode(&gr, UC_GRPC_CHAT, &ch.base);
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(e.message, "messages is empty"));
    c.chat = NULL;
    uc_grpc_request_fini(&gr);
    ch.n_messages = 1;
    m0.role = (char *)(uintptr_t)"user";
    grpc_decode(&gr, UC_GRPC_CHAT, &ch.base);
    assert_int_equal(uc_grpc_request_validate(&gr, &c, &e), UC_ERR_UNSUPPORTED);
    assert_int_equal(uc_grpc_status_of(e.status), 9); /* FAILED_PRECONDITION */
    assert_non_null(strstr(e.message, "--chat-template"));
    uc_grpc_request_fini(&gr);
}

/* ---- every gRPC request message ------------------------------------------------------------- */

/* Decode and validate; returns the status, err filled. */
static uc_status grpc_check(struct uc_grpc_request *r, enum uc_grpc_method m,
                            const ProtobufCMessage *pm, struct uc_req_error *err)
{
    grpc_decode(r, m, pm);
    struct uc_req_ctx c = ctx();
    return uc_grpc_request_validate(r, &c, err);
}

static void test_grpc_every_message(void **state)
{
    (void)state;
    struct uc_grpc_request r;
    struct uc_req_error e;
    struct uc_req_ctx c = ctx();

    /* garbage is not a message of any method, and the error names the message */
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff};
    for (int m = 0; m < UC_GRPC_METHOD_COUNT; m++) {
        assert_int_equal(uc_grpc_request_decode(&r, (enum uc_grpc_method)m, junk, sizeof junk,
                                                &e), UC_ERR_INVALID_ARG);
        assert_non_null(strstr(e.message, uc_grpc_method_message((enum uc_grpc_method)m)));
        assert_non_null(strstr(e.message, "is not a valid"));
        assert_int_equal(uc_grpc_request_check(m, junk, sizeof junk, &c), 3);
        uc_grpc_request_fini(&r);
        /* an empty message is every field's default */
        assert_int_equal(uc_grpc_request_decode(&r, (enum uc_grpc_method)m, NULL, 0, &e), UC_OK);
        uc_grpc_request_fini(&r);
    }
    assert_int_equal(uc_grpc_request_check(UC_GRPC_METHOD_COUNT, NULL, 0, &c), -1);
    assert_string_equal(uc_grpc_method_path(UC_GRPC_CHAT), "/uncomp.v1.Inference/Chat");
    /* empty Generate: the input is missing */
    assert_int_equal(uc_grpc_request_check(UC_GRPC_GENERATE, NULL, 0, &c), 3);
    assert_int_equal(uc_grpc_request_check(UC_GRPC_SERVER_INFO, NULL, 0, &c), 0);

    /* Tokenize: text with a NUL byte survives; bad UTF-8 is named */
    uint8_t buf[64];
    size_t n = uc_pb_put_bytes_field(buf, 1, "a\0b", 3);
    assert_int_equal(uc_grpc_request_decode(&r, UC_GRPC_TOKENIZE, buf, n, &e), UC_OK);
    assert_int_equal(r.tokenize.text_len, 3);
    assert_memory_equal(r.tokenize.text, "a\0b", 3);
    uc_grpc_request_fini(&r);
    Uncomp__V1__TokenizeRequest tk;
    uncomp__v1__tokenize_request__init(&tk);
    tk.text = (char *)(uintptr_t)"Hello world";
    tk.add_special_tokens = true;
    assert_int_equal(grpc_check(&r, UC_GRPC_TOKENIZE, &tk.base, &e), UC_OK);
    int32_t *ids = NULL;
    int64_t k = 0;
    assert_int_equal(uc_tokenizer_encode(tok, "Hello world", 11, true, &ids, &k), UC_OK);
    assert_int_equal(r.tokenize.n_ids, k);
    assert_memory_equal(r.tokenize.ids, ids, (size_t)k * sizeof *ids);
    uc_free(ids);
    uc_grpc_request_fini(&r);
    n = uc_pb_put_bytes_field(buf, 1, "\xff\xfe", 2);
    assert_int_equal(uc_grpc_request_decode(&r, UC_GRPC_TOKENIZE, buf, n, &e), UC_OK);
    assert_int_equal(uc_grpc_request_validate(&r, &c, &e), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(e.message, "UTF-8"));
    uc_grpc_request_fini(&r);
    c.tok = NULL;
    assert_int_equal(uc_grpc_request_decode(&r, UC_GRPC_TOKENIZE, buf, n, &e), UC_OK);
    assert_int_equal(uc_grpc_request_validate(&r, &c, &e), UC_ERR_UNAVAILABLE);
    uc_grpc_request_fini(&r);
    c.tok = tok;

    /* Detokenize: ids range-checked against the tokenizer's vocabulary */
    uint32_t dids[] = {0, 4095, 4096};
    Uncomp__V1__DetokenizeRequest dt;
    uncomp__v1__detokenize_request__init(&dt);
    dt.token_ids = dids;
    dt.n_token_ids = 2;
    dt.skip_special_tokens = true;
    assert_int_equal(grpc_check(&r, UC_GRPC_DETOKENIZE, &dt.base, &e), UC_OK);
    assert_int_equal(r.detokenize.ids[1], 4095);
    assert_true(r.detokenize.skip_special_tokens);
    uc_grpc_request_fini(&r);
    dt.n_token_ids = 3;
    assert_int_equal(grpc_check(&r, UC_GRPC_DETOKENIZE, &dt.base, &e), UC_ERR_INVALID_ARG);
    assert_string_equal(e.message, "token_ids[2]=4096 is out of range [0, 4096)");
    uc_grpc_request_fini(&r);

    /* Abort: an id is needed, and it fits */
    Uncomp__V1__AbortRequest ab;
    uncomp__v1__abort_request__init(&ab);
    assert_int_equal(grpc_check(&r, UC_GRPC_ABORT, &ab.base, &e), UC_ERR_INVALID_ARG);
    assert_string_equal(e.message, "request_id is empty");
    uc_grpc_request_fini(&r);
    char longid[80];
    memset(longid, 'x', 64);
    longid[64] = '\0';
    ab.request_id = longid;
    assert_int_equal(grpc_check(&r, UC_GRPC_ABORT, &ab.base, &e), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(e.message, "longer than 63"));
    uc_grpc_request_fini(&r);
    ab.request_id = (char *)(uintptr_t)"req-7";
    assert_int_equal(grpc_check(&r, UC_GRPC_ABORT, &ab.base, &e), UC_OK);
    assert_string_equal(r.request_id, "req-7");
    uc_grpc_request_fini(&r);

    /* GetServerInfo, GetModelInfo, GetCompressionProfile: empty messages */
    Uncomp__V1__GetServerInfoRequest si;
    uncomp__v1__get_server_info_request__init(&si);
    assert_int_equal(grpc_check(&r, UC_GRPC_SERVER_INFO, &si.base, &e), UC_OK);
    uc_grpc_request_fini(&r);
    Uncomp__V1__GetModelInfoRequest mi;
    uncomp__v1__get_model_info_request__init(&mi);
    assert_int_equal(grpc_check(&r, UC_GRPC_MODEL_INFO, &mi.base, &e), UC_OK);
    uc_grpc_request_fini(&r);
    Uncomp__V1__GetCompressionProfileRequest gp;
    uncomp__v1__get_compression_profile_request__init(&gp);
    assert_int_equal(grpc_check(&r, UC_GRPC_PROFILE, &gp.base, &e), UC_OK);
    uc_grpc_request_fini(&r);

    /* GetStats: a known section (any case), else the list */
    Uncomp__V1__GetStatsRequest st;
    uncomp__v1__get_stats_request__init(&st);
    st.section = (char *)(uintptr_t)"KV";
    assert_int_equal(grpc_check(&r, UC_GRPC_STATS, &st.base, &e), UC_OK);
    assert_string_equal(r.section, "KV");
    uc_grpc_request_fini(&r);
    st.section = (char *)(uintptr_t)"nosuch";
    assert_int_equal(grpc_check(&r, UC_GRPC_STATS, &st.base, &e), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(e.message, "section=\"nosuch\" is unknown"));
    uc_grpc_request_fini(&r);

    /* SetCompressionPolicy: onto the current default, the same check as a request's */
    Uncomp__V1__SetCompressionPolicyRequest sp;
    uncomp__v1__set_compression_policy_request__init(&sp);
    sp.policy = (char *)(uintptr_t)"snapkv";
    sp.kv_budget = 20;
    sp.decode_mode = (char *)(uintptr_t)"evict";
    assert_int_equal(grpc_check(&r, UC_GRPC_SET_POLICY, &sp.base, &e), UC_OK);
    assert_int_equal(r.set_policy.params.policy, UC_POLICY_SNAPKV);
    assert_int_equal(r.set_policy.params.kv_budget, 20);
    assert_int_equal(r.set_policy.params.decode_mode, UC_DECODE_EVICT);
    assert_int_equal(r.set_policy.params.window, c.defaults.window); /* kept */
    uc_grpc_request_fini(&r);
    sp.policy = (char *)(uintptr_t)"nonsense";
    assert_int_equal(grpc_check(&r, UC_GRPC_SET_POLICY, &sp.base, &e), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(e.message, "policy=\"nonsense\" is unknown; use one of: full"));
    assert_int_equal(e.field, UC_REQ_F_POLICY);
    uc_grpc_request_fini(&r);
    sp.policy = (char *)(uintptr_t)"snapkv";
    sp.kv_budget = 3;
    assert_int_equal(grpc_check(&r, UC_GRPC_SET_POLICY, &sp.base, &e), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(e.message, "kv_budget=3"));
    uc_grpc_request_fini(&r);
    sp.kv_budget = 0;
    sp.grouping = (char *)(uintptr_t)"x";
    assert_int_equal(grpc_check(&r, UC_GRPC_SET_POLICY, &sp.base, &e), UC_ERR_INVALID_ARG);
    assert_string_equal(e.message, "grouping=\"x\" must be profile or prompt");
    uc_grpc_request_fini(&r);

    /* Calibrate: sizes fit an int32; "" text is the default */
    Uncomp__V1__CalibrateRequest cal;
    uncomp__v1__calibrate_request__init(&cal);
    cal.text = (char *)(uintptr_t)"some text";
    cal.window_tokens = 256;
    cal.max_windows = 2;
    assert_int_equal(grpc_check(&r, UC_GRPC_CALIBRATE, &cal.base, &e), UC_OK);
    assert_string_equal(r.calibrate.text, "some text");
    assert_int_equal(r.calibrate.window_tokens, 256);
    assert_int_equal(r.calibrate.max_windows, 2);
    uc_grpc_request_fini(&r);
    cal.window_tokens = 3000000000u;
    assert_int_equal(grpc_check(&r, UC_GRPC_CALIBRATE, &cal.base, &e), UC_ERR_INVALID_ARG);
    assert_string_equal(e.message, "window_tokens=3000000000 is too large");
    uc_grpc_request_fini(&r);

    /* Drain */
    Uncomp__V1__DrainRequest dr;
    uncomp__v1__drain_request__init(&dr);
    dr.timeout_ms = 5000;
    assert_int_equal(grpc_check(&r, UC_GRPC_DRAIN, &dr.base, &e), UC_OK);
    assert_int_equal(r.drain_timeout_ms, 5000);
    uc_grpc_request_fini(&r);

    /* Health: known services; an unknown one is NOT_FOUND for Check */
    Grpc__Health__V1__HealthCheckRequest h;
    grpc__health__v1__health_check_request__init(&h);
    h.service = (char *)(uintptr_t)"uncomp.v1.Admin";
    assert_int_equal(grpc_check(&r, UC_GRPC_HEALTH_WATCH, &h.base, &e), UC_OK);
    assert_true(r.health.known);
    uc_grpc_request_fini(&r);
    h.service = (char *)(uintptr_t)"nosuch.Service";
    assert_int_equal(grpc_check(&r, UC_GRPC_HEALTH_CHECK, &h.base, &e), UC_OK);
    assert_false(r.health.known);
    uc_grpc_request_fini(&r);
    size_t hn = protobuf_c_message_pack(&h.base, wire);
    assert_int_equal(uc_grpc_request_check(UC_GRPC_HEALTH_CHECK, wire, hn, &c), 5);
    assert_int_equal(uc_grpc_request_check(UC_GRPC_HEALTH_WATCH, wire, hn, &c), 0);

    /* Generate: a stop string with a NUL byte keeps it (written by hand after the message) */
    Uncomp__V1__GenerateRequest g;
    uncomp__v1__generate_request__init(&g);
    g.input_case = UNCOMP__V1__GENERATE_REQUEST__INPUT_TEXT;
    g.text = (char *)(uintptr_t)"Hi";
    n = protobuf_c_message_get_packed_size(&g.base);
    protobuf_c_message_pack(&g.base, wire);
    uint8_t sampling[32];
    size_t sn = uc_pb_put_bytes_field(sampling, 11, "x\0y", 3); /* SamplingParams.stop */
    n += uc_pb_put_bytes_field(wire + n, 4, sampling, sn);      /* GenerateRequest.sampling */
    assert_int_equal(uc_grpc_request_decode(&r, UC_GRPC_GENERATE, wire, n, &e), UC_OK);
    assert_int_equal(uc_grpc_request_validate(&r, &c, &e), UC_OK);
    assert_int_equal(r.gen.base.n_stop, 1);
    assert_int_equal(r.gen.base.stop_len[0], 3);
    assert_memory_equal(r.gen.base.stop[0], "x\0y", 3);
    assert_int_equal(uc_grpc_request_check(UC_GRPC_GENERATE, wire, n, &c), 0);
    uc_grpc_request_fini(&r);
    /* the request id: printable and short */
    g.request_id = (char *)(uintptr_t)"has space";
    assert_int_equal(grpc_check(&r, UC_GRPC_GENERATE, &g.base, &e), UC_ERR_INVALID_ARG);
    assert_string_equal(e.message, "request_id must be printable ASCII without spaces");
    uc_grpc_request_fini(&r);
}

/* ---- HTTP bodies --------------------------------------------------------------------------- */

static void test_http_bodies(void **state)
{
    (void)state;
    struct uc_oai_ctx oc = {.req = ctx(), .model_name = "uncomp-tiny"};
    struct uc_oai_request r;
    char msg[512], param[64];
    int st;
    /* a list of prompts: each tokenized, choice i is prompt i / n */
    const char *b = "{\"prompt\":[\"a b\",[7,8]],\"n\":2,\"seed\":4}";
    assert_int_equal(uc_oai_parse(&r, UC_OAI_COMPLETION, b, strlen(b), &oc, &st, msg, sizeof msg,
                                  param, sizeof param), UC_OK);
    assert_int_equal(r.gen.n_inputs, 2);
    struct uc_request q;
    uc_req_choice(&r.gen, 3, 1, &q);
    assert_int_equal(q.n_prompt, 2);
    assert_int_equal(q.prompt[0], 7);
    assert_int_equal(q.sampling.seed, 5);
    uc_oai_request_fini(&r);
    /* JSON shapes are the decoder's: the field and what it should be */
    static const struct {
        const char *body, *param, *msg;
    } bad[] = {
        {"{\"prompt\":\"x\",\"temperature\":\"hot\"}", "temperature",
         "temperature must be a number"},
        {"{\"prompt\":\"x\",\"n\":2.5}", "n", "n must be an integer"},
        {"{\"prompt\":\"x\",\"seed\":1e300}", "seed", "seed=1"},
        {"{\"prompt\":[]}", "prompt", "prompt is an empty list"},
        {"{\"prompt\":[\"a\",5]}", "prompt", "prompt[1] must be a string"},
        {"{\"prompt\":\"x\",\"stop\":[1]}", "stop", "stop[0] must be a string"},
        {"{\"prompt\":\"x\",\"stop_token_ids\":[1.5]}", "stop_token_ids",
         "stop_token_ids[0] must be an integer"},
        {"{\"prompt\":\"x\",\"uncomp\":{\"kv_budget\":\"big\"}}", "uncomp.kv_budget",
         "uncomp.kv_budget must be an integer"},
        {"{\"prompt\":\"x\",\"uncomp\":{\"kv_budget\":-1}}", "uncomp.kv_budget",
         "uncomp.kv_budget=-1 must be >= 0"},
        {"{\"prompt\":\"x\",\"uncomp\":{\"stage_starts\":5}}", "uncomp.stage_starts",
         "must be a list of layers"},
        {"{\"prompt\":\"x\",\"top_k\":-2}", "top_k", "top_k=-2 must be in [-1"},
        {"{\"prompt\":\"x\",\"max_tokens\":0}", "max_tokens", "max_tokens=0 must be in [1"},
        {"{\"prompt\":\"x\",\"logprobs\":-1}", "logprobs", "logprobs=-1 must be in [0, 20]"},
        {"{\"prompt\":\"x\",\"n\":9,\"stop\":[\"a\"]}", "", ""}, /* fine: 9 choices */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uc_status rc = uc_oai_parse(&r, UC_OAI_COMPLETION, bad[i].body, strlen(bad[i].body), &oc,
                                    &st, msg, sizeof msg, param, sizeof param);
        bool want_ok = !bad[i].msg[0];
        if (want_ok ? rc != UC_OK
                    : rc != UC_ERR_INVALID_ARG || strcmp(param, bad[i].param) != 0 ||
                          !strstr(msg, bad[i].msg)) {
            fail_msg("%s: rc=%d param=%s msg=%s", bad[i].body, rc, param, msg);
        }
        uc_oai_request_fini(&r);
    }
    /* chat: top_logprobs needs logprobs; the kwargs reach the template */
    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}";
    assert_int_equal(uc_oai_parse(&r, UC_OAI_CHAT, b, strlen(b), &oc, &st, msg, sizeof msg, param,
                                  sizeof param), UC_ERR_INVALID_ARG);
    assert_string_equal(param, "top_logprobs");
    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,"
        "\"top_logprobs\":25}";
    assert_int_equal(uc_oai_parse(&r, UC_OAI_CHAT, b, strlen(b), &oc, &st, msg, sizeof msg, param,
                                  sizeof param), UC_ERR_INVALID_ARG);
    assert_string_equal(param, "top_logprobs");
    assert_string_equal(msg, "top_logprobs=25 must be in [0, 20]");
    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"add_generation_prompt\":false}";
    assert_int_equal(uc_oai_parse(&r, UC_OAI_CHAT, b, strlen(b), &oc, &st, msg, sizeof msg, param,
                                  sizeof param), UC_OK);
    assert_string_equal(r.gen.rendered, "<|im_start|>user\nx<|im_end|>\n");
    uc_oai_request_fini(&r);
}

/* ---- responses ------------------------------------------------------------------------------ */

static void test_grpc_encode_responses(void **state)
{
    (void)state;
    /* a chunk of two token events with logprobs, text with a NUL byte */
    int32_t ids1[] = {5, 6}, ids2[] = {7}, top[] = {5, 9};
    float top_lp[] = {-0.5f, -1.5f};
    struct uc_token_logprob lp[] = {{5, -0.5f, 2, top, top_lp}, {6, -2.0f, 0, NULL, NULL}};
    struct uc_gen_event ev1 = {.kind = UC_EVENT_TOKENS, .index = 1, .ids = ids1, .n_ids = 2,
                               .text = "a\0b", .text_len = 3, .logprobs = lp};
    struct uc_gen_event ev2 = {.kind = UC_EVENT_TOKENS, .index = 1, .ids = ids2, .n_ids = 1,
                               .text = "c", .text_len = 1};
    struct uc_grpc_event *e1 = uc_grpc_event_copy(&ev1), *e2 = uc_grpc_event_copy(&ev2);
    assert_non_null(e1);
    assert_non_null(e2);
    e1->next = e2;
    struct uc_grpc_msg m;
    assert_int_equal(uc_grpc_encode_chunk(&m, "req-1", e1, NULL, 1), UC_OK);
    Uncomp__V1__GenerateResponse *resp =
        uncomp__v1__generate_response__unpack(NULL, m.len, m.data);
    assert_non_null(resp);
    assert_string_equal(resp->request_id, "req-1");
    assert_int_equal(resp->kind_case, UNCOMP__V1__GENERATE_RESPONSE__KIND_CHUNK);
    assert_int_equal(resp->chunk->n_token_ids, 3);
    assert_int_equal(resp->chunk->token_ids[2], 7);
    assert_int_equal(resp->chunk->index, 1);
    assert_int_equal(resp->chunk->n_logprobs, 3);
    assert_int_equal(resp->chunk->logprobs[0]->n_top_ids, 2);
    assert_true(resp->chunk->logprobs[0]->top_logprobs[1] == -1.5f);
    const uint32_t text_path[] = {2, 2}; /* chunk.text, with its NUL byte */
    const uint8_t *d;
    size_t dn;
    assert_true(uc_pb_find_bytes(m.data, m.len, text_path, 2, SIZE_MAX, &d, &dn));
    assert_int_equal(dn, 4);
    assert_memory_equal(d, "a\0bc", 4);
    uncomp__v1__generate_response__free_unpacked(resp, NULL);
    uc_free(m.data);
    uc_grpc_event_free(e1);
    uc_grpc_event_free(e2);

    /* the Complete: finish, usage, matched stop with a NUL byte, the report */
    struct uc_compress_report rep = {.policy = UC_POLICY_SNAPKV, .kv_budget = 32,
                                     .kv_tokens_full = 100, .kv_tokens_kept = 40,
                                     .stages = UC_STAGE_THINK, .think_ratio = 0.4f,
                                     .key_channels = 20};
    struct uc_gen_event done = {.kind = UC_EVENT_DONE, .index = 0, .finish = UC_FINISH_STOP,
                                .matched_stop = "x\0y", .matched_stop_len = 3,
                                .prompt_tokens = 9, .completion_tokens = 4, .report = &rep,
                                .compress = uc_compress_default_params()};
    struct uc_grpc_event *ed = uc_grpc_event_copy(&done);
    assert_non_null(ed);
    assert_int_equal(uc_grpc_encode_complete(&m, "req-1", ed), UC_OK);
    resp = uncomp__v1__generate_response__unpack(NULL, m.len, m.data);
    assert_non_null(resp);
    assert_int_equal(resp->kind_case, UNCOMP__V1__GENERATE_RESPONSE__KIND_COMPLETE);
    assert_int_equal(resp->complete->finish_reason, UNCOMP__V1__FINISH_REASON__STOP);
    assert_int_equal(resp->complete->usage->prompt_tokens, 9);
    assert_string_equal(resp->complete->compression->policy, "snapkv+think");
    assert_int_equal(resp->complete->compression->key_channels, 20);
    assert_int_equal(resp->complete->compression->kv_tokens_kept, 40);
    const uint32_t stop_path[] = {3, 2};
    assert_true(uc_pb_find_bytes(m.data, m.len, stop_path, 2, SIZE_MAX, &d, &dn));
    assert_int_equal(dn, 3);
    assert_memory_equal(d, "x\0y", 3);
    uncomp__v1__generate_response__free_unpacked(resp, NULL);
    uc_free(m.data);
    uc_grpc_event_free(ed);

    /* unary replies */
    assert_int_equal(uc_grpc_encode_detokenize(&m, "p\0q", 3), UC_OK);
    const uint32_t det_path[] = {1};
    assert_true(uc_pb_find_bytes(m.data, m.len, det_path, 1, SIZE_MAX, &d, &dn));
    assert_int_equal(dn, 3);
    uc_free(m.data);
    int32_t tids[] = {1, 2};
    assert_int_equal(uc_grpc_encode_tokenize(&m, tok, tids, 2), UC_OK);
    Uncomp__V1__TokenizeResponse *tr = uncomp__v1__tokenize_response__unpack(NULL, m.len, m.data);
    assert_non_null(tr);
    assert_int_equal(tr->n_token_ids, 2);
    assert_string_equal(tr->tokens[1], uc_tokenizer_token_str(tok, 2));
    uncomp__v1__tokenize_response__free_unpacked(tr, NULL);
    uc_free(m.data);
    struct uc_compress_params cp = uc_compress_default_params();
    cp.kv_budget = 77;
    assert_int_equal(uc_grpc_encode_set_policy(&m, &cp), UC_OK);
    Uncomp__V1__SetCompressionPolicyResponse *pr =
        uncomp__v1__set_compression_policy_response__unpack(NULL, m.len, m.data);
    assert_int_equal(pr->kv_budget, 77);
    uncomp__v1__set_compression_policy_response__free_unpacked(pr, NULL);
    uc_free(m.data);
    assert_int_equal(uc_grpc_encode_drain(&m, 3, 1), UC_OK);
    Uncomp__V1__DrainResponse *dres = uncomp__v1__drain_response__unpack(NULL, m.len, m.data);
    assert_true(dres->finished == 3 && dres->aborted == 1);
    uncomp__v1__drain_response__free_unpacked(dres, NULL);
    uc_free(m.data);
    assert_int_equal(uc_grpc_encode_health(&m, UC_GRPC_HEALTH_NOT_SERVING), UC_OK);
    Grpc__Health__V1__HealthCheckResponse *hres =
        grpc__health__v1__health_check_response__unpack(NULL, m.len, m.data);
    assert_int_equal(hres->status, 2);
    grpc__health__v1__health_check_response__free_unpacked(hres, NULL);
    uc_free(m.data);
    assert_int_equal(uc_grpc_encode_abort(&m, true), UC_OK);
    Uncomp__V1__AbortResponse *ares = uncomp__v1__abort_response__unpack(NULL, m.len, m.data);
    assert_true(ares->found);
    uncomp__v1__abort_response__free_unpacked(ares, NULL);
    uc_free(m.data);
}

/* The fuzzer's seeds (tests/fuzz/corpus/fuzz_grpc_request, selector byte first) are valid
 * requests, so fuzzing starts from messages that get past validation. */
static void test_fuzz_seeds_are_valid(void **state)
{
    (void)state;
    static const char *const names[] = {
        "gen_text", "gen_ids", "tokenize", "detokenize", "abort", "server_info", "model_info",
        "stats", "profile", "set_policy", "calibrate", "drain", "health_check", "health_watch",
        "chat", "http_completions", "http_chat"};
    struct uc_req_ctx c = ctx();
    struct uc_oai_ctx oc = {.req = c, .model_name = "uncomp-tiny"};
    bool seen[UC_GRPC_METHOD_COUNT + 2] = {false};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", UC_FUZZ_SEEDS, names[i]);
        char *data = NULL;
        size_t n = 0;
        if (uc_file_read_all(&data, &n, path) != UC_OK || n == 0) {
            fail_msg("cannot read %s", path);
        }
        int sel = (uint8_t)data[0];
        assert_true(sel < UC_GRPC_METHOD_COUNT + 2);
        seen[sel] = true;
        if (sel < UC_GRPC_METHOD_COUNT) {
            int code = uc_grpc_request_check(sel, (const uint8_t *)data + 1, n - 1, &c);
            if (code != 0) {
                fail_msg("%s: gRPC status %d", names[i], code);
            }
        } else {
            struct uc_oai_request r;
            char msg[512], param[64];
            int st;
            uc_status rc = uc_oai_parse(&r, sel == UC_GRPC_METHOD_COUNT ? UC_OAI_COMPLETION
                                                                          : UC_OAI_CHAT,
                                        data + 1, n - 1, &oc, &st, msg, sizeof msg, param,
                                        sizeof param);
            if (rc != UC_OK) {
                fail_msg("%s: %s (%s)", names[i], msg, param);
            }
            uc_oai_request_fini(&r);
        }
        uc_free(data);
    }
    for (int m = 0; m < UC_GRPC_METHOD_COUNT + 2; m++) {
        assert_true(seen[m]); /* a seed for every method and body */
    }
}

int main(int argc, char **argv)
{
    tok = tu_tokenizer(tu_shared_dir(argc, argv), "uncomp-tiny");
    char msg[256];
    if (uc_chat_template_create(&chat, "{% for m in messages %}<|im_start|>{{ m.role }}\n"
                                "{{ m.content }}<|im_end|>\n{% endfor %}"
                                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                                "", "", msg, sizeof msg) != UC_OK) {
        fprintf(stderr, "template: %s\n", msg);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_req_same_request_both_fronts),
        cmocka_unit_test(test_req_minicache_both_fronts),
        cmocka_unit_test(test_req_same_errors_both_fronts),
        cmocka_unit_test(test_req_policy_stage_both_fronts),
        cmocka_unit_test(test_req_prompt_errors_both_fronts),
        cmocka_unit_test(test_grpc_every_message),
        cmocka_unit_test(test_http_bodies),
        cmocka_unit_test(test_grpc_encode_responses),
        cmocka_unit_test(test_fuzz_seeds_are_valid),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    uc_chat_template_destroy(chat);
    uc_tokenizer_destroy(tok);
    return rc;
}
