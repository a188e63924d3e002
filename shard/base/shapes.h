/* The dimension letters used in every shape comment and parameter name:
 *   B  sequences in a batch          T  tokens (of a prompt or step)
 *   L  layers                        H  query heads (local to a rank unless noted)
 *   Hkv KV heads                     D  head dim
 *   C  hidden size (channels)        F  MLP intermediate size
 *   V  vocabulary                    R  tensor-parallel ranks
 * A tensor comment reads `float *k; (T, Hkv, D)`: row-major, last index fastest. */
#ifndef UC_BASE_SHAPES_H
#define UC_BASE_SHAPES_H
#endif
