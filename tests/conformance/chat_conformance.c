/* Chat-template conformance: renders every case of chat_reference.mjs (real templates and
 * conversations, the expected text from @huggingface/jinja) through daemon/chat_template.c and
 * compares byte for byte; a case where the reference raised must fail here with the same
 * message. Prints the first differences; exits 1 on any mismatch.
 * Usage: chat_conformance CASES.json */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "base/mem.h"
#include "base/util.h"
#include "chat_template.h"

static void show_diff(const char *got, const char *want)
{
    size_t i = 0;
    while (got[i] && got[i] == want[i]) {
        i++;
    }
    size_t from = i > 40 ? i - 40 : 0;
    fprintf(stderr, "    first difference at byte %zu\n    got:  %.120s\n    want: %.120s\n", i,
            got + from, want + from);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASES.json\n", argv[0]);
        return 2;
    }
    char *text = NULL;
    size_t n = 0;
    if (uc_file_read_all(&text, &n, argv[1]) != UC_OK) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 1;
    }
    cJSON *cases = cJSON_Parse(text);
    uc_free(text);
    if (!cJSON_IsArray(cases)) {
        fprintf(stderr, "%s is not a JSON array\n", argv[1]);
        return 1;
    }
    int total = 0, bad = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const char *name = cJSON_GetObjectItem(c, "name")->valuestring;
        const char *tmpl = cJSON_GetObjectItem(c, "template")->valuestring;
        const cJSON *expected = cJSON_GetObjectItem(c, "expected");
        const cJSON *error = cJSON_GetObjectItem(c, "error");
        char msg[512];
        struct uc_chat_template *ct = NULL;
        total++;
        uc_status rc = uc_chat_template_create(&ct, tmpl,
                                               cJSON_GetObjectItem(c, "bos")->valuestring,
                                               cJSON_GetObjectItem(c, "eos")->valuestring, msg,
                                               sizeof msg);
        if (rc != UC_OK) {
            fprintf(stderr, "FAIL %s: the template does not load: %s\n", name, msg);
            bad++;
            continue;
        }
        char *out = NULL;
        size_t len = 0;
        rc = uc_chat_template_render(ct, cJSON_GetObjectItem(c, "messages"),
                                     cJSON_IsTrue(cJSON_GetObjectItem(c, "add_generation_prompt")),
                                     NULL, &out, &len, msg, sizeof msg);
        if (cJSON_IsString(error)) {
            if (rc != UC_ERR_INVALID_ARG || !strstr(error->valuestring, msg)) {
                fprintf(stderr, "FAIL %s: the reference raised \"%s\"; we got rc=%s \"%s\"\n",
                        name, error->valuestring, uc_status_str(rc), rc ? msg : out);
                bad++;
            }
        } else if (rc != UC_OK) {
            fprintf(stderr, "FAIL %s: render failed: %s\n", name, msg);
            bad++;
        } else if (strcmp(out, expected->valuestring) != 0 ||
                   len != strlen(expected->valuestring)) {
            fprintf(stderr, "FAIL %s: the render differs\n", name);
            show_diff(out, expected->valuestring);
            bad++;
        }
        uc_free(out);
        uc_chat_template_destroy(ct);
    }
    cJSON_Delete(cases);
    printf("chat templates: %d/%d cases equal the @huggingface/jinja renders\n", total - bad,
           total);
    return bad ? 1 : 0;
}
