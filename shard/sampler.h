/* Token sampling on the host from a row of logits: repetition, frequency and presence penalties,
 * temperature, top-k, top-p and min-p, with a seeded generator so a request with a seed is
 * reproducible. Temperature 0 is greedy (argmax after penalties). */
#ifndef UC_SHARD_SAMPLER_H
#define UC_SHARD_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_sampling_params {
    float temperature;        /* 0 = greedy */
    int32_t top_k;            /* 0 = off */
    float top_p;              /* 1 = off; (0, 1] */
    float min_p;              /* 0 = off; [0, 1] */
    float repetition_penalty; /* 1 = off; > 0 */
    float frequency_penalty;  /* 0 = off; [-2, 2] */
    float presence_penalty;   /* 0 = off; [-2, 2] */
    uint64_t seed;
    bool has_seed;
};

struct uc_sampling_params uc_sampling_default_params(void);
/* Checks every field; on failure writes a message naming it. */
uc_status uc_sampling_params_validate(const struct uc_sampling_params *p, char *msg,
                                      size_t msg_size);

struct uc_sampler;

/* `prompt` tokens count for the repetition penalty (borrowed for the call). Without a seed, the
 * generator is seeded from `fallback_seed`. */
uc_status uc_sampler_create(struct uc_sampler **out, const struct uc_sampling_params *p,
                            int64_t vocab, const int32_t *prompt, int64_t n_prompt,
                            uint64_t fallback_seed);
void uc_sampler_destroy(struct uc_sampler *s);
/* Picks the next token from logits (V). Records it for the penalties. *logprob (optional)
 * receives the token's log-probability under the model's unmodified distribution. */
int32_t uc_sampler_sample(struct uc_sampler *s, const float *logits, float *logprob);
/* Writes the n most likely tokens of the unmodified distribution and their log-probabilities. */
void uc_sampler_top_logprobs(struct uc_sampler *s, const float *logits, int32_t n, int32_t *ids,
                             float *logprobs);
/* Forbids a token for the next sample only (min_tokens keeps EOS out this way). */
void uc_sampler_ban_once(struct uc_sampler *s, int32_t token);

#ifdef __cplusplus
}
#endif
#endif
