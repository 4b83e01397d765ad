// Embedding gather (bf16).
//
//   out[r, :] = table[tokens[r], :]                      r = 0..rows-1
//
// Shapes: tokens [rows] int32 (device); table [vocab, d] bf16 row-major; out [rows, d] bf16 row-major.
// d % 8 == 0, table and out 16-byte aligned. A token outside 0..vocab-1 writes a row of NaN (the host checks
// ids first; the NaN row makes a slip visible instead of reading out of bounds). Pure copy: trivially
// batch invariant.
#pragma once
#include "common.cuh"

namespace adadecode {

cudaError_t embedding(const int32_t* tokens, const __nv_bfloat16* table, __nv_bfloat16* out, int rows, int d,
                      int vocab, cudaStream_t stream);

}  // namespace adadecode
