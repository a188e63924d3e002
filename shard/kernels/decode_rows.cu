/* The host side of the split decode over packed and merged rows (decode_rows.cuh): how many
 * token ranges, and the workspace they take. */
#include "decode_rows.cuh"
#include "kernels.h"

extern "C" int uc_cuda_decode_rows_splits(int64_t n_rows, int64_t n_heads, int64_t n_heads_kv,
                                          int n_sms)
{
    return dr_splits(n_rows, n_heads, n_heads_kv, n_sms);
}

extern "C" size_t uc_cuda_decode_rows_ws(int64_t n_rows, int64_t n_heads, int64_t n_heads_kv,
                                         int64_t head_dim, int splits, int64_t max_tokens,
                                         bool with_psum)
{
    return dr_ws_floats(n_rows, n_heads, n_heads_kv, head_dim, splits, max_tokens, with_psum);
}
