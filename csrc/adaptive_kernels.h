// Host-side interface of the CUDA kernels: plain structs and launchers, no torch and no CUDA
// headers, so bindings.cpp (torch) and the .cu files (plain CUDA) compile independently.
//
// Every launcher enqueues its kernel on `stream` (a cudaStream_t passed as void*), never
// synchronises, and returns nullptr on success or a static error message.
#pragma once

#include <cstdint>

namespace adaptive_kernels {

// Element type of the activations, weights and outputs (the indices are always int64).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y[r, t, j] = x[r, t] . W[rows[r, j]] (+ bias[rows[r, j]]), 0 where rows[r, j] < 0.
// x [R, T, D]; W [N, D]; rows [R, n]; bias [N] or null; out [R, T, n]. Strides in elements.
struct GatherRowsArgs {
  const void* x;
  const void* weight;
  const int64_t* rows;
  const void* bias;  // may be null
  void* out;
  int64_t R, T, D, n;
  int64_t x_stride_r, x_stride_t, x_stride_d;
  int64_t w_stride_n, w_stride_d;
  int64_t rows_stride_r, rows_stride_j;
  int64_t bias_stride;
  int64_t out_stride_r, out_stride_t, out_stride_j;
  DType dtype;
};

// y[r, t, d] = sum_j a[r, t, j] * W[d, cols[r, j]] over cols[r, j] >= 0.
// a [R, T, n]; W [D, N]; cols [R, n]; out [R, T, D]. Strides in elements.
struct GatherColsArgs {
  const void* a;
  const void* weight;
  const int64_t* cols;
  void* out;
  int64_t R, T, D, n;
  int64_t a_stride_r, a_stride_t, a_stride_j;
  int64_t w_stride_d, w_stride_n;
  int64_t cols_stride_r, cols_stride_j;
  int64_t out_stride_r, out_stride_t, out_stride_d;
  DType dtype;
};

// Largest token count the GEMV kernels take (the decode regime).
constexpr int64_t kMaxDecodeTokens = 16;

const char* launch_gather_rows(const GatherRowsArgs& args, void* stream);
const char* launch_gather_cols(const GatherColsArgs& args, void* stream);

// Plan masks of P = B*L (batch row, layer) pairs -> fixed-width index buffers, one block per pair.
// heads [P, H] and groups [P, G] are contiguous bool (one byte each). Outputs, contiguous int64:
//   q_rows [P, H*head_dim]      weight rows of the active query heads, ascending, -1 after
//   kv_rows [P, Hkv*head_dim]   weight rows of the active key/value heads (a kv head is active
//                               when any of its H/Hkv query heads is)
//   q_to_kv [P, H]              each active query head's slot among the active kv heads, -1 after
//   mlp_rows [P, M]             active neurons (group g holds M/G neurons, one more when g < M%G)
//   counts [P, 3]               valid entries of q_rows, kv_rows and mlp_rows
struct CompactPlanArgs {
  const bool* heads;
  const bool* groups;
  int64_t P, H, G, Hkv, head_dim, M;
  int64_t* q_rows;
  int64_t* kv_rows;
  int64_t* q_to_kv;
  int64_t* mlp_rows;
  int64_t* counts;
};

// Largest H and G compact_plan takes (its per-block scans live in shared memory).
constexpr int64_t kMaxUnits = 1024;

const char* launch_compact_plan(const CompactPlanArgs& args, void* stream);

}  // namespace adaptive_kernels
