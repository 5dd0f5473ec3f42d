// Plan compaction on the device: the head and group masks of every (batch row, layer) pair to
// fixed-width index buffers, all pairs in one launch and without reading anything back, so a
// request's plan can be built inside a captured CUDA graph. Widths are the full counts (H*d,
// Hkv*d, H, M); entries past a pair's active count are -1. Semantics: adaptive_kernels.h.
//
// One block per pair: four warps scan the head, kv-head and group masks and the group sizes in shared memory
// (exclusive prefix sums give every active unit its slot), then all threads fill the buffers.
#include <cuda_runtime.h>

#include <cstdint>

#include "adaptive_kernels.h"

namespace adaptive_kernels {
namespace {

constexpr int kThreads = 256;

// In place: v[i] <- v[0] + ... + v[i-1] for i < len; returns the total. Run by one whole warp.
__device__ int warp_exclusive_scan(int* v, int len, int lane) {
  const int per_lane = (len + 31) / 32;
  const int begin = min(len, lane * per_lane);
  const int end = min(len, begin + per_lane);
  int local = 0;
  for (int i = begin; i < end; ++i) local += v[i];
  int inclusive = local;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  int running = inclusive - local;
  for (int i = begin; i < end; ++i) {
    const int x = v[i];
    v[i] = running;
    running += x;
  }
  return __shfl_sync(0xffffffffu, inclusive, 31);
}

__global__ void __launch_bounds__(kThreads) compact_plan_kernel(const CompactPlanArgs p) {
  extern __shared__ int smem[];
  const int H = static_cast<int>(p.H), G = static_cast<int>(p.G), Hkv = static_cast<int>(p.Hkv);
  const int per_kv = H / Hkv;
  const int d = static_cast<int>(p.head_dim);
  const int64_t M = p.M;
  const int base = static_cast<int>(M / G), extra = static_cast<int>(M % G);
  // per unit, then per slot: head_slot[H] head_at[H] kv_slot[Hkv] kv_at[Hkv] neuron_slot[G]
  // group_slot[G] group_at[G] group_start[G] totals[4]
  int* head_slot = smem;
  int* head_at = head_slot + H;
  int* kv_slot = head_at + H;
  int* kv_at = kv_slot + Hkv;
  int* neuron_slot = kv_at + Hkv;
  int* group_slot = neuron_slot + G;
  int* group_at = group_slot + G;
  int* group_start = group_at + G;
  int* totals = group_start + G;

  const int64_t pair = blockIdx.x;
  const bool* heads = p.heads + pair * p.H;
  const bool* groups = p.groups + pair * p.G;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  for (int h = tid; h < H; h += kThreads) head_slot[h] = heads[h] ? 1 : 0;
  for (int k = tid; k < Hkv; k += kThreads) {
    bool on = false;
    for (int q = k * per_kv; q < (k + 1) * per_kv; ++q) on = on || heads[q];
    kv_slot[k] = on ? 1 : 0;
  }
  for (int g = tid; g < G; g += kThreads) {
    neuron_slot[g] = groups[g] ? base + (g < extra ? 1 : 0) : 0;
    group_slot[g] = groups[g] ? 1 : 0;
  }
  __syncthreads();
  // flags and sizes -> exclusive prefix sums (the slot of each active unit), one warp per mask
  int* const scanned[4] = {head_slot, kv_slot, neuron_slot, group_slot};
  const int lengths[4] = {H, Hkv, G, G};
  if (warp < 4) {
    const int total = warp_exclusive_scan(scanned[warp], lengths[warp], lane);
    if (lane == 0) totals[warp] = total;
  }
  __syncthreads();
  // invert: the unit at each slot
  for (int h = tid; h < H; h += kThreads)
    if (heads[h]) head_at[head_slot[h]] = h;
  for (int k = tid; k < Hkv; k += kThreads) {
    const int next = k + 1 < Hkv ? kv_slot[k + 1] : totals[1];
    if (next > kv_slot[k]) kv_at[kv_slot[k]] = k;
  }
  for (int g = tid; g < G; g += kThreads) {
    if (groups[g]) {
      group_at[group_slot[g]] = g;
      group_start[group_slot[g]] = neuron_slot[g];
    }
  }
  __syncthreads();

  const int heads_on = totals[0], kv_on = totals[1], neurons_on = totals[2], groups_on = totals[3];
  int64_t* q_rows = p.q_rows + pair * p.H * d;
  for (int64_t s = tid; s < p.H * d; s += kThreads) {
    const int u = static_cast<int>(s / d);
    q_rows[s] = u < heads_on ? static_cast<int64_t>(head_at[u]) * d + s % d : -1;
  }
  int64_t* kv_rows = p.kv_rows + pair * p.Hkv * d;
  for (int64_t s = tid; s < p.Hkv * d; s += kThreads) {
    const int u = static_cast<int>(s / d);
    kv_rows[s] = u < kv_on ? static_cast<int64_t>(kv_at[u]) * d + s % d : -1;
  }
  int64_t* q_to_kv = p.q_to_kv + pair * p.H;
  for (int u = tid; u < H; u += kThreads) q_to_kv[u] = u < heads_on ? kv_slot[head_at[u] / per_kv] : -1;
  int64_t* mlp_rows = p.mlp_rows + pair * M;
  for (int64_t s = tid; s < M; s += kThreads) {
    int64_t v = -1;
    if (s < neurons_on) {
      int lo = 0, hi = groups_on - 1;  // the last active group starting at or before s
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (group_start[mid] <= s) lo = mid; else hi = mid - 1;
      }
      const int g = group_at[lo];
      v = static_cast<int64_t>(g) * base + min(g, extra) + (s - group_start[lo]);
    }
    mlp_rows[s] = v;
  }
  if (tid == 0) {
    p.counts[pair * 3 + 0] = static_cast<int64_t>(heads_on) * d;
    p.counts[pair * 3 + 1] = static_cast<int64_t>(kv_on) * d;
    p.counts[pair * 3 + 2] = neurons_on;
  }
}

}  // namespace

const char* launch_compact_plan(const CompactPlanArgs& p, void* stream) {
  if (p.H < 1 || p.H > kMaxUnits || p.G < 1 || p.G > kMaxUnits) return "H and G must lie in [1, 1024]";
  if (p.Hkv < 1 || p.H % p.Hkv != 0) return "the number of kv heads must divide the number of heads";
  if (p.head_dim < 1 || p.M < 0 || p.M > 0x7fffffff) return "head_dim must be positive and M in [0, 2^31)";
  if (p.P > 0x7fffffff) return "too many (batch row, layer) pairs";
  if (p.P == 0) return nullptr;
  const size_t smem = sizeof(int) * static_cast<size_t>(2 * p.H + 2 * p.Hkv + 4 * p.G + 4);
  compact_plan_kernel<<<static_cast<unsigned>(p.P), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace adaptive_kernels
