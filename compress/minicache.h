/* MiniCache (arXiv 2405.14366): KV cache merging across adjacent layers in depth. From a start
 * layer S (default L / 2) on, layers (S, S + 1), (S + 2, S + 3), ... form pairs (a, b). For a
 * token both layers of a pair keep, each of its key and value vectors is split into a magnitude
 * ||x|| and a direction x / ||x||; the pair stores one direction, the SLERP of the two at t
 * (default 0.6, toward layer b), and each layer its own magnitudes, and restores
 * x ~= ||x|| * direction. The tokens whose directions differ most (the share gamma, default
 * 0.05, by angular distance) stay unmerged in both layers.
 *
 * The merge set can also be calibrated (UNCOMP.md section 8, choice 5): with d_l the mean
 * angular distance between layers l and l + 1 on calibration text, uc_minicache_select picks
 * the P disjoint adjacent pairs of least total distance. This file holds the arithmetic; the
 * cache layout is shard/backend.h's merged rows, the engine part shard/engine/minicache.c. */
#ifndef UC_COMPRESS_MINICACHE_H
#define UC_COMPRESS_MINICACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define UC_MINICACHE_DEFAULT_T 0.6f       /* SLERP parameter: 0 = layer a, 1 = layer b */
#define UC_MINICACHE_DEFAULT_GAMMA 0.05f  /* share of a pair's common tokens kept unmerged */
#define UC_MINICACHE_MAX_PAIRS 64
#define UC_MINICACHE_MAX_LAYERS 1024     /* layers a calibrated selection handles */

/* The first layer merged for L layers and a requested start (0: the paper's L / 2). */
int64_t uc_minicache_start(int32_t start, int64_t n_layers);
/* partner[l] (L) = the other layer of l's pair, -1 for an unmerged layer; pair_of[l] (L, may be
 * NULL) = the pair's index p (pair p is layers start + 2p and start + 2p + 1), -1 unmerged.
 * Returns the number of pairs. */
int32_t uc_minicache_pairs(int16_t *partner, int16_t *pair_of, int64_t n_layers, int64_t start);
/* The same for any disjoint adjacent pairs: pair p is layers first[p] and first[p] + 1 (first:
 * n_pairs layers, ascending, each at least 2 above the previous, the last below L - 1: as
 * uc_minicache_select writes them). Returns n_pairs. */
int32_t uc_minicache_pairs_of(int16_t *partner, int16_t *pair_of, int64_t n_layers,
                              const int16_t *first, int32_t n_pairs);
/* The number of pairs the paper's rule gives for L layers from L / 2: floor((L - L / 2) / 2). */
int32_t uc_minicache_default_pairs(int64_t n_layers);
/* The calibrated merge set: the n_pairs disjoint adjacent pairs (a, a + 1) of L layers whose
 * distances dist[a] (L - 1 values: the mean angular distance between layers a and a + 1) sum
 * least, by dynamic programming. Of several sets with the same sum (in double), the one whose
 * deepest pair is deepest, then its next deepest, and so on (the paper merges deep layers).
 * Writes the pairs' first layers, ascending, into first (n_pairs). UC_ERR_INVALID_ARG when
 * n_pairs < 1, 2 n_pairs > L, n_pairs > UC_MINICACHE_MAX_PAIRS, L > UC_MINICACHE_MAX_LAYERS or
 * a distance is not finite (logged with the reason); UC_ERR_NOMEM. */
uc_status uc_minicache_select(int16_t *first, const double *dist, int64_t n_layers,
                              int32_t n_pairs);
/* Angular distance of two vectors, arccos(cos) / pi in [0, 1] (0 for a zero vector). */
double uc_minicache_distance(const float *xa, const float *xb, int64_t d);
/* The shared direction of xa and xb (d values, unit length unless both are zero):
 * SLERP of the unit vectors at t, sin((1-t) W) / sin W ua + sin(t W) / sin W ub with W their
 * angle (linear interpolation, renormalised, when W < 1e-6 or both antiparallel). Writes the
 * magnitudes ||xa|| and ||xb|| into *na and *nb. Computed in double. */
void uc_minicache_merge(float *dir, float *na, float *nb, const float *xa, const float *xb,
                        int64_t d, float t);
/* Scratch of uc_minicache_retain, one per token. */
struct uc_minicache_rank {
    double dist;
    int64_t i;
};
/* The tokens a pair keeps unmerged among n common ones: the round_half_up(gamma n) of largest
 * distance (ties to the lower index) get retain[i] = true. Returns how many. scratch: (n). */
int64_t uc_minicache_retain(bool *retain, const double *dist, int64_t n, float gamma,
                            struct uc_minicache_rank *scratch);

#ifdef __cplusplus
}
#endif
#endif
