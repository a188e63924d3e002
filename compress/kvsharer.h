/* KVSharer (arXiv 2410.18517): which layers share their KV cache, decided once on calibration
 * text. Every layer pair (a < b) is ranked by the Euclidean distance between the two layers'
 * averaged caches, most dissimilar first; pairs are tried greedily, layer b reading layer a's
 * cache, and a pair is kept when the last layer's hidden states with every kept pair so far plus
 * this one stay above a cosine similarity threshold against the unshared model. The search
 * stops at the target number of shared layers. The model runs behind a callback, so this file
 * needs no engine. */
#ifndef UC_COMPRESS_KVSHARER_H
#define UC_COMPRESS_KVSHARER_H

#include <stdint.h>

#include "base/status.h"
#include "compress/policy.h"

#ifdef __cplusplus
extern "C" {
#endif

struct uc_kvsharer_params {
    double threshold; /* T: cosine similarity the hidden states must keep, default 0.5 */
    double ratio;     /* shared layers as a share of L when target is 0, default 0.3 */
    int32_t target;   /* shared layers to find; 0 = round_half_up(ratio L) */
};

struct uc_kvsharer_params uc_kvsharer_default_params(void);
/* Shared layers the search stops at: target, or round_half_up(ratio L), at most L / 2 (each pair
 * uses two layers) and at most UC_MAX_SHARE_PAIRS. */
int32_t uc_kvsharer_target(const struct uc_kvsharer_params *p, int64_t n_layers);
/* Writes the L (L - 1) / 2 pairs (a < b) ordered by dist2[a * L + b] (squared distances, only
 * a < b read) descending, ties by a then b ascending; returns how many. `out` needs that room. */
int64_t uc_kvsharer_rank(struct uc_share_pair *out, const double *dist2, int64_t n_layers);

/* Runs the model with the given pairs over the calibration text and writes the cosine
 * similarity of its last hidden states to the unshared model's. */
typedef uc_status (*uc_kvsharer_eval_fn)(void *user, const struct uc_share_pair *pairs,
                                         int32_t n_pairs, double *cosine);

struct uc_kvsharer_result {
    int32_t n_pairs;
    struct uc_share_pair pairs[UC_MAX_SHARE_PAIRS];
    double cosine;   /* of the kept set (1 when none was kept) */
    int32_t n_tried; /* candidate sets evaluated */
};

/* The greedy search over the ranked pairs: a pair is skipped when its target is already a
 * target or a source, or its source already a target; it is kept when eval gives a cosine
 * above p->threshold. Stops at uc_kvsharer_target pairs or when the pairs run out. */
uc_status uc_kvsharer_search(struct uc_kvsharer_result *out, const double *dist2,
                             int64_t n_layers, const struct uc_kvsharer_params *p,
                             uc_kvsharer_eval_fn eval, void *user);
/* Mean over rows of the cosine similarity of rows of a and b ((n_rows, dim) each). */
double uc_cosine_rows_mean(const float *a, const float *b, int64_t n_rows, int64_t dim);

#ifdef __cplusplus
}
#endif
#endif
