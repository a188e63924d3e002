/* Which tokens a KV head keeps (UNCOMP.md sections 5, 6 and 8): SnapKV window scores with 1-D
 * max pooling, H2O heavy hitters, StreamingLLM sinks, and the rows that survive a stage
 * boundary. Ties always go to the lower position; results are ascending positions. */
#ifndef UC_COMPRESS_SELECT_H
#define UC_COMPRESS_SELECT_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Indices of the k largest scores (ties: lower index first), written ascending to out.
 * scratch: uc_select_scratch_bytes(n). Returns k (clamped to n). */
int64_t uc_topk_lowpos(int32_t *out, const double *score, int64_t n, int64_t k, void *scratch);

/* max_pool1d(kernel, stride 1, padding kernel/2 with -inf) of s (n) into out (n); NaN scores
 * are passed over. With scratch (n doubles) in O(n) whatever the kernel, else directly. */
void uc_maxpool1d(double *UC_RESTRICT out, const double *UC_RESTRICT s, int64_t n, int32_t kernel,
                  double *UC_RESTRICT scratch);

/* SnapKV: keep the top (budget - window) positions of the pooled window scores among the first
 * n - window, plus the last window positions. colscore (n) is the window-row attention summed
 * over the KV head's query heads. Keeps everything when budget >= n. Returns the count.
 * scratch: uc_select_scratch_bytes(n). */
int64_t uc_select_snapkv(int32_t *keep, const double *colscore, int64_t n, int64_t budget,
                         int32_t window, int32_t kernel, void *scratch);
/* H2O: the most recent floor(budget/2) plus the heaviest accumulated-attention positions
 * before them. acc (n) is attention summed over all causal query rows. */
int64_t uc_select_h2o(int32_t *keep, const double *acc, int64_t n, int64_t budget, void *scratch);
/* StreamingLLM: the first `sink` positions and the most recent budget - sink. */
int64_t uc_select_streaming(int32_t *keep, int64_t n, int64_t budget, int32_t sink);
/* Stage boundary: the top keep_n - window rows by score among the first n - window, plus the
 * last window rows. */
int64_t uc_select_rows(int32_t *keep, const double *rowscore, int64_t n, int64_t keep_n,
                       int32_t window, void *scratch);
/* Bytes of scratch the functions above need for n tokens. */
size_t uc_select_scratch_bytes(int64_t n);

#ifdef __cplusplus
}
#endif
#endif
