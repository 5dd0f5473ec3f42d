// Device helpers shared by the gathered GEMV kernels: element conversion, 16-byte vector loads,
// warp sums, the split-K choice and the dtype / token-count dispatch. Plain CUDA, no torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "adaptive_kernels.h"

namespace adaptive_kernels {
namespace gemv {

constexpr int kWarpSize = 32;
constexpr int kBlockWarps = 8;
constexpr int kBlockThreads = kWarpSize * kBlockWarps;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// VEC consecutive elements at p as floats. VEC == kVec16<T>: one 16-byte load (p 16-byte
// aligned); VEC == 1: one scalar load. STREAM: the data is read once (weights), so it is
// loaded with the evict-first hint and does not displace the reused activations and indices.
template <typename T, int VEC, bool STREAM>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  static_assert(VEC == 1 || VEC == kVec16<T>, "a vector load is one element or 16 bytes");
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    const uint4 raw = STREAM ? __ldcs(reinterpret_cast<const uint4*>(p)) : __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
}

// VEC elements at p, p + stride, ...: one 16-byte load when `packed` (stride 1, aligned),
// else VEC scalar loads. Used for the activations, whose layout is known only at run time.
template <typename T, int VEC>
__device__ __forceinline__ void load_activations(const T* p, int64_t stride, bool packed, float (&out)[VEC]) {
  if constexpr (VEC > 1) {
    if (packed) {
      load_vec<T, VEC, false>(p, out);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(p[i * stride]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output rows per warp: more rows share each loaded activation chunk (and keep more loads in
// flight), fewer leave registers for the accumulators of more tokens.
template <int MAX_T>
__host__ __device__ constexpr int rows_per_warp() { return MAX_T <= 4 ? 4 : 2; }

// Warps that split the reduction of one group of output rows (1, 2, 4 or 8 of the block's 8):
// the fewest that still put about 32 warps on every multiprocessor, while every lane keeps at
// least two 16-byte chunks of the reduction to load.
inline int pick_ksplit(int64_t row_groups, int64_t chunks, int num_sms) {
  const int64_t target = static_cast<int64_t>(num_sms) * 32;
  int ksplit = 1;
  while (ksplit < kBlockWarps && row_groups * ksplit < target) ksplit *= 2;
  while (ksplit > 1 && chunks < static_cast<int64_t>(ksplit) * kWarpSize * 2) ksplit /= 2;
  return ksplit;
}

// Multiprocessors of the current device, cached per device.
inline int current_num_sms() {
  static int cache[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return 132;
  if (device >= 64) {
    int sms = 0;
    return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess ? sms : 132;
  }
  if (cache[device] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
    cache[device] = sms;
  }
  return cache[device];
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The split of one GEMV launch: warps per group of RPW output rows (pick_ksplit) and the grid
// (output-row groups, batch rows), for `outputs` output rows per batch row over `chunks` loaded
// reduction chunks.
struct Split {
  int ksplit;
  dim3 grid;
};

template <int RPW>
inline Split split_outputs(int64_t R, int64_t outputs, int64_t chunks) {
  const int ksplit = pick_ksplit(R * ceil_div(outputs, RPW), chunks, current_num_sms());
  return {ksplit, dim3(static_cast<unsigned>(ceil_div(outputs, static_cast<int64_t>(kBlockWarps / ksplit) * RPW)),
                       static_cast<unsigned>(R))};
}

// Calls f.template operator()<T, MAX_T>() with T the element type of `dtype` and MAX_T the
// smallest of 1, 2, 4, 8, 16 at or above `tokens`; returns f's result or an error message.
template <typename F>
const char* dispatch(DType dtype, int64_t tokens, F&& f) {
  auto by_tokens = [&](auto type_tag) -> const char* {
    using T = decltype(type_tag);
    if (tokens <= 1) return f.template operator()<T, 1>();
    if (tokens <= 2) return f.template operator()<T, 2>();
    if (tokens <= 4) return f.template operator()<T, 4>();
    if (tokens <= 8) return f.template operator()<T, 8>();
    if (tokens <= 16) return f.template operator()<T, 16>();
    return "the GEMV kernels take at most 16 tokens per row";
  };
  switch (dtype) {
    case DType::kFloat32:
      return by_tokens(float{});
    case DType::kFloat16:
      return by_tokens(__half{});
    case DType::kBFloat16:
      return by_tokens(__nv_bfloat16{});
  }
  return "unsupported dtype (float32, float16 and bfloat16 are supported)";
}

// Why a GEMV over R batch rows of T tokens with `outputs` output rows per batch row cannot launch
// (nullptr: it can).
inline const char* shape_problem(int64_t T, int64_t R, int64_t outputs) {
  if (T > kMaxDecodeTokens) return "the GEMV kernels take at most 16 tokens per row";
  if (R > 65535) return "at most 65535 batch rows";
  if (ceil_div(outputs, 4) > 0x7fffffff) return "too many output rows";
  return nullptr;
}

inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace gemv
}  // namespace adaptive_kernels
