/* The tokenizer's internals, shared by the .c files of shard/tokenizer/ and by nothing else:
 * the state loaded from tokenizer.json (struct uc_tokenizer), the per-call workspaces, and the
 * functions one file of the pipeline calls in another. Every shared function is prefixed tok_;
 * what one file alone uses stays static there. The public API is shard/tokenizer.h. */
#ifndef UC_SHARD_TOKENIZER_IMPL_H
#define UC_SHARD_TOKENIZER_IMPL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "base/log.h"
#include "base/mem.h"
#include "base/util.h"

/* The pre-tokenization regex of GPT-2, which the ByteLevel pre-tokenizer uses when use_regex. */
#define GPT2_REGEX                                                                                 \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
/* Rust regex's \\w (Alphabetic, marks, decimal digits, connector punctuation, joiners) as a
 * PCRE2 class body: PCRE2 10.42's \\w lacks the marks and the alphabetic symbols. Numbers of
 * every kind (\\p{N}) stand in for digits and letter numbers. */
#define RUST_WORD                                                                                  \
    "\\p{L}\\p{N}\\p{M}\\p{Pc}\\x{200C}\\x{200D}\\x{24B6}-\\x{24E9}\\x{1F130}-\\x{1F149}"         \
    "\\x{1F150}-\\x{1F169}\\x{1F170}-\\x{1F189}"
/* A "word" character next to a single_word added token (the library's ^\\w / \\w$). */
#define WORD_REGEX "^[" RUST_WORD "]"
#define MAX_TOKEN_ID 0x7ffffffe
#define REPLACEMENT_CHAR "\xEF\xBF\xBD" /* U+FFFD */
#define METASPACE "\xE2\x96\x81"        /* U+2581 */

struct ivec {
    int32_t *v;
    int64_t n, cap;
    bool oom;
};

/* A piece of a string: [s, e), and whether it is a match of the splitting pattern. */
struct span {
    size_t s, e;
    bool m;
};

struct svec {
    struct span *v;
    int64_t n, cap;
    bool oom;
};

/* Pre-tokens: text pieces stored back to back in one buffer. `first` marks a piece that starts
 * at offset 0 of the original input (Metaspace's prepend_scheme "first" needs it). */
struct piece {
    size_t off, len;
    bool first;
};

struct plist {
    struct uc_buf text;
    struct piece *p;
    int64_t n, cap;
    bool oom;
};

/* Decoder tokens: strings back to back in one buffer; token i ends at end[i]. */
struct tlist {
    struct uc_buf text;
    size_t *end;
    int64_t n, cap;
    bool oom;
};

/* A pattern from the JSON: {"String": literal} or {"Regex": PCRE2 source}. */
struct pattern {
    char *lit; /* literal (uc_malloc'd), or NULL when re is set */
    size_t lit_len;
    pcre2_code *re;
};

enum norm_kind {
    NORM_PREPEND,
    NORM_REPLACE,
    NORM_STRIP,
    NORM_NFC,
    NORM_NFD,
    NORM_NFKC,
    NORM_NFKD,
    NORM_LOWERCASE,
};

struct norm {
    enum norm_kind kind;
    struct pattern pat; /* REPLACE */
    char *str;          /* PREPEND text, REPLACE content */
    size_t str_len;
    bool left, right; /* STRIP */
};

enum pre_kind { PRE_BYTE_LEVEL, PRE_SPLIT, PRE_METASPACE };
enum split_behavior {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_PREV,
    SPLIT_MERGED_NEXT,
    SPLIT_CONTIGUOUS,
};
enum prepend_scheme { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER };

struct pre {
    enum pre_kind kind;
    bool add_prefix_space, use_regex; /* BYTE_LEVEL */
    struct pattern pat;               /* SPLIT; METASPACE: the replacement as a literal */
    enum split_behavior behavior;
    bool invert;
    enum prepend_scheme scheme; /* METASPACE */
    bool split;
};

enum dec_kind {
    DEC_BYTE_LEVEL,
    DEC_REPLACE,
    DEC_BYTE_FALLBACK,
    DEC_FUSE,
    DEC_STRIP,
    DEC_METASPACE,
};

struct dec {
    enum dec_kind kind;
    struct pattern pat; /* REPLACE */
    char *content;      /* REPLACE */
    size_t content_len;
    char ch[5]; /* STRIP content char; METASPACE replacement */
    size_t ch_len;
    int64_t start, stop; /* STRIP */
    enum prepend_scheme scheme;
};

struct added {
    char *content;
    size_t len;
    char *ncontent; /* normalized: the content run through the normalizers (matched in */
    size_t nlen;    /* normalized text, as the library's second trie does) */
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
};

/* Added tokens of one kind (normalized or not), for leftmost-longest matching: indices into
 * tok->added grouped by first byte, longest first. */
struct added_set {
    int32_t *order;
    int64_t first[257]; /* order[first[b] .. first[b+1]) start with byte b */
};

/* One model vocabulary string: pool[off .. off+len), NUL-terminated. */
struct ventry {
    uint32_t off, len;
    int32_t id;
};

struct uc_tokenizer {
    int64_t n_vocab; /* V: max id + 1 over the model vocabulary and the added tokens */
    /* model vocabulary */
    char *pool;
    struct ventry *ventries;
    int64_t n_ventries;
    int32_t *vslot; /* hash slots: index into ventries, -1 when empty */
    size_t vmask;
    int32_t *id_entry; /* (V) index into ventries, -1 when the id has no model string */
    /* merges, keyed by (left id << 32 | right id) */
    uint64_t *mkey;
    int32_t *mrank, *mnew;
    size_t mmask;
    int64_t n_merges;
    int32_t unk_id;
    bool fuse_unk, byte_fallback, ignore_merges;
    int32_t byte_id[256]; /* id of "<0xNN>", -1 when absent */
    /* added tokens */
    struct added *added;
    int64_t n_added;
    int32_t *added_idx;      /* (V) index into added, -1 */
    struct added_set raw_set, norm_set; /* matched in the raw text / in normalized text */
    bool any_single_word;
    /* BPE affixes (empty when absent) */
    char *cs_prefix, *eow_suffix;
    size_t cs_prefix_len, eow_suffix_len;
    /* pipeline */
    struct norm *norms;
    int64_t n_norms, cap_norms;
    struct pre *pres;
    int64_t n_pres, cap_pres;
    struct dec *decs;
    int64_t n_decs, cap_decs;
    bool has_decoder;
    struct ivec tmpl_pre, tmpl_post; /* ids the single template puts before and after $A */
    bool byte_level;
    int32_t bos, eos;
    int32_t eos_added; /* the last id the template appends after $A, or -1 */
    /* PCRE2 */
    pcre2_general_context *gctx;
    pcre2_compile_context *cctx;
    pcre2_match_context *mctx;
    pcre2_code *re_gpt2, *re_word; /* shared by ByteLevel pre-tokenizers; single_word */
    /* streamed bytes per id (uc_tokenizer_token_bytes): not first, and first */
    char *sb_pool;
    int64_t *sb_off, *sbf_off;
    uint32_t *sb_len, *sbf_len;
    /* GPT-2 bytes_to_unicode and its inverse */
    char b2u[256][2];
    uint8_t b2u_len[256];
    int16_t u2b[324];
};

#define MAX_DEPTH 8
#define NOMEM_FIELD(path, field) UC_ERRF(UC_ERR_NOMEM, "file=%s field=%s", (path), (field))

/* A BPE symbol: a token id in a doubly linked list over one word. */
struct sym {
    int32_t id, prev, next;
    bool dead;
};

/* A candidate merge of symbols pos and pos->next. */
struct cand {
    int32_t rank, pos, new_id;
};

/* Per-call scratch; nothing in the tokenizer is written during encode. */
struct enc_ws {
    pcre2_match_data *md;
    struct uc_buf na, nb, tmp;
    struct plist pa, pb;
    struct svec spans, keep;
    struct sym *sym;
    int64_t sym_n, sym_cap;
    struct cand *heap;
    int64_t heap_n, heap_cap;
    bool oom;
};

/* raw: keep invalid UTF-8 bytes (streaming); stream: one token at a time, `first` for the first
 * one, so the whole-text steps after a Fuse (Strip) apply only where they would in a decode. */
struct dec_mode {
    bool raw, stream, first;
};

struct dec_ws {
    struct tlist ta, tb;
    struct uc_buf tmp;
    struct svec spans;
    pcre2_match_data *md;
};

/* text.c: growable arrays and UTF-8 */
void *tok_grow_array(void *p, int64_t *cap, int64_t need, size_t elem, bool *ok);
void tok_ivec_push(struct ivec *a, int32_t x);
void tok_ivec_append(struct ivec *a, const struct ivec *b);
void tok_svec_push(struct svec *a, size_t s, size_t e, bool m);
void tok_plist_clear(struct plist *l);
void tok_plist_end(struct plist *l, size_t off, bool first);
void tok_plist_fini(struct plist *l);
void tok_tlist_clear(struct tlist *l);
void tok_tlist_end(struct tlist *l);
void tok_tlist_push(struct tlist *l, const char *s, size_t n);
const char *tok_tlist_get(const struct tlist *l, int64_t i, size_t *n);
void tok_tlist_fini(struct tlist *l);
bool tok_tlist_failed(const struct tlist *l);
size_t tok_utf8_scan(const unsigned char *s, size_t n, uint32_t *cp, bool *ok);
size_t tok_utf8_lead_len(unsigned char b);
size_t tok_utf8_first_invalid(const char *s, size_t n);
void tok_buf_append_lossy(struct uc_buf *out, const char *s, size_t n);
size_t tok_utf8_encode(uint32_t cp, char out[4]);
size_t tok_white_prefix(const char *s, size_t n);
size_t tok_white_suffix_start(const char *s, size_t n);

/* pattern.c: patterns: PCRE2, split spans and behaviours */
void *tok_pcre_alloc(PCRE2_SIZE n, void *user);
void tok_pcre_release(void *p, void *user);
uc_status tok_regex_compile(struct uc_tokenizer *tok, const char *src, size_t len,
                            const char *path, const char *field, pcre2_code **out);
uc_status tok_regex_next(const struct uc_tokenizer *tok, const pcre2_code *re, const char *s,
                         size_t n, size_t from, pcre2_match_data *md, bool checked, size_t *ms,
                         size_t *me, bool *found);
uc_status tok_find_spans(const struct uc_tokenizer *tok, const struct pattern *p,
                         const pcre2_code *re, const char *s, size_t n, pcre2_match_data *md,
                         bool checked, struct svec *out);
void tok_apply_behavior(enum split_behavior b, bool invert, const struct svec *in,
                        struct svec *out);
void tok_pattern_fini(struct pattern *p);
uc_status tok_parse_pattern(struct uc_tokenizer *tok, const cJSON *obj, const char *path,
                            const char *field, struct pattern *out);

/* load.c: reading tokenizer.json */
const char *tok_jstr(const cJSON *o, const char *key);
/* The "type" of a pipeline component (normalizer, pre-tokenizer, post-processor, decoder):
 * *type NULL with UC_OK when the component is absent or null; an error naming the field when the
 * type is missing or the nesting is deeper than MAX_DEPTH. */
uc_status tok_component_type(const cJSON *c, const char *path, const char *field, int depth,
                             const char **type);
bool tok_jbool(const cJSON *o, const char *key, bool def);
bool tok_jint(const cJSON *v, int64_t lo, int64_t hi, int64_t *out);
uc_status tok_parse_char(const cJSON *obj, const char *key, const char *def, const char *path,
                         const char *field, char ch[5], size_t *len);
uc_status tok_parse_scheme(const cJSON *obj, const char *path, const char *field,
                           enum prepend_scheme *out);
void tok_init_byte_tables(struct uc_tokenizer *tok);
uc_status tok_load(struct uc_tokenizer *tok, const cJSON *root, const char *path);

/* normalizers.c: normalizers */
void tok_norms_clear(struct uc_tokenizer *tok);
uc_status tok_parse_normalizer(struct uc_tokenizer *tok, const cJSON *n, const char *path,
                               const char *field, int depth);
uc_status tok_normalize(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                        size_t n, const char **out, size_t *out_len);

/* pre_tokenizers.c: pre-tokenizers */
void tok_pres_clear(struct uc_tokenizer *tok);
uc_status tok_parse_pre_tokenizer(struct uc_tokenizer *tok, const cJSON *p, const char *path,
                                  const char *field, int depth);
uc_status tok_pre_tokenize(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *s,
                           size_t n, bool first, struct plist **res);

/* bpe.c: the BPE model */
int32_t tok_vocab_find(const struct uc_tokenizer *tok, const char *s, size_t n);
const char *tok_id_string(const struct uc_tokenizer *tok, int32_t id, size_t *n);
uc_status tok_check_model(const cJSON *model, const char *path);
uc_status tok_load_vocab(struct uc_tokenizer *tok, const cJSON *vocab, const char *path);
uc_status tok_load_merges(struct uc_tokenizer *tok, const cJSON *merges, const char *path);
uc_status tok_bpe_word(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *w,
                       size_t n, struct ivec *out);

/* added.c: added tokens and the encode pipeline around them */
uc_status tok_load_added(struct uc_tokenizer *tok, const cJSON *arr, const char *path);
uc_status tok_encode_text(const struct uc_tokenizer *tok, struct enc_ws *ws, const char *text,
                          size_t len, struct ivec *out);
uc_status tok_normalize_added(struct uc_tokenizer *tok, const char *path);

/* template.c: the post-processor template */
uc_status tok_parse_post_processor(struct uc_tokenizer *tok, const cJSON *p, const char *path,
                                   const char *field, int depth);
void tok_pick_special_ids(struct uc_tokenizer *tok);

/* decoders.c: decoders and streamed bytes */
void tok_decs_clear(struct uc_tokenizer *tok);
uc_status tok_parse_decoder(struct uc_tokenizer *tok, const cJSON *d, const char *path,
                            const char *field, int depth);
void tok_dec_ws_fini(struct dec_ws *dw);
uc_status tok_run_decoders(const struct uc_tokenizer *tok, struct dec_ws *dw,
                           const struct dec_mode *m, struct uc_buf *joined);
uc_status tok_build_stream_bytes(struct uc_tokenizer *tok);

/* tokenizer.c: the public entry points */
void tok_enc_ws_fini(struct enc_ws *ws);

#endif
