/* Unit tests for daemon/jinja.c and daemon/chat_template.c: each construct the chat templates use
 * renders what Jinja (as @huggingface/jinja and transformers run it) renders; whitespace control,
 * trim_blocks and lstrip_blocks; loop variables, namespace, macros, slices, filters and tests;
 * unsupported constructs fail at parse time naming the construct; raise_exception and runaway
 * templates fail at render time with a message; messages validation names the field. The
 * golden renders of real templates are in tests/conformance (conformance_chat_template). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/mem.h"
#include "chat_template.h"
#include "jinja.h"

/* renders src with vars (JSON text) and compares with want */
static void check(const char *src, const char *vars, const char *want)
{
    char msg[256];
    struct uc_jinja *t = NULL;
    uc_status rc = uc_jinja_create(&t, src, strlen(src), msg, sizeof msg);
    if (rc != UC_OK) {
        fail_msg("parse failed: %s\n  template: %s", msg, src);
    }
    cJSON *v = cJSON_Parse(vars ? vars : "{}");
    assert_non_null(v);
    char *out = NULL;
    size_t n = 0;
    rc = uc_jinja_render(t, v, &out, &n, msg, sizeof msg);
    if (rc != UC_OK) {
        fail_msg("render failed: %s\n  template: %s", msg, src);
    }
    if (strcmp(out, want) != 0) {
        fail_msg("template: %s\n  got:  [%s]\n  want: [%s]", src, out, want);
    }
    assert_int_equal(n, strlen(want));
    uc_free(out);
    cJSON_Delete(v);
    uc_jinja_destroy(t);
}

/* parse must fail with rc and a message containing needle */
static void check_parse_error(const char *src, uc_status want_rc, const char *needle)
{
    char msg[256];
    struct uc_jinja *t = (struct uc_jinja *)1;
    uc_status rc = uc_jinja_create(&t, src, strlen(src), msg, sizeof msg);
    assert_null(t);
    if (rc != want_rc || !strstr(msg, needle)) {
        fail_msg("template: %s\n  rc=%d msg=%s (want %d, '%s')", src, rc, msg, want_rc, needle);
    }
}

static void check_render_error(const char *src, const char *vars, const char *needle)
{
    char msg[256];
    struct uc_jinja *t = NULL;
    assert_int_equal(uc_jinja_create(&t, src, strlen(src), msg, sizeof msg), UC_OK);
    cJSON *v = cJSON_Parse(vars ? vars : "{}");
    char *out = (char *)1;
    size_t n = 0;
    uc_status rc = uc_jinja_render(t, v, &out, &n, msg, sizeof msg);
    assert_int_equal(rc, UC_ERR_INVALID_ARG);
    assert_null(out);
    if (!strstr(msg, needle)) {
        fail_msg("template: %s\n  msg=%s (want '%s')", src, msg, needle);
    }
    cJSON_Delete(v);
    uc_jinja_destroy(t);
}

static void test_jinja_text_and_output(void **state)
{
    (void)state;
    check("hello", NULL, "hello");
    check("", NULL, "");
    check("a{{ x }}b", "{\"x\": \"X\"}", "aXb");
    check("{{ 'it''s' }}|{{ \"q\\\"\\n\" }}", NULL, "its|q\"\n");
    check("{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 2 ** 3 }} {{ 1 / 2 }}", NULL,
          "7 3 -4 2 8 0.5");
    check("{{ 'a' ~ 1 ~ 2.5 }}", NULL, "a12.5");
    check("{{ none }}|{{ true }}|{{ undefined_name }}|{{ 1.0 }}", NULL, "|true||1.0");
    check("{{ [1, 'a'] }}|{{ {'k': none} }}", NULL, "[1, \"a\"]|{\"k\": null}");
    check("{# a comment #}x", NULL, "x");
    /* one trailing newline of the template is dropped */
    check("x\n", NULL, "x");
}

static void test_jinja_whitespace(void **state)
{
    (void)state;
    /* trim_blocks: the newline after a block tag goes; lstrip_blocks: indentation before it */
    check("{% if true %}\nyes\n{% endif %}\nafter", NULL, "yes\nafter");
    check("  {% if true %}x{% endif %}", NULL, "x");
    check("a  {% if true %}x{% endif %}", NULL, "a  x");
    /* expression tags keep their newline */
    check("{{ 'a' }}\nb", NULL, "a\nb");
    check("a   {{- 'b' -}}   c", NULL, "abc");
    check("a \n {%- if true -%} \n b {%- endif %}", NULL, "ab");
    check("x {#- c -#} y", NULL, "xy");
}

static void test_jinja_conditionals(void **state)
{
    (void)state;
    const char *t = "{% if n == 1 %}one{% elif n == 2 %}two{% elif n > 2 %}many{% else %}none"
                    "{% endif %}";
    check(t, "{\"n\": 1}", "one");
    check(t, "{\"n\": 2}", "two");
    check(t, "{\"n\": 9}", "many");
    check(t, "{\"n\": 0}", "none");
    check("{{ 'y' if a and not b or c else 'n' }}", "{\"a\": true, \"b\": false, \"c\": false}",
          "y");
    check("{{ 'y' if x }}|", "{\"x\": false}", "|");
    check("{% if 'ell' in 'hello' and 2 in [1, 2] and 'k' in {'k': 1} and 3 not in [1] %}ok"
          "{% endif %}", NULL, "ok");
    check("{% if (m['role'] == 'user') != (0 % 2 == 0) %}bad{% else %}ok{% endif %}",
          "{\"m\": {\"role\": \"user\"}}", "ok");
    check("{{ [] or 'empty' }}|{{ 'x' and 'y' }}", NULL, "empty|y");
}

static void test_jinja_loops(void **state)
{
    (void)state;
    check("{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}"
          "{{ loop.length }}{{ loop.revindex0 }},{% endfor %}", "{\"xs\": [\"a\", \"b\"]}",
          "10truefalse21,21falsetrue20,");
    check("{% for x in [] %}x{% else %}empty{% endfor %}", NULL, "empty");
    check("{% for x in [1, 2, 3, 4] if x is even %}{{ x }}{{ loop.length }}{% endfor %}", NULL,
          "2242");
    check("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}",
          "{\"d\": {\"b\": 1, \"a\": 2}}", "b=1;a=2;");
    check("{% for k in d %}{{ k }}{% endfor %}", "{\"d\": {\"x\": 1, \"y\": 2}}", "xy");
    check("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}"
          "{% continue %}{% endif %}{{ i }}{% endfor %}", NULL, "02");
    check("{% for i in range(1, 7, 2) %}{{ i }}{% endfor %}", NULL, "135");
    /* a set inside a loop does not leak out; a namespace does */
    check("{% set y = 0 %}{% for x in [1, 2] %}{% set y = x %}{% endfor %}{{ y }}", NULL, "0");
    check("{% set ns = namespace(y=0, s='') %}{% for x in [1, 2] %}{% set ns.y = ns.y + x %}"
          "{% endfor %}{{ ns.y }}", NULL, "3");
    check("{% for m in msgs[::-1] %}{{ m }}{% endfor %}|{{ msgs[1:] }}|{{ msgs[-1] }}",
          "{\"msgs\": [1, 2, 3]}", "321|[2, 3]|3");
    check("{% for a in [[1, 2], [3]] %}{% for b in a %}{{ loop.index }}{% endfor %}"
          "{{ loop.index }}{% endfor %}", NULL, "12112");
}

static void test_jinja_filters_and_methods(void **state)
{
    (void)state;
    check("{{ '  a b  ' | trim }}|{{ 'AbC' | lower }}|{{ 'abc' | upper }}|{{ 'hello world' | "
          "title }}|{{ 'hi there' | capitalize }}", NULL, "a b|abc|ABC|Hello World|Hi there");
    check("{{ xs | length }} {{ 'héllo' | length }} {{ xs | first }} {{ xs | last }} "
          "{{ xs | join(', ') }} {{ xs | reverse | join }}", "{\"xs\": [\"a\", \"b\", \"c\"]}",
          "3 5 a c a, b, c cba");
    check("{{ x | default('d') }}|{{ '' | default('d', true) }}|{{ 'v' | default('d') }}", NULL,
          "d|d|v");
    check("{{ {'a': [1, 2], 'b': 'x\"'} | tojson }}", NULL, "{\"a\": [1, 2], \"b\": \"x\\\"\"}");
    check("{{ {'a': [1]} | tojson(indent=2) }}", NULL, "{\n  \"a\": [\n    1\n  ]\n}");
    check("{{ '  x\\n'.strip() }}|{{ 'xxaxx'.lstrip('x') }}|{{ 'xxaxx'.rstrip('x') }}|"
          "{{ 'a</think>b'.split('</think>')[-1] }}|{{ 'a b  c'.split() | length }}", NULL,
          "x|axx|xxa|b|3");
    check("{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith(('x', 'c')) }}{{ 'abc'.replace('b', "
          "'B') }}{{ 'a-b'.upper() }}", NULL, "truetrueaBcA-B");
    check("{{ [3, 1, 2] | sort | join }}|{{ [1, 1, 2] | unique | list | join }}|"
          "{{ [1, 2, 3] | sum }}|{{ [1, 5, 2] | max }}", NULL, "123|12|6|5");
    check("{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='c') | join }}|"
          "{{ ms | rejectattr('role', 'eq', 'user') | list | length }}",
          "{\"ms\": [{\"role\": \"user\", \"c\": \"a\"}, {\"role\": \"bot\", \"c\": \"b\"}, "
          "{\"role\": \"user\", \"c\": \"c\"}]}", "ac|1");
    check("{{ d.get('a') }}{{ d.get('z', 'none') }}{{ d.keys() | list | join }}",
          "{\"d\": {\"a\": 1, \"b\": 2}}", "1noneab");
    check("{% set l = [] %}{% set _ = l.append(1) %}{{ l }}", NULL, "[1]");
    check("{{ '3' | int + 1 }} {{ 2 | float }} {{ -3 | abs }} {{ 2.5 | string }}", NULL,
          "4 2.0 3 2.5");
    check("{{ 'a\\nb' | indent(2) }}|{{ 'a\\nb' | indent(2, true) }}", NULL, "a\n  b|  a\n  b");
}

static void test_jinja_tests(void **state)
{
    (void)state;
    check("{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ n is none }}"
          "{{ n is not none }}", "{\"x\": 1, \"n\": null}", "truefalsetruetruefalse");
    check("{{ 's' is string }}{{ 1 is number }}{{ {} is mapping }}{{ [] is iterable }}"
          "{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ false is false }}", NULL,
          "truetruetruetruetruetruetruetrue");
    check("{{ 1 is string }}{{ 'x' is mapping }}", NULL, "falsefalse");
}

static void test_jinja_set_and_macro(void **state)
{
    (void)state;
    check("{% set a = 'x' + 'y' %}{{ a }}", NULL, "xy");
    check("{% set b %}in {{ 1 }}{% endset %}[{{ b }}]", NULL, "[in 1]");
    check("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}"
          "{{ greet('A') }} {{ greet('B', punct='?') }}", NULL, "Hi A! Hi B?");
    check("{{ bos_token + m['content'] | trim + eos }}",
          "{\"bos_token\": \"<s>\", \"m\": {\"content\": \" hi \"}, \"eos\": \"</s>\"}",
          "<s>hi</s>");
}

static void test_jinja_unsupported_refused_at_parse(void **state)
{
    (void)state;
    check_parse_error("{% include 'x.j2' %}", UC_ERR_UNSUPPORTED, "unsupported statement 'include'");
    check_parse_error("{% extends 'base' %}", UC_ERR_UNSUPPORTED, "'extends'");
    check_parse_error("{{ x | wordwrap(3) }}", UC_ERR_UNSUPPORTED, "unsupported filter 'wordwrap'");
    check_parse_error("{{ x is sameas_not }}", UC_ERR_UNSUPPORTED, "unsupported test");
    check_parse_error("{{ x.zfill(3) }}", UC_ERR_UNSUPPORTED, "unsupported method 'zfill'");
    check_parse_error("line1\n{% if x %}", UC_ERR_FORMAT, "line 2: missing '{% endif %}'");
    check_parse_error("{{ 'abc }}", UC_ERR_FORMAT, "unterminated string");
    check_parse_error("{{ x + }}", UC_ERR_FORMAT, "unexpected '}}'");
    check_parse_error("{% endfor %}", UC_ERR_FORMAT, "unexpected '{% endfor %}'");
    check_parse_error("{{ x", UC_ERR_FORMAT, "unclosed");
}

static void test_jinja_render_errors(void **state)
{
    (void)state;
    check_render_error("{{ raise_exception('Roles must alternate') }}", NULL,
                       "Roles must alternate");
    check_render_error("{{ 'a' + 1 }}", NULL, "unsupported operand types for +");
    check_render_error("{{ x.y }}", "{\"x\": null}", "cannot read a member of none");
    check_render_error("{% set xs = range(2000) %}{% for i in xs %}{% for j in xs %}"
                       "{% endfor %}{% endfor %}", NULL, "too many steps");
    check_render_error("{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}"
                       "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", NULL, "MiB");
    check_render_error("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", NULL, "nest deeper");
    check_render_error("{{ 'x' * 100000000 }}", NULL, "too long");
}

static void test_chat_template_render(void **state)
{
    (void)state;
    char msg[256];
    struct uc_chat_template *ct = NULL;
    const char *src = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                      "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>"
                      "{% endif %}";
    assert_int_equal(uc_chat_template_create(&ct, src, "<s>", "</s>", msg, sizeof msg), UC_OK);
    cJSON *m = cJSON_Parse("[{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", "
                           "\"content\": [{\"type\": \"text\", \"text\": \"a\"}, {\"type\": "
                           "\"text\", \"text\": \"b\"}]}]");
    assert_int_equal(uc_chat_messages_validate(m, msg, sizeof msg), UC_OK);
    char *out = NULL;
    size_t n = 0;
    assert_int_equal(uc_chat_template_render(ct, m, true, NULL, &out, &n, msg, sizeof msg),
                     UC_OK);
    assert_string_equal(out, "<s><system>S</s><user>a\nb</s><assistant>");
    uc_free(out);
    assert_int_equal(uc_chat_template_render(ct, m, false, NULL, &out, &n, msg, sizeof msg),
                     UC_OK);
    assert_string_equal(out, "<s><system>S</s><user>a\nb</s>");
    uc_free(out);
    cJSON_Delete(m);
    uc_chat_template_destroy(ct);
    uc_chat_template_destroy(NULL);
}

static void test_chat_messages_validate_names_field(void **state)
{
    (void)state;
    static const struct {
        const char *json, *needle;
    } cases[] = {
        {"{}", "messages must be an array"},
        {"[]", "messages is empty"},
        {"[1]", "messages[0] must be an object"},
        {"[{\"content\": \"x\"}]", "messages[0].role is missing"},
        {"[{\"role\": \"wizard\", \"content\": \"x\"}]", "messages[0].role=\"wizard\""},
        {"[{\"role\": \"user\", \"content\": 5}]", "messages[0].content must be"},
        {"[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": "
         "[{\"type\": \"image_url\"}]}]", "messages[1].content[0].type"},
        {"[{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]",
         "messages[0].content[0].text"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char msg[256] = "";
        cJSON *m = cJSON_Parse(cases[i].json);
        assert_int_equal(uc_chat_messages_validate(m, msg, sizeof msg), UC_ERR_INVALID_ARG);
        if (!strstr(msg, cases[i].needle)) {
            fail_msg("%s: got '%s', want '%s'", cases[i].json, msg, cases[i].needle);
        }
        cJSON_Delete(m);
    }
    cJSON *ok = cJSON_Parse("[{\"role\": \"assistant\", \"content\": null}]");
    char msg[64];
    assert_int_equal(uc_chat_messages_validate(ok, msg, sizeof msg), UC_OK);
    cJSON_Delete(ok);
}

static void test_chat_template_load_from_model_dir(void **state)
{
    (void)state;
    char dir[] = "/tmp/uc_chat_tmpl_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256], msg[512];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("{\"bos_token\": {\"content\": \"<B>\"}, \"eos_token\": \"<E>\", \"chat_template\": "
          "[{\"name\": \"tool_use\", \"template\": \"T\"}, {\"name\": \"default\", "
          "\"template\": \"{{ bos_token }}{{ messages[0].content }}{{ eos_token }}\"}]}", f);
    fclose(f);
    struct uc_chat_template *ct = NULL;
    assert_int_equal(uc_chat_template_load(&ct, dir, NULL, msg, sizeof msg), UC_OK);
    assert_non_null(ct);
    cJSON *m = cJSON_Parse("[{\"role\": \"user\", \"content\": \"hi\"}]");
    char *out = NULL;
    size_t n;
    assert_int_equal(uc_chat_template_render(ct, m, true, NULL, &out, &n, msg, sizeof msg), UC_OK);
    assert_string_equal(out, "<B>hi<E>");
    uc_free(out);
    uc_chat_template_destroy(ct);
    /* chat_template.jinja beside it wins; an unsupported one is refused naming file and filter */
    char jpath[256];
    snprintf(jpath, sizeof jpath, "%s/chat_template.jinja", dir);
    f = fopen(jpath, "w");
    assert_non_null(f);
    fputs("{{ messages | wordwrap }}\n", f);
    fclose(f);
    ct = NULL;
    assert_int_equal(uc_chat_template_load(&ct, dir, NULL, msg, sizeof msg), UC_ERR_UNSUPPORTED);
    assert_null(ct);
    assert_non_null(strstr(msg, "chat_template.jinja"));
    assert_non_null(strstr(msg, "unsupported filter 'wordwrap'"));
    /* --chat-template FILE overrides both */
    char opath[256];
    snprintf(opath, sizeof opath, "%s/override.jinja", dir);
    f = fopen(opath, "w");
    fputs("[{{ messages[0].content }}]\n", f);
    fclose(f);
    assert_int_equal(uc_chat_template_load(&ct, dir, opath, msg, sizeof msg), UC_OK);
    assert_int_equal(uc_chat_template_render(ct, m, true, NULL, &out, &n, msg, sizeof msg), UC_OK);
    assert_string_equal(out, "[hi]");
    uc_free(out);
    uc_chat_template_destroy(ct);
    cJSON_Delete(m);
    remove(opath);
    remove(jpath);
    remove(path);
    /* no template at all: OK and NULL */
    assert_int_equal(uc_chat_template_load(&ct, dir, NULL, msg, sizeof msg), UC_OK);
    assert_null(ct);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_jinja_text_and_output),
        cmocka_unit_test(test_jinja_whitespace),
        cmocka_unit_test(test_jinja_conditionals),
        cmocka_unit_test(test_jinja_loops),
        cmocka_unit_test(test_jinja_filters_and_methods),
        cmocka_unit_test(test_jinja_tests),
        cmocka_unit_test(test_jinja_set_and_macro),
        cmocka_unit_test(test_jinja_unsupported_refused_at_parse),
        cmocka_unit_test(test_jinja_render_errors),
        cmocka_unit_test(test_chat_template_render),
        cmocka_unit_test(test_chat_messages_validate_names_field),
        cmocka_unit_test(test_chat_template_load_from_model_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
