/* Tokenizer from a Hugging Face tokenizer.json: BPE with merges (both the "a b" and ["a","b"]
 * forms); byte-level pre-tokenization with the GPT-2 and Llama-3 split regexes (PCRE2);
 * SentencePiece-style normalisation (Prepend/Replace, Metaspace) with byte fallback; added and
 * special tokens; the TemplateProcessing post-processor (BOS); the matching decoders. A component
 * it does not support is a load-time UC_ERR_UNSUPPORTED naming the field. Thread-safe after
 * creation (encode/decode do not mutate the tokenizer). */
#ifndef UC_SHARD_TOKENIZER_H
#define UC_SHARD_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_tokenizer;

/* Loads DIR/tokenizer.json, read exactly as the Hugging Face tokenizers library reads it
 * (tokenizer_config.json is not consulted: its legacy/add_prefix_space are transformers
 * settings, which the library ignores). */
uc_status uc_tokenizer_create(struct uc_tokenizer **out, const char *model_dir);
/* Loads from JSON text; `path` names it in error messages. */
uc_status uc_tokenizer_create_from_json(struct uc_tokenizer **out, const char *json_text,
                                        const char *path);
void uc_tokenizer_destroy(struct uc_tokenizer *tok);

/* Encodes UTF-8 text (len bytes; invalid UTF-8 is UC_ERR_INVALID_ARG). With add_special, the
 * post-processor's template is applied (BOS). *ids is uc_malloc'd and owned by the caller. */
uc_status uc_tokenizer_encode(const struct uc_tokenizer *tok, const char *text, size_t len,
                              bool add_special, int32_t **ids, int64_t *n_ids);
/* uc_tokenizer_encode that also writes, on failure, the reason a client can act on (e.g. "not
 * valid UTF-8 at byte 3 of 9 (0xFF)") to msg (msg_size bytes, NUL-terminated; may be NULL).
 * Text may hold NUL bytes: only len counts. */
uc_status uc_tokenizer_encode_msg(const struct uc_tokenizer *tok, const char *text, size_t len,
                                  bool add_special, int32_t **ids, int64_t *n_ids, char *msg,
                                  size_t msg_size);
/* Decodes ids to UTF-8 (uc_malloc'd, NUL-terminated). With skip_special, special tokens are
 * left out. Ids outside the vocabulary are UC_ERR_INVALID_ARG. Byte sequences that are not
 * valid UTF-8 come out as U+FFFD, as the reference decoders do. */
uc_status uc_tokenizer_decode(const struct uc_tokenizer *tok, const int32_t *ids, int64_t n_ids,
                              bool skip_special, char **text, size_t *len);
/* The raw bytes one token stands for in a streamed decode, without the whole-text decoder
 * steps that depend on position (the leading-space Strip of SentencePiece decoders applies only
 * when `first` is true). Appends to *buf-like output through the callback-free form: writes at
 * most cap bytes to out, returns the number of bytes the token needs (which may exceed cap). */
size_t uc_tokenizer_token_bytes(const struct uc_tokenizer *tok, int32_t id, bool first, char *out,
                                size_t cap);

/* Max token id + 1 over the vocabulary and the added tokens (uncompd refuses a model whose
 * embedding rows are fewer). */
int64_t uc_tokenizer_vocab_size(const struct uc_tokenizer *tok);
/* BOS id the post-processor adds (the first id its template puts before the text), or -1. */
int32_t uc_tokenizer_bos(const struct uc_tokenizer *tok);
/* EOS id ("</s>", "<|end_of_text|>", ... as declared by added tokens), or -1. */
int32_t uc_tokenizer_eos(const struct uc_tokenizer *tok);
/* EOS id the post-processor appends (the last id its template puts after the text), or -1 when
 * it appends none (Llama, Mistral, Qwen and Gemma templates add only a BOS). */
int32_t uc_tokenizer_eos_added(const struct uc_tokenizer *tok);
bool uc_tokenizer_is_special(const struct uc_tokenizer *tok, int32_t id);
/* The token's string in the vocabulary (NULL when out of range). */
const char *uc_tokenizer_token_str(const struct uc_tokenizer *tok, int32_t id);
/* "bpe-bytelevel" or "bpe-sentencepiece". */
const char *uc_tokenizer_kind(const struct uc_tokenizer *tok);

#ifdef __cplusplus
}
#endif
#endif
