/* Unit tests for shard/tokenizer/ on small tokenizers written here as JSON: both merge forms
 * and merge priority, byte fallback and unk fusing, SentencePiece-style (legacy Prepend/Replace
 * and Metaspace) and byte-level pipelines, the Llama-3 split regex, added tokens (longest match,
 * lstrip/rstrip, special vs not), templates, decoders, refusals (UC_ERR_UNSUPPORTED naming the
 * field, UC_ERR_FORMAT, UC_ERR_INVALID_ARG), and leaks, including under injected allocation
 * failures. JSON here uses ' for " (converted at run time); an apostrophe is \u0027. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"
#include "tokenizer.h"

#define SP "\xE2\x96\x81"  /* U+2581, the SentencePiece space */
#define GB "\xC4\xA0"      /* U+0120 'Ġ', GPT-2's byte 0x20 */
#define FFFD "\xEF\xBF\xBD" /* U+FFFD */

/* ---- log capture: the last error line, so refusals can be checked for the field name ---- */

static char last_error[2048];
static int n_errors;

static void capture_log(enum uc_log_level level, const char *line, void *user)
{
    (void)user;
    if (level == UC_LOG_LEVEL_ERROR) {
        snprintf(last_error, sizeof last_error, "%s", line);
        n_errors++;
    }
}

/* ---- JSON builders ---- */

/* Copies s with every ' turned into ". */
static const char *q(const char *s)
{
    static char buf[32768];
    size_t n = strlen(s);
    assert_true(n < sizeof buf);
    for (size_t i = 0; i <= n; i++) {
        buf[i] = s[i] == '\'' ? '"' : s[i];
    }
    return buf;
}

static const char *tok_json(const char *model, const char *added, const char *normalizer,
                            const char *pre, const char *post, const char *decoder)
{
    static char tmp[32768];
    int n = snprintf(tmp, sizeof tmp,
                     "{'version':'1.0','truncation':null,'padding':null,'added_tokens':%s,"
                     "'normalizer':%s,'pre_tokenizer':%s,'post_processor':%s,'decoder':%s,"
                     "'model':%s}",
                     added, normalizer, pre, post, decoder, model);
    assert_true(n > 0 && (size_t)n < sizeof tmp);
    return q(tmp);
}

static const char *bpe_model(const char *vocab, const char *merges, const char *extra)
{
    static char tmp[16384];
    int n = snprintf(tmp, sizeof tmp,
                     "{'type':'BPE','dropout':null,'continuing_subword_prefix':null,"
                     "'end_of_word_suffix':null,%s'vocab':%s,'merges':%s}",
                     extra, vocab, merges);
    assert_true(n > 0 && (size_t)n < sizeof tmp);
    return tmp;
}

static struct uc_tokenizer *make(const char *json)
{
    struct uc_tokenizer *tok = NULL;
    uc_status rc = uc_tokenizer_create_from_json(&tok, json, "test.json");
    if (rc != UC_OK) {
        fail_msg("create failed: %s (%s)", uc_status_str(rc), last_error);
    }
    assert_non_null(tok);
    return tok;
}

static uc_status try_make(const char *json)
{
    struct uc_tokenizer *tok = (struct uc_tokenizer *)0x1;
    uc_status rc = uc_tokenizer_create_from_json(&tok, json, "test.json");
    if (rc != UC_OK) {
        assert_null(tok); /* *out is NULL on failure */
    }
    uc_tokenizer_destroy(tok);
    return rc;
}

/* Encodes text and compares with the expected ids (n of them). */
static void expect_ids(const struct uc_tokenizer *tok, const char *text, bool add_special,
                       const int32_t *want, int64_t n)
{
    int32_t *ids = NULL;
    int64_t n_ids = -1;
    assert_int_equal(uc_tokenizer_encode(tok, text, strlen(text), add_special, &ids, &n_ids),
                     UC_OK);
    assert_non_null(ids);
    if (n_ids != n || (n > 0 && memcmp(ids, want, (size_t)n * sizeof *ids) != 0)) {
        char got[512] = "", exp[512] = "";
        for (int64_t i = 0; i < n_ids && i < 32; i++) {
            snprintf(got + strlen(got), sizeof got - strlen(got), " %d", ids[i]);
        }
        for (int64_t i = 0; i < n && i < 32; i++) {
            snprintf(exp + strlen(exp), sizeof exp - strlen(exp), " %d", want[i]);
        }
        uc_free(ids);
        fail_msg("text \"%s\": want [%s ] got [%s ]", text, exp, got);
    }
    uc_free(ids);
}

#define EXPECT_IDS(tok, text, special, ...)                                                        \
    do {                                                                                           \
        static const int32_t want_[] = {__VA_ARGS__};                                              \
        expect_ids((tok), (text), (special), want_, (int64_t)(sizeof want_ / sizeof *want_));      \
    } while (0)

static void expect_empty(const struct uc_tokenizer *tok, const char *text)
{
    expect_ids(tok, text, false, NULL, 0);
}

static void expect_text(const struct uc_tokenizer *tok, const int32_t *ids, int64_t n,
                        bool skip_special, const char *want)
{
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(uc_tokenizer_decode(tok, ids, n, skip_special, &text, &len), UC_OK);
    assert_non_null(text);
    assert_string_equal(text, want);
    assert_int_equal(len, strlen(want));
    uc_free(text);
}

#define EXPECT_TEXT(tok, skip, want, ...)                                                          \
    do {                                                                                           \
        static const int32_t ids_[] = {__VA_ARGS__};                                               \
        expect_text((tok), ids_, (int64_t)(sizeof ids_ / sizeof *ids_), (skip), (want));           \
    } while (0)

static void expect_stream(const struct uc_tokenizer *tok, int32_t id, bool first, const char *want)
{
    char buf[64];
    size_t n = uc_tokenizer_token_bytes(tok, id, first, buf, sizeof buf);
    assert_int_equal(n, strlen(want));
    assert_memory_equal(buf, want, n);
}

/* ---- fixtures ---- */

/* SentencePiece style, laid out as Llama-2's tokenizer.json: legacy Prepend/Replace normalizer,
 * byte fallback, fused unk, BOS template, Replace/ByteFallback/Fuse/Strip decoders. */
static const char *sp_json(void)
{
    return tok_json(
        bpe_model("{'<unk>':0,'<s>':1,'</s>':2,'<0xC3>':3,'<0xA9>':4,'" SP "':5,'h':6,'i':7,"
                  "'" SP "h':8,'" SP "hi':9}",
                  "['" SP " h','" SP "h i']",
                  "'unk_token':'<unk>','fuse_unk':true,'byte_fallback':true,"
                  "'ignore_merges':false,"),
        "[{'id':0,'content':'<unk>','single_word':false,'lstrip':false,'rstrip':false,"
        "'normalized':false,'special':true},"
        "{'id':1,'content':'<s>','special':true},{'id':2,'content':'</s>','special':true}]",
        "{'type':'Sequence','normalizers':[{'type':'Prepend','prepend':'" SP "'},"
        "{'type':'Replace','pattern':{'String':' '},'content':'" SP "'}]}",
        "null",
        "{'type':'TemplateProcessing','single':[{'SpecialToken':{'id':'<s>','type_id':0}},"
        "{'Sequence':{'id':'A','type_id':0}}],'pair':[],"
        "'special_tokens':{'<s>':{'id':'<s>','ids':[1],'tokens':['<s>']}}}",
        "{'type':'Sequence','decoders':[{'type':'Replace','pattern':{'String':'" SP "'},"
        "'content':' '},{'type':'ByteFallback'},{'type':'Fuse'},"
        "{'type':'Strip','content':' ','start':1,'stop':0}]}");
}

/* Byte-level BPE with a configurable pre-tokenizer. Ids: h0 i1 Ġ2 hi3 Ġh4 Ġhi5 Ã6 ©7, digits
 * 1..5 = 8..12, 12:13 34:14 123:15 45:16; added <|eot|>17 (special), <|e18, [X]19 (lstrip,
 * rstrip), <|endoftext|>20 (special). */
static const char *bl_json(const char *pre)
{
    return tok_json(
        bpe_model("{'h':0,'i':1,'" GB "':2,'hi':3,'" GB "h':4,'" GB "hi':5,'\xC3\x83':6,"
                  "'\xC2\xA9':7,'1':8,'2':9,'3':10,'4':11,'5':12,'12':13,'34':14,'123':15,"
                  "'45':16}",
                  "['" GB " h','h i','" GB "h i','3 4','1 2','12 3','4 5']", ""),
        "[{'id':17,'content':'<|eot|>','special':true},{'id':18,'content':'<|e','special':false},"
        "{'id':19,'content':'[X]','special':false,'lstrip':true,'rstrip':true},"
        "{'id':20,'content':'<|endoftext|>','special':true}]",
        "null", pre, "{'type':'ByteLevel','add_prefix_space':true,'trim_offsets':false}",
        "{'type':'ByteLevel','add_prefix_space':true,'trim_offsets':true,'use_regex':true}");
}

#define GPT2_PRE                                                                                   \
    "{'type':'ByteLevel','add_prefix_space':false,'trim_offsets':true,'use_regex':true}"
#define LLAMA3_REGEX                                                                               \
    "(?i:\\u0027s|\\u0027t|\\u0027re|\\u0027ve|\\u0027m|\\u0027ll|\\u0027d)|"                      \
    "[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}|"                                       \
    " ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|"                                                    \
    "\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"
#define LLAMA3_PRE                                                                                 \
    "{'type':'Sequence','pretokenizers':[{'type':'Split','pattern':{'Regex':'" LLAMA3_REGEX "'},"  \
    "'behavior':'Isolated','invert':false},{'type':'ByteLevel','add_prefix_space':false,"          \
    "'trim_offsets':true,'use_regex':false}]}"

/* A plain character-level model over a, b, c with the given merges and options. */
static const char *abc_json(const char *merges, const char *normalizer, const char *decoder)
{
    return tok_json(bpe_model("{'a':0,'b':1,'c':2,'ab':3,'abc':4,'bc':5,'_':6}", merges, ""),
                    "[]", normalizer, "null", "null", decoder);
}

/* ---- tests ---- */

static void test_merges_both_forms(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *s = make(abc_json("['a b','ab c']", "null", "null"));
    struct uc_tokenizer *a = make(abc_json("[['a','b'],['ab','c']]", "null", "null"));
    EXPECT_IDS(s, "abcab", false, 4, 3);
    EXPECT_IDS(a, "abcab", false, 4, 3);
    EXPECT_IDS(a, "cba", false, 2, 1, 0);
    /* no decoder: tokens are joined with spaces, as the reference does */
    EXPECT_TEXT(a, false, "abc ab", 4, 3);
    assert_string_equal(uc_tokenizer_kind(a), "bpe-sentencepiece");
    assert_int_equal(uc_tokenizer_bos(a), -1);
    assert_int_equal(uc_tokenizer_eos(a), -1);
    uc_tokenizer_destroy(s);
    uc_tokenizer_destroy(a);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_merge_rank_order(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    /* (b,c) outranks (a,b): abcab -> a bc ab */
    struct uc_tokenizer *t = make(abc_json("['b c','a b']", "null", "null"));
    EXPECT_IDS(t, "abcab", false, 0, 5, 3);
    /* equal ranks merge left to right */
    EXPECT_IDS(t, "abab", false, 3, 3);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_sentencepiece_encode(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(sp_json());
    EXPECT_IDS(t, "hi \xC3\xA9", false, 9, 5, 3, 4); /* é has no token: <0xC3><0xA9> */
    EXPECT_IDS(t, "hi", true, 1, 9);                  /* the template adds BOS */
    /* the Prepend normalizer always prepends, so a leading space gives "▁▁hi" = ▁ + ▁hi, as the
     * tokenizers library encodes Llama-2's tokenizer.json (it used to drop the space) */
    EXPECT_IDS(t, " hi", false, 5, 9);
    EXPECT_IDS(t, " ", false, 5, 5);
    EXPECT_IDS(t, "<s> hi", false, 1, 5, 9); /* after a special token too */
    EXPECT_IDS(t, "hi ", false, 9, 5);
    /* z has neither a token nor a byte token: unk, and fuse_unk merges the run */
    EXPECT_IDS(t, "hizz", false, 9, 0);
    /* added tokens are found in the raw text even without add_special */
    EXPECT_IDS(t, "<s>hi</s>", false, 1, 9, 2);
    EXPECT_IDS(t, "<s>", true, 1, 1);
    expect_empty(t, "");
    assert_int_equal(uc_tokenizer_bos(t), 1);
    assert_int_equal(uc_tokenizer_eos(t), 2);
    assert_int_equal(uc_tokenizer_vocab_size(t), 10);
    assert_string_equal(uc_tokenizer_kind(t), "bpe-sentencepiece");
    assert_string_equal(uc_tokenizer_token_str(t, 9), SP "hi");
    assert_string_equal(uc_tokenizer_token_str(t, 1), "<s>");
    assert_null(uc_tokenizer_token_str(t, 10));
    assert_null(uc_tokenizer_token_str(t, -1));
    assert_true(uc_tokenizer_is_special(t, 1));
    assert_false(uc_tokenizer_is_special(t, 9));
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_sentencepiece_decode(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(sp_json());
    EXPECT_TEXT(t, false, "hi \xC3\xA9", 9, 5, 3, 4);
    EXPECT_TEXT(t, false, "<s> hi</s>", 1, 9, 2);
    EXPECT_TEXT(t, true, "hi", 1, 9, 2); /* skip_special drops <s> and </s> */
    EXPECT_TEXT(t, false, FFFD, 3);      /* a lone lead byte */
    EXPECT_TEXT(t, false, FFFD FFFD "hi", 3, 3, 6, 7);
    EXPECT_TEXT(t, false, "", 5); /* "▁" -> " ", stripped */
    /* streamed bytes: the leading space is stripped only for the first token */
    expect_stream(t, 9, true, "hi");
    expect_stream(t, 9, false, " hi");
    expect_stream(t, 5, true, "");
    expect_stream(t, 3, false, "\xC3");
    expect_stream(t, 1, false, "<s>");
    assert_int_equal(uc_tokenizer_token_bytes(t, 99, false, NULL, 0), 0);
    /* the return value is the full size even when cap is smaller */
    char small[1];
    assert_int_equal(uc_tokenizer_token_bytes(t, 9, false, small, sizeof small), 3);
    assert_int_equal(small[0], ' ');
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_byte_level(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(bl_json(GPT2_PRE));
    EXPECT_IDS(t, "hi hi", false, 3, 5);
    EXPECT_IDS(t, " ", false, 2);
    EXPECT_IDS(t, "\xC3\xA9", false, 6, 7); /* é = bytes C3 A9 = chars Ã © */
    /* the GPT-2 regex keeps 12345 as one word: (3,4) merges first */
    EXPECT_IDS(t, "12345", false, 13, 14, 12);
    EXPECT_IDS(t, "hi", true, 3); /* no template: nothing added */
    EXPECT_TEXT(t, false, "hi hi", 3, 5);
    EXPECT_TEXT(t, false, "\xC3\xA9", 6, 7);
    EXPECT_TEXT(t, false, FFFD, 6);
    EXPECT_TEXT(t, false, FFFD " hi", 6, 5);
    expect_stream(t, 5, true, " hi"); /* byte-level keeps spaces */
    expect_stream(t, 6, false, "\xC3");
    assert_string_equal(uc_tokenizer_kind(t), "bpe-bytelevel");
    assert_int_equal(uc_tokenizer_bos(t), -1);
    assert_int_equal(uc_tokenizer_eos(t), 20); /* <|endoftext|> */
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_llama3_split(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(bl_json(LLAMA3_PRE));
    /* \p{N}{1,3} splits digits in threes before BPE: 123 | 45 */
    EXPECT_IDS(t, "12345", false, 15, 16);
    EXPECT_IDS(t, "hi hi", false, 3, 5);
    EXPECT_IDS(t, "hi  hi", false, 3, 2, 5);
    EXPECT_TEXT(t, false, "12345 hi", 15, 16, 5);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_added_tokens(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(bl_json(GPT2_PRE));
    EXPECT_IDS(t, "hi<|eot|> hi", false, 3, 17, 5);
    EXPECT_IDS(t, "hi<|e hi", false, 3, 18, 5); /* the longest match wins; a prefix still works */
    EXPECT_IDS(t, "<|eot|><|eot|>", false, 17, 17);
    /* [X] has lstrip and rstrip: it swallows the whitespace around it */
    EXPECT_IDS(t, "hi  [X]  hi", false, 3, 19, 3);
    EXPECT_TEXT(t, false, "hi<|eot|> hi", 3, 17, 5);
    EXPECT_TEXT(t, true, "hi hi", 3, 17, 5);      /* special: dropped */
    EXPECT_TEXT(t, true, "hi<|e hi", 3, 18, 5);   /* added but not special: kept */
    assert_true(uc_tokenizer_is_special(t, 17));
    assert_false(uc_tokenizer_is_special(t, 18));
    assert_false(uc_tokenizer_is_special(t, 3));
    assert_string_equal(uc_tokenizer_token_str(t, 19), "[X]");
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_metaspace_and_digits(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    const char *ms = "{'type':'Metaspace','replacement':'" SP "','prepend_scheme':'first',"
                     "'split':true}";
    struct uc_tokenizer *t = make(tok_json(
        bpe_model("{'<s>':0,'" SP "':1,'a':2,'b':3,'" SP "a':4,'" SP "b':5}",
                  "['" SP " a','" SP " b']", ""),
        "[{'id':0,'content':'<s>','special':true}]", "null", ms, "null", ms));
    EXPECT_IDS(t, "a b", false, 4, 5);
    EXPECT_IDS(t, "a  b", false, 4, 1, 5);
    /* prepend_scheme first: no "▁" for text that follows an added token */
    EXPECT_IDS(t, "<s>a b", false, 0, 2, 5);
    EXPECT_TEXT(t, false, "a b", 4, 5);
    EXPECT_TEXT(t, false, "a  b", 4, 1, 5);
    expect_stream(t, 4, true, "a");
    expect_stream(t, 4, false, " a");
    uc_tokenizer_destroy(t);

    const char *vocab = "{'1':0,'2':1,'12':2,'a':3}";
    t = make(tok_json(bpe_model(vocab, "['1 2']", ""), "[]", "null",
                      "{'type':'Digits','individual_digits':true}", "null", "null"));
    EXPECT_IDS(t, "a12", false, 3, 0, 1);
    uc_tokenizer_destroy(t);
    t = make(tok_json(bpe_model(vocab, "['1 2']", ""), "[]", "null",
                      "{'type':'Digits','individual_digits':false}", "null", "null"));
    EXPECT_IDS(t, "a12", false, 3, 2);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_normalizers(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(abc_json(
        "[]", "{'type':'Replace','pattern':{'Regex':' +'},'content':'_'}", "null"));
    EXPECT_IDS(t, "a  b c", false, 0, 6, 1, 6, 2);
    uc_tokenizer_destroy(t);

    t = make(abc_json("['a b']",
                      "{'type':'Sequence','normalizers':[{'type':'Strip','strip_left':true,"
                      "'strip_right':true},{'type':'Prepend','prepend':'_'}]}",
                      "null"));
    EXPECT_IDS(t, " \tab ", false, 6, 3);
    expect_empty(t, "   "); /* stripped to nothing: Prepend adds nothing to empty text */
    uc_tokenizer_destroy(t);

    /* NFC composes a decomposed é (it used to be refused as UC_ERR_UNSUPPORTED); a combining
     * mark with nothing to compose with stays as it is */
    const char *vocab = "{'\xC3\xA9':0,'e':1,'\xCC\x81':2,'i':3,'\xEF\xAC\x81':4,'f':5,"
                        "'E':6,'\xCC\x87':7,'I':8}";
    t = make(tok_json(bpe_model(vocab, "[]", ""), "[]", "{'type':'NFC'}", "null", "null", "null"));
    EXPECT_IDS(t, "\xC3\xA9" "e", false, 0, 1);
    EXPECT_IDS(t, "e\xCC\x81", false, 0);
    EXPECT_IDS(t, "\xCC\x81" "e", false, 2, 1);
    EXPECT_IDS(t, "\xEF\xAC\x81", false, 4); /* the ﬁ ligature is not canonical: kept */
    uc_tokenizer_destroy(t);
    /* NFD decomposes; NFKC also folds compatibility characters (ﬁ -> f i) */
    t = make(tok_json(bpe_model(vocab, "[]", ""), "[]", "{'type':'NFD'}", "null", "null", "null"));
    EXPECT_IDS(t, "\xC3\xA9", false, 1, 2);
    uc_tokenizer_destroy(t);
    t = make(tok_json(bpe_model(vocab, "[]", ""), "[]", "{'type':'NFKC'}", "null", "null", "null"));
    EXPECT_IDS(t, "\xEF\xAC\x81" "e\xCC\x81", false, 5, 3, 0);
    uc_tokenizer_destroy(t);
    t = make(tok_json(bpe_model(vocab, "[]", ""), "[]", "{'type':'NFKD'}", "null", "null", "null"));
    EXPECT_IDS(t, "\xEF\xAC\x81\xC3\xA9", false, 5, 3, 1, 2);
    uc_tokenizer_destroy(t);
    /* Lowercase: E -> e, and U+0130 (İ) -> i + U+0307, as Rust's to_lowercase */
    t = make(tok_json(bpe_model(vocab, "[]", ""), "[]", "{'type':'Lowercase'}", "null", "null",
                      "null"));
    EXPECT_IDS(t, "EI\xC4\xB0", false, 1, 3, 3, 7);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_ignore_merges(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    const char *vocab = "{'h':0,'e':1,'l':2,'o':3,'hello':4,'he':5}";
    struct uc_tokenizer *t = make(tok_json(bpe_model(vocab, "['h e']", "'ignore_merges':true,"),
                                           "[]", "null", "null", "null", "null"));
    EXPECT_IDS(t, "hello", false, 4);
    EXPECT_IDS(t, "helo", false, 5, 2, 3);
    uc_tokenizer_destroy(t);
    t = make(tok_json(bpe_model(vocab, "['h e']", "'ignore_merges':false,"), "[]", "null", "null",
                      "null", "null"));
    EXPECT_IDS(t, "hello", false, 5, 2, 2, 3);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void expect_refusal(const char *json, uc_status want, const char *field)
{
    last_error[0] = '\0';
    assert_int_equal(try_make(json), want);
    if (field && !strstr(last_error, field)) {
        fail_msg("error does not name %s: %s", field, last_error);
    }
}

static void test_unsupported(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    const char *m = bpe_model("{'a':0}", "[]", "");
    expect_refusal(tok_json("{'type':'WordPiece','unk_token':'[UNK]','vocab':{'a':0}}", "[]",
                            "null", "null", "null", "null"),
                   UC_ERR_UNSUPPORTED, "model.type");
    expect_refusal(tok_json("{'type':'Unigram','unk_id':0,'vocab':[['a',0.0]]}", "[]", "null",
                            "null", "null", "null"),
                   UC_ERR_UNSUPPORTED, "model.type");
    expect_refusal(tok_json("{'type':'BPE','dropout':0.1,'vocab':{'a':0},'merges':[]}", "[]",
                            "null", "null", "null", "null"),
                   UC_ERR_UNSUPPORTED, "model.dropout");
    expect_refusal(tok_json(m, "[]", "{'type':'BertNormalizer','clean_text':true}", "null",
                            "null", "null"),
                   UC_ERR_UNSUPPORTED, "normalizer.type value=BertNormalizer");
    expect_refusal(tok_json(m, "[]", "{'type':'Sequence','normalizers':[{'type':'NFC'},"
                            "{'type':'Precompiled','precompiled_charsmap':''}]}", "null", "null",
                            "null"),
                   UC_ERR_UNSUPPORTED, "normalizer.normalizers[1].type value=Precompiled");
    expect_refusal(tok_json(m, "[]", "null", "{'type':'BertPreTokenizer'}", "null", "null"),
                   UC_ERR_UNSUPPORTED, "pre_tokenizer.type value=BertPreTokenizer");
    expect_refusal(tok_json(m, "[]", "null", "{'type':'Sequence','pretokenizers':["
                            "{'type':'UnicodeScripts'}]}", "null", "null"),
                   UC_ERR_UNSUPPORTED, "pre_tokenizer.pretokenizers[0].type value=UnicodeScripts");
    expect_refusal(tok_json(m, "[]", "null", "null", "null",
                            "{'type':'WordPiece','prefix':'##','cleanup':true}"),
                   UC_ERR_UNSUPPORTED, "decoder.type value=WordPiece");
    expect_refusal(tok_json(m, "[]", "null", "null",
                            "{'type':'BertProcessing','sep':['[SEP]',1],'cls':['[CLS]',0]}",
                            "null"),
                   UC_ERR_UNSUPPORTED, "post_processor.type value=BertProcessing");
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_malformed(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    expect_refusal("{\"model\": {\"type\": \"BPE\", ", UC_ERR_FORMAT, "test.json");
    expect_refusal("[]", UC_ERR_FORMAT, NULL);
    expect_refusal("", UC_ERR_FORMAT, NULL);
    expect_refusal(q("{'model':{'type':'BPE','merges':[]}}"), UC_ERR_FORMAT, "model.vocab");
    expect_refusal(tok_json(bpe_model("{'a':0}", "['a x']", ""), "[]", "null", "null", "null",
                            "null"),
                   UC_ERR_FORMAT, "model.merges[0]");
    expect_refusal(tok_json(bpe_model("{'a':0,'b':1}", "['a b c']", ""), "[]", "null", "null",
                            "null", "null"),
                   UC_ERR_FORMAT, "model.merges[0]");
    expect_refusal(tok_json(bpe_model("{'a':-1}", "[]", ""), "[]", "null", "null", "null",
                            "null"),
                   UC_ERR_FORMAT, "model.vocab");
    expect_refusal(tok_json(bpe_model("{'a':0}", "[]", ""), "[]", "null",
                            "{'type':'Split','pattern':{'Regex':'(unclosed'},"
                            "'behavior':'Isolated'}", "null", "null"),
                   UC_ERR_FORMAT, "pre_tokenizer.pattern.Regex");
    expect_refusal(tok_json(bpe_model("{'a':0}", "[]", ""), "[]", "null", "null",
                            "{'type':'TemplateProcessing','single':[{'SpecialToken':"
                            "{'id':'<s>','type_id':0}},{'Sequence':{'id':'A','type_id':0}}],"
                            "'special_tokens':{}}", "null"),
                   UC_ERR_FORMAT, "special_tokens");
    /* a file that is not UTF-8 (serde_json refuses it): a Replace normalizer whose content is
     * the byte 0xFC once loaded and then made BPE read past the end of a word */
    expect_refusal(tok_json(bpe_model("{'a':0}", "[]", ""), "[]",
                            "{'type':'Replace','pattern':{'String':'a'},'content':'\xFC'}",
                            "null", "null", "null"),
                   UC_ERR_FORMAT, "not UTF-8 (byte ");
    struct uc_tokenizer *t = (struct uc_tokenizer *)0x1;
    assert_int_equal(uc_tokenizer_create(&t, "/nonexistent/dir"), UC_ERR_IO);
    assert_null(t);
    assert_int_equal(uc_tokenizer_create_from_json(&t, NULL, "x"), UC_ERR_INVALID_ARG);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_invalid_input(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(sp_json());
    static const char *const bad[] = {
        "\xC3(",         /* truncated sequence */
        "hi\xC3",        /* truncated at the end */
        "\xC0\xAF",      /* overlong */
        "\xED\xA0\x80",  /* surrogate */
        "\xF4\x90\x80\x80", /* beyond U+10FFFF */
        "\xFF",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        int32_t *ids = (int32_t *)0x1;
        int64_t n = 7;
        assert_int_equal(uc_tokenizer_encode(t, bad[i], strlen(bad[i]), false, &ids, &n),
                         UC_ERR_INVALID_ARG);
        assert_null(ids);
        assert_int_equal(n, 0);
    }
    int32_t *ids = NULL;
    int64_t n = 0;
    assert_int_equal(uc_tokenizer_encode(t, NULL, 3, false, &ids, &n), UC_ERR_INVALID_ARG);

    /* decode: ids outside [0, vocab) are refused */
    static const int32_t out_of_range[][2] = {{9, 10}, {-1, 9}, {1, 1 << 30}};
    for (size_t i = 0; i < 3; i++) {
        char *text = (char *)0x1;
        assert_int_equal(uc_tokenizer_decode(t, out_of_range[i], 2, false, &text, NULL),
                         UC_ERR_INVALID_ARG);
        assert_null(text);
    }
    char *text = NULL;
    assert_int_equal(uc_tokenizer_decode(t, NULL, 1, false, &text, NULL), UC_ERR_INVALID_ARG);
    expect_text(t, NULL, 0, false, "");
    uc_tokenizer_destroy(t);
    uc_tokenizer_destroy(NULL);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char *path = uc_path_join(dir, name);
    assert_non_null(path);
    assert_int_equal(uc_file_write_all(path, text, strlen(text)), UC_OK);
    uc_free(path);
}

static void remove_file(const char *dir, const char *name)
{
    char *path = uc_path_join(dir, name);
    assert_non_null(path);
    unlink(path);
    uc_free(path);
}

/* Loads dir and checks how "<s>hi" and "hi" encode and how "▁hi" decodes. */
static void expect_dir(const char *dir, const int32_t *after_bos, int64_t n_after_bos,
                       const int32_t *plain, int64_t n_plain, const char *decoded)
{
    struct uc_tokenizer *t = NULL;
    assert_int_equal(uc_tokenizer_create(&t, dir), UC_OK);
    expect_ids(t, "<s>hi", false, after_bos, n_after_bos);
    expect_ids(t, "hi", false, plain, n_plain);
    static const int32_t hi[] = {9};
    expect_text(t, hi, 1, false, decoded);
    expect_stream(t, 9, true, decoded);
    uc_tokenizer_destroy(t);
}

/* uc_tokenizer_create reads tokenizer.json as the tokenizers library does: tokenizer_config.json
 * (transformers' legacy / add_prefix_space) changes nothing (it used to switch Llama tokenizers
 * to a Metaspace pipeline that dropped leading spaces). */
static void test_tokenizer_config_ignored(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    char dir[] = "/tmp/uc_test_tokenizer_XXXXXX";
    assert_non_null(mkdtemp(dir));
    write_file(dir, "tokenizer.json", sp_json());
    static const int32_t after_bos[] = {1, 9}, plain[] = {9};
    expect_dir(dir, after_bos, 2, plain, 1, "hi");
    static const char *const configs[] = {
        "{'tokenizer_class':'LlamaTokenizerFast','legacy':false}",
        "{'tokenizer_class':'LlamaTokenizer','legacy':true,'add_prefix_space':false}",
        "{not json",
    };
    for (size_t i = 0; i < sizeof configs / sizeof *configs; i++) {
        write_file(dir, "tokenizer_config.json", q(configs[i]));
        expect_dir(dir, after_bos, 2, plain, 1, "hi");
    }
    remove_file(dir, "tokenizer_config.json");
    remove_file(dir, "tokenizer.json");
    assert_int_equal(rmdir(dir), 0);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Text is bytes with a length: a NUL byte is a character like any other (it used to end the
 * text wherever a caller took strlen; here, that it reaches the model as <0x00>). */
static void test_nul_bytes(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(tok_json(
        bpe_model("{'<unk>':0,'<0x00>':1,'a':2,'b':3,'" SP "a':4,'" SP "':5}", "['" SP " a']",
                  "'unk_token':'<unk>','byte_fallback':true,"),
        "[{'id':0,'content':'<unk>','special':true}]",
        "{'type':'Sequence','normalizers':[{'type':'Prepend','prepend':'" SP "'},"
        "{'type':'Replace','pattern':{'String':' '},'content':'" SP "'}]}",
        "null", "null",
        "{'type':'Sequence','decoders':[{'type':'Replace','pattern':{'String':'" SP "'},"
        "'content':' '},{'type':'ByteFallback'},{'type':'Fuse'},"
        "{'type':'Strip','content':' ','start':1,'stop':0}]}"));
    int32_t *ids = NULL;
    int64_t n = 0;
    assert_int_equal(uc_tokenizer_encode(t, "a\0b", 3, false, &ids, &n), UC_OK);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], 4);
    assert_int_equal(ids[1], 1);
    assert_int_equal(ids[2], 3);
    char *text = NULL;
    size_t len = 0;
    assert_int_equal(uc_tokenizer_decode(t, ids, n, false, &text, &len), UC_OK);
    assert_int_equal(len, 3);
    assert_memory_equal(text, "a\0b", 3);
    uc_free(text);
    uc_free(ids);
    /* the reason for refused input comes back to the caller */
    char why[128];
    assert_int_equal(uc_tokenizer_encode_msg(t, "a\xFF", 2, false, &ids, &n, why, sizeof why),
                     UC_ERR_INVALID_ARG);
    assert_non_null(strstr(why, "not valid UTF-8 at byte 1"));
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* A token id far beyond the number of entries is refused at load, before it sizes any table (an
 * id of 2147483646 used to ask malloc for 8 GB, 400000000 took 45 s and 12 GB). */
static void test_huge_id_refused(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    expect_refusal(q("{'model':{'type':'BPE','vocab':{'a':2147483646},'merges':[]}}"),
                   UC_ERR_FORMAT, "model.vocab[\"a\"] id=2147483646 is too large");
    expect_refusal(q("{'model':{'type':'BPE','vocab':{'a':0,'b':1},'merges':[]},"
                     "'added_tokens':[{'id':400000000,'content':'<x>','special':true}]}"),
                   UC_ERR_FORMAT, "added_tokens[0].id=400000000 is too large");
    /* a few holes are fine */
    struct uc_tokenizer *t = make(q("{'model':{'type':'BPE','vocab':{'a':0,'b':900},"
                                    "'merges':[]}}"));
    assert_int_equal(uc_tokenizer_vocab_size(t), 901);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* The library's added-token rules: a normalized token is matched in normalized text; a
 * single_word match touching a word character is dropped and the scan continues after it; a
 * token the vocabulary holds takes the vocabulary's id; BPE continuing-subword prefixes. */
/* GetModelInfo reports the EOS the tokenizer really adds: the id its template appends after
 * the text (uc_tokenizer_eos_added), which may differ from the EOS found by name. */
static void test_template_eos(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    /* Llama-style: BOS only, nothing appended */
    struct uc_tokenizer *t = make(sp_json());
    assert_int_equal(uc_tokenizer_eos_added(t), -1);
    assert_int_equal(uc_tokenizer_eos(t), 2);
    uc_tokenizer_destroy(t);
    /* <s> $A </s> */
    t = make(tok_json(
        bpe_model("{'<unk>':0,'<s>':1,'</s>':2,'h':3,'i':4,'hi':5}", "['h i']", ""),
        "[{'id':1,'content':'<s>','special':true},{'id':2,'content':'</s>','special':true}]",
        "null", "null",
        "{'type':'TemplateProcessing','single':[{'SpecialToken':{'id':'<s>','type_id':0}},"
        "{'Sequence':{'id':'A','type_id':0}},{'SpecialToken':{'id':'</s>','type_id':0}}],"
        "'pair':[],'special_tokens':{'<s>':{'id':'<s>','ids':[1],'tokens':['<s>']},"
        "'</s>':{'id':'</s>','ids':[2],'tokens':['</s>']}}}",
        "null"));
    EXPECT_IDS(t, "hi", true, 1, 5, 2);
    assert_int_equal(uc_tokenizer_bos(t), 1);
    assert_int_equal(uc_tokenizer_eos_added(t), 2);
    uc_tokenizer_destroy(t);
    /* a Sequence whose template appends <|eot|> (17), while the EOS by name is <|endoftext|>
     * (20): the one appended is what the tokenizer adds */
    t = make(tok_json(
        bpe_model("{'h':0,'i':1,'hi':2}", "['h i']", ""),
        "[{'id':17,'content':'<|eot|>','special':true},"
        "{'id':20,'content':'<|endoftext|>','special':true}]",
        "null", GPT2_PRE,
        "{'type':'Sequence','processors':[{'type':'ByteLevel','trim_offsets':false},"
        "{'type':'TemplateProcessing','single':[{'Sequence':{'id':'A','type_id':0}},"
        "{'SpecialToken':{'id':'<|eot|>','type_id':0}}],'pair':[],"
        "'special_tokens':{'<|eot|>':{'id':'<|eot|>','ids':[17],'tokens':['<|eot|>']}}}]}",
        "{'type':'ByteLevel','add_prefix_space':true,'trim_offsets':true,'use_regex':true}"));
    EXPECT_IDS(t, "hi", true, 2, 17);
    assert_int_equal(uc_tokenizer_bos(t), -1);
    assert_int_equal(uc_tokenizer_eos(t), 20);
    assert_int_equal(uc_tokenizer_eos_added(t), 17);
    assert_int_equal(uc_tokenizer_eos_added(NULL), -1);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

static void test_added_token_rules(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(tok_json(
        bpe_model("{'a':0,'b':1,'c':2,'x':3,'ab':4}", "[]", ""),
        "[{'id':5,'content':'AB','special':false,'normalized':true},"
        "{'id':6,'content':'bc','special':false,'normalized':false,'single_word':true},"
        "{'id':9,'content':'x','special':false,'normalized':false}]",
        "{'type':'Lowercase'}", "null", "null", "null"));
    EXPECT_IDS(t, "AB", false, 5);         /* lowercased text matches the lowercased token */
    EXPECT_IDS(t, "ab", false, 5);
    EXPECT_IDS(t, "bc", false, 6);
    EXPECT_IDS(t, "abc", false, 5, 2);     /* "bc" touches a: dropped */
    EXPECT_IDS(t, "x", false, 3);          /* "x" is in the vocabulary: its id 3, not 9 */
    uc_tokenizer_destroy(t);
    t = make(tok_json("{'type':'BPE','continuing_subword_prefix':'##','vocab':{'a':0,'##b':1,"
                      "'##c':2,'a##b':3,'ab':4,'##bc':5,'abc':6},'merges':['##b ##c','a ##bc']}",
                      "[]", "null", "{'type':'WhitespaceSplit'}", "null", "null"));
    EXPECT_IDS(t, "abc", false, 6);
    EXPECT_IDS(t, "ab a", false, 0, 1, 0);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* Every allocation in create and encode fails once in turn: the call fails with UC_ERR_NOMEM
 * (or succeeds) and nothing leaks. */
static void test_allocation_failures(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    char *copies[2];
    copies[0] = uc_strdup(sp_json()); /* the builders return a static buffer */
    copies[1] = uc_strdup(bl_json(LLAMA3_PRE));
    assert_non_null(copies[0]);
    assert_non_null(copies[1]);
    int64_t blocks_after_copies = uc_mem_blocks_in_use();
    for (int k = 0; k < 2; k++) {
        struct uc_tokenizer *t = NULL;
        int64_t fails = 0;
        for (int64_t nth = 1;; nth++) {
            uc_mem_fail_after(nth);
            uc_status rc = uc_tokenizer_create_from_json(&t, copies[k], "test.json");
            uc_mem_fail_after(0);
            if (rc == UC_OK) {
                break;
            }
            assert_int_equal(rc, UC_ERR_NOMEM);
            assert_null(t);
            assert_int_equal(uc_mem_blocks_in_use(), blocks_after_copies);
            fails++;
        }
        assert_true(fails > 10);
        int64_t held = uc_mem_blocks_in_use();
        const char *text = "hi <s>hi \xC3\xA9 12345 hi  [X] hi</s>";
        for (int64_t nth = 1;; nth++) {
            int32_t *ids = NULL;
            int64_t n = 0;
            uc_mem_fail_after(nth);
            uc_status rc = uc_tokenizer_encode(t, text, strlen(text), true, &ids, &n);
            uc_mem_fail_after(0);
            if (rc == UC_OK) {
                uc_free(ids);
                assert_int_equal(uc_mem_blocks_in_use(), held);
                break;
            }
            assert_int_equal(rc, UC_ERR_NOMEM);
            assert_null(ids);
            assert_int_equal(uc_mem_blocks_in_use(), held);
        }
        static const int32_t ids[] = {1, 9, 5, 3, 4, 2};
        for (int64_t nth = 1;; nth++) {
            char *out = NULL;
            uc_mem_fail_after(nth);
            uc_status rc = uc_tokenizer_decode(t, ids, 6, false, &out, NULL);
            uc_mem_fail_after(0);
            if (rc == UC_OK) {
                uc_free(out);
                assert_int_equal(uc_mem_blocks_in_use(), held);
                break;
            }
            assert_int_equal(rc, UC_ERR_NOMEM);
            assert_null(out);
            assert_int_equal(uc_mem_blocks_in_use(), held);
        }
        uc_tokenizer_destroy(t);
        assert_int_equal(uc_mem_blocks_in_use(), blocks_after_copies);
    }
    uc_free(copies[0]);
    uc_free(copies[1]);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

/* A long text with long runs exercises the heap merge and the regex paths; the round trip must
 * be exact. */
static void test_long_round_trip(void **state)
{
    (void)state;
    int64_t blocks = uc_mem_blocks_in_use();
    struct uc_tokenizer *t = make(bl_json(GPT2_PRE));
    size_t n = 60000;
    char *text = uc_malloc(n + 1);
    assert_non_null(text);
    for (size_t i = 0; i < n; i++) {
        text[i] = i < 20000 ? ' ' : "hi 12345\xC3\xA9"[i % 10];
    }
    text[n] = '\0';
    int32_t *ids = NULL;
    int64_t n_ids = 0;
    assert_int_equal(uc_tokenizer_encode(t, text, n, false, &ids, &n_ids), UC_OK);
    assert_true(n_ids > 1000);
    char *back = NULL;
    size_t len = 0;
    assert_int_equal(uc_tokenizer_decode(t, ids, n_ids, false, &back, &len), UC_OK);
    assert_int_equal(len, n);
    assert_memory_equal(back, text, n);
    uc_free(back);
    uc_free(ids);
    uc_free(text);
    uc_tokenizer_destroy(t);
    assert_int_equal(uc_mem_blocks_in_use(), blocks);
}

int main(void)
{
    uc_log_set_sink(capture_log, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_merges_both_forms),
        cmocka_unit_test(test_merge_rank_order),
        cmocka_unit_test(test_sentencepiece_encode),
        cmocka_unit_test(test_sentencepiece_decode),
        cmocka_unit_test(test_byte_level),
        cmocka_unit_test(test_llama3_split),
        cmocka_unit_test(test_added_tokens),
        cmocka_unit_test(test_metaspace_and_digits),
        cmocka_unit_test(test_normalizers),
        cmocka_unit_test(test_ignore_merges),
        cmocka_unit_test(test_unsupported),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_invalid_input),
        cmocka_unit_test(test_tokenizer_config_ignored),
        cmocka_unit_test(test_nul_bytes),
        cmocka_unit_test(test_huge_id_refused),
        cmocka_unit_test(test_added_token_rules),
        cmocka_unit_test(test_template_eos),
        cmocka_unit_test(test_allocation_failures),
        cmocka_unit_test(test_long_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
