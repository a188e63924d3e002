/* Unit tests for daemon/openai_api.c (the OpenAI request model, no network) and daemon/auth.c:
 * every field maps onto the scheduler request; bad fields are 400 naming the field, an unknown
 * model is 404; n and seeds per choice; prompts as text, lists and token ids; chat goes through
 * the template; the response, chunk and error JSON have the OpenAI shape; API keys compare
 * exactly (length, content) and the admin key is separate. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "auth.h"
#include "base/mem.h"
#include "chat_template.h"
#include "openai_api.h"
#include "test_util.h"
#include "tokenizer.h"

static struct uc_tokenizer *tok;
static struct uc_chat_template *chat;

static struct uc_oai_ctx ctx(void)
{
    struct uc_oai_ctx c = {.req = {.tok = tok, .chat = chat, .vocab = 1000000, .n_layers = 8,
                                   .defaults = uc_compress_default_params()},
                           .model_name = "tiny"};
    return c;
}

static uc_status parse(struct uc_oai_request *r, enum uc_oai_kind k, const char *body, int *status,
                       char *msg, char *param)
{
    struct uc_oai_ctx c = ctx();
    return uc_oai_parse(r, k, body, strlen(body), &c, status, msg, 256, param, 64);
}

static void test_oai_parse_fields(void **state)
{
    (void)state;
    struct uc_oai_request r;
    char msg[256], param[64];
    int st;
    assert_int_equal(parse(&r, UC_OAI_COMPLETION,
                           "{\"model\":\"tiny\",\"prompt\":\"Hello there\",\"max_tokens\":7,"
                           "\"temperature\":0.5,\"top_p\":0.9,\"top_k\":40,\"min_p\":0.1,"
                           "\"seed\":11,\"stop\":[\"a\",\"bc\"],\"presence_penalty\":0.5,"
                           "\"frequency_penalty\":-0.5,\"repetition_penalty\":1.1,\"n\":3,"
                           "\"logprobs\":2,\"ignore_eos\":true,\"min_tokens\":2,\"user\":\"u\","
                           "\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                           "\"uncomp\":{\"policy\":\"snapkv\",\"kv_budget\":64}}",
                           &st, msg, param), UC_OK);
    assert_int_equal(r.gen.base.max_tokens, 7);
    assert_true(r.gen.base.sampling.temperature == 0.5f);
    assert_true(r.gen.base.sampling.top_p == 0.9f);
    assert_int_equal(r.gen.base.sampling.top_k, 40);
    assert_true(r.gen.base.sampling.has_seed);
    assert_int_equal(r.gen.base.n_stop, 2);
    assert_string_equal(r.gen.base.stop[1], "bc");
    assert_int_equal(r.gen.n, 3);
    assert_int_equal(r.gen.base.logprobs, 2);
    assert_true(r.gen.base.ignore_eos);
    assert_int_equal(r.gen.base.min_tokens, 2);
    assert_true(r.stream && r.include_usage);
    assert_true(r.gen.base.has_compress);
    assert_int_equal(r.gen.base.compress.policy, UC_POLICY_SNAPKV);
    assert_int_equal(r.gen.base.compress.kv_budget, 64);
    assert_int_equal(r.gen.n_inputs, 1);
    uc_oai_request_fini(&r);
    /* LoRC's ratio through the uncomp object */
    assert_int_equal(parse(&r, UC_OAI_COMPLETION,
                           "{\"prompt\":\"Hello\",\"uncomp\":{\"policy\":\"uncomp+lorc\","
                           "\"lorc_ratio\":0.25}}",
                           &st, msg, param), UC_OK);
    assert_true(r.gen.base.compress.stages == UC_STAGE_LORC);
    assert_true(r.gen.base.compress.lorc_ratio == 0.25f);
    uc_oai_request_fini(&r);
    assert_int_equal(parse(&r, UC_OAI_COMPLETION,
                           "{\"model\":\"tiny\",\"prompt\":\"Hello there\",\"max_tokens\":7,"
                           "\"temperature\":0.5,\"top_p\":0.9,\"top_k\":40,\"min_p\":0.1,"
                           "\"seed\":11,\"stop\":[\"a\",\"bc\"],\"presence_penalty\":0.5,"
                           "\"frequency_penalty\":-0.5,\"repetition_penalty\":1.1,\"n\":3,"
                           "\"logprobs\":2,\"ignore_eos\":true,\"min_tokens\":2,\"user\":\"u\","
                           "\"stream\":true,\"stream_options\":{\"include_usage\":true},"
                           "\"uncomp\":{\"policy\":\"snapkv\",\"kv_budget\":64}}",
                           &st, msg, param), UC_OK);
    assert_true(r.gen.n_tokens[0] > 1);
    /* choice i: the same prompt, seed + i */
    struct uc_request c2;
    uc_req_choice(&r.gen, 2, 1, &c2);
    assert_ptr_equal(c2.prompt, r.gen.tokens[0]);
    assert_int_equal(c2.sampling.seed, 13);
    uc_oai_request_fini(&r);
    uc_oai_request_fini(&r); /* twice is fine */

    /* a list of prompts and token ids; max_completion_tokens wins */
    assert_int_equal(parse(&r, UC_OAI_COMPLETION, "{\"prompt\":[\"a b\",[5,6,7]],\"n\":2,"
                           "\"max_tokens\":3,\"max_completion_tokens\":9}", &st, msg, param),
                     UC_OK);
    assert_int_equal(r.gen.n_inputs, 2);
    assert_int_equal(r.gen.n_tokens[1], 3);
    assert_int_equal(r.gen.base.max_tokens, 9);
    uc_req_choice(&r.gen, 3, 1, &c2);
    assert_ptr_equal(c2.prompt, r.gen.tokens[1]);
    uc_oai_request_fini(&r);
    assert_int_equal(parse(&r, UC_OAI_COMPLETION, "{\"prompt\":[1,2]}", &st, msg, param), UC_OK);
    assert_int_equal(r.gen.n_inputs, 1);
    assert_int_equal(r.gen.n_tokens[0], 2);
    uc_oai_request_fini(&r);
}

static void test_oai_parse_errors_name_the_field(void **state)
{
    (void)state;
    static const struct {
        const char *body, *param, *needle;
        int status;
    } cases[] = {
        {"{\"model\":\"gpt-4\",\"prompt\":\"x\"}", "model", "gpt-4", 404},
        {"{\"prompt\":\"x\",\"temperature\":-1}", "temperature", "temperature=-1", 400},
        {"{\"prompt\":\"x\",\"top_p\":0}", "top_p", "top_p", 400},
        {"{\"prompt\":\"x\",\"n\":0}", "n", "n=0", 400},
        {"{\"prompt\":\"x\",\"n\":1.5}", "n", "integer", 400},
        {"{\"prompt\":\"x\",\"max_tokens\":\"9\"}", "max_tokens", "integer", 400},
        {"{\"prompt\":\"x\",\"stop\":[\"\"]}", "stop", "stop[0] is empty", 400},
        {"{\"prompt\":\"x\",\"stop\":5}", "stop", "string or a list", 400},
        {"{\"prompt\":\"\"}", "prompt", "empty", 400},
        {"{}", "prompt", "missing", 400},
        {"{\"prompt\":[1,-2]}", "prompt", "prompt[1]=-2 is out of range", 400},
        {"{\"prompt\":[1,2.5]}", "prompt", "prompt[1] must be an integer", 400},
        {"{\"prompt\":\"x\",\"logprobs\":true}", "logprobs", "integer", 400},
        {"{\"prompt\":\"x\",\"logprobs\":21}", "logprobs", "logprobs=21", 400},
        {"{\"prompt\":\"x\",\"best_of\":3}", "best_of", "best_of", 400},
        {"{\"prompt\":\"x\",\"suffix\":\"y\"}", "suffix", "not supported", 400},
        {"{\"prompt\":\"x\",\"logit_bias\":{\"5\":1}}", "logit_bias", "not supported", 400},
        {"{\"prompt\":\"x\",\"uncomp\":{\"policy\":\"zip\"}}", "uncomp.policy", "zip", 400},
        {"{\"prompt\":\"x\",\"uncomp\":{\"budget\":3}}", "uncomp", "uncomp.budget", 400},
        {"{\"prompt\":\"x\",\"uncomp\":{\"policy\":\"snapkv\",\"lorc_ratio\":0.5}}",
         "uncomp.lorc_ratio", "needs a policy with +lorc", 400},
        {"{\"prompt\":\"x\",\"uncomp\":{\"policy\":\"snapkv+lorc\",\"lorc_ratio\":1.5}}",
         "uncomp.lorc_ratio", "lorc_ratio=1.5", 400},
        {"{\"prompt\":\"x\",\"min_tokens\":5,\"max_tokens\":2}", "min_tokens", "<=", 400},
        {"[1]", "", "JSON object", 400},
        {"{\"prompt\":", "", "not valid JSON", 400},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct uc_oai_request r;
        char msg[256] = "", param[64] = "";
        int st = 0;
        uc_status rc = parse(&r, UC_OAI_COMPLETION, cases[i].body, &st, msg, param);
        if (rc != UC_ERR_INVALID_ARG || st != cases[i].status ||
            strcmp(param, cases[i].param) != 0 || !strstr(msg, cases[i].needle)) {
            fail_msg("%s: rc=%d status=%d param=%s msg=%s", cases[i].body, rc, st, param, msg);
        }
        assert_int_equal(r.gen.n_inputs, 0);
    }
}

static void test_oai_chat_renders_template(void **state)
{
    (void)state;
    struct uc_oai_request r;
    char msg[256], param[64];
    int st;
    assert_int_equal(parse(&r, UC_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":"
                           "\"Hi\"}],\"logprobs\":true,\"top_logprobs\":3}", &st, msg, param),
                     UC_OK);
    assert_string_equal(r.gen.rendered, "<|user|>Hi\n<|assistant|>");
    assert_int_equal(r.gen.base.logprobs, 3);
    uc_oai_request_fini(&r);
    assert_int_equal(parse(&r, UC_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":"
                           "\"Hi\"}],\"top_logprobs\":3}", &st, msg, param), UC_ERR_INVALID_ARG);
    assert_string_equal(param, "top_logprobs");
    assert_int_equal(parse(&r, UC_OAI_CHAT, "{\"messages\":[]}", &st, msg, param),
                     UC_ERR_INVALID_ARG);
    assert_string_equal(param, "messages");
    /* a template's raise_exception is a 400 with its message */
    assert_int_equal(parse(&r, UC_OAI_CHAT, "{\"messages\":[{\"role\":\"system\",\"content\":"
                           "\"s\"}]}", &st, msg, param), UC_ERR_INVALID_ARG);
    assert_non_null(strstr(msg, "system messages are not allowed"));
    /* no template: chat is refused with advice */
    struct uc_chat_template *saved = chat;
    chat = NULL;
    uc_status rc = parse(&r, UC_OAI_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":"
                         "\"Hi\"}]}", &st, msg, param);
    assert_int_equal(uc_oai_http_status(rc), 400);
    assert_non_null(strstr(msg, "--chat-template"));
    assert_string_equal(param, "messages");
    chat = saved;
}

static void test_oai_response_shapes(void **state)
{
    (void)state;
    struct uc_oai_request r;
    char msg[256], param[64];
    int st;
    assert_int_equal(parse(&r, UC_OAI_COMPLETION, "{\"prompt\":[1,2,3],\"n\":2}", &st, msg,
                           param), UC_OK);
    struct uc_oai_choice ch[2];
    for (int i = 0; i < 2; i++) {
        uc_oai_choice_init(&ch[i], i);
        uc_buf_puts(&ch[i].text, i ? "b" : "a\"");
        ch[i].finish = i ? UC_FINISH_STOP : UC_FINISH_LENGTH;
        ch[i].prompt_tokens = 3;
        ch[i].completion_tokens = 4 + i;
    }
    char *s = uc_oai_response_json(&r, "cmpl-1", 5, "tiny", ch, 2);
    assert_string_equal(s, "{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,"
                           "\"model\":\"tiny\",\"choices\":[{\"index\":0,\"text\":\"a\\\"\","
                           "\"logprobs\":null,\"finish_reason\":\"length\"},{\"index\":1,"
                           "\"text\":\"b\",\"logprobs\":null,\"finish_reason\":\"stop\"}],"
                           "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":9,"
                           "\"total_tokens\":12}}");
    uc_free(s);
    s = uc_oai_chunk_sse(&r, "cmpl-1", 5, "tiny", 1, false, "xy", 2, NULL, UC_FINISH_NONE, NULL,
                         0, NULL);
    assert_string_equal(s, "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":5,"
                           "\"model\":\"tiny\",\"choices\":[{\"index\":1,\"text\":\"xy\","
                           "\"logprobs\":null,\"finish_reason\":null}]}\n\n");
    uc_free(s);
    for (int i = 0; i < 2; i++) {
        uc_oai_choice_fini(&ch[i]);
    }
    uc_oai_request_fini(&r);
    s = uc_oai_error_json(429, "queue full", NULL);
    assert_string_equal(s, "{\"error\":{\"message\":\"queue full\",\"type\":\"rate_limit_error\","
                           "\"param\":null,\"code\":\"server_busy\"}}");
    uc_free(s);
    assert_int_equal(uc_oai_http_status(UC_ERR_KV_FULL), 429);
    assert_int_equal(uc_oai_http_status(UC_ERR_UNAVAILABLE), 503);
    assert_int_equal(uc_oai_http_status(UC_ERR_INVALID_ARG), 400);
}

static void test_auth_keys(void **state)
{
    (void)state;
    char msg[256];
    struct uc_auth *a = NULL;
    assert_int_equal(uc_auth_create(&a, NULL, NULL, NULL, msg, sizeof msg), UC_OK);
    assert_false(uc_auth_enabled(a));
    assert_true(uc_auth_check(a, NULL, 0));
    uc_auth_destroy(a);
    assert_int_equal(uc_auth_create(&a, "short", NULL, NULL, msg, sizeof msg), UC_ERR_INVALID_ARG);
    assert_null(a);
    assert_int_equal(uc_auth_create(&a, "user-key-1234", NULL, "admin-key-5678", msg, sizeof msg),
                     UC_OK);
    assert_true(uc_auth_enabled(a));
    assert_true(uc_auth_check(a, "user-key-1234", 13));
    assert_false(uc_auth_check(a, "user-key-123", 12));   /* a prefix */
    assert_false(uc_auth_check(a, "user-key-12345", 14)); /* longer */
    assert_false(uc_auth_check(a, "user-key-1235", 13));
    assert_false(uc_auth_check(a, NULL, 0));
    assert_true(uc_auth_check(a, "admin-key-5678", 14));  /* the admin key works everywhere */
    assert_false(uc_auth_check_admin(a, "user-key-1234", 13));
    assert_true(uc_auth_check_admin(a, "admin-key-5678", 14));
    uc_auth_destroy(a);
    const char *k;
    size_t n;
    assert_true(uc_auth_bearer("Bearer  abc ", 12, &k, &n));
    assert_int_equal(n, 3);
    assert_memory_equal(k, "abc", 3);
    assert_true(uc_auth_bearer("bearer xyz", 10, &k, &n));
    assert_false(uc_auth_bearer("Basic xyz", 9, &k, &n));
    assert_false(uc_auth_bearer("Bearer ", 7, &k, &n));
}

int main(int argc, char **argv)
{
    tok = tu_tokenizer(tu_shared_dir(argc, argv), "uncomp-tiny");
    char msg[256];
    if (uc_chat_template_create(&chat, "{% for m in messages %}{% if m.role == 'system' %}"
                                "{{ raise_exception('system messages are not allowed') }}"
                                "{% endif %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                                "{% if add_generation_prompt %}<|assistant|>{% endif %}",
                                "", "", msg, sizeof msg) != UC_OK) {
        fprintf(stderr, "template: %s\n", msg);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oai_parse_fields),
        cmocka_unit_test(test_oai_parse_errors_name_the_field),
        cmocka_unit_test(test_oai_chat_renders_template),
        cmocka_unit_test(test_oai_response_shapes),
        cmocka_unit_test(test_auth_keys),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    uc_chat_template_destroy(chat);
    uc_tokenizer_destroy(tok);
    return rc;
}
