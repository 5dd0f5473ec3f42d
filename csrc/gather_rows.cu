// Split-K GEMV over gathered weight rows, for the decode regime (1 to 16 tokens):
//   y[r, t, j] = x[r, t] . W[rows[r, j]] (+ bias[rows[r, j]]),  0 where rows[r, j] < 0.
//
// Each warp computes RPW output rows j of one batch row r over a slice of the reduction (D);
// the KSPLIT warps of a group take interleaved 32-chunk slices, so each warp-wide load is one
// contiguous 512-byte run of a weight row, and their partial sums meet in shared memory. Only
// the listed weight rows are read (a padded, -1, row costs no weight bytes), in place through
// the weight's strides; products accumulate in fp32.
#include "gemv_common.cuh"

namespace adaptive_kernels {
namespace {

using namespace gemv;

// VEC: weight (and, when x_packed, activation) elements per load, 16 bytes or 1.
template <typename T, int VEC, int MAX_T>
__global__ void __launch_bounds__(kBlockThreads)
    gather_rows_kernel(const GatherRowsArgs p, const int ksplit, const bool x_packed) {
  constexpr int RPW = rows_per_warp<MAX_T>();
  __shared__ float partial[kBlockWarps][RPW * MAX_T];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int groups = kBlockWarps / ksplit;
  const int group = warp / ksplit;
  const int slice = warp % ksplit;
  const int64_t r = blockIdx.y;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) * groups + group) * RPW;
  const int64_t* rows = p.rows + r * p.rows_stride_r;

  const T* w_row[RPW];
  bool valid[RPW];
  bool any = false;
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int64_t j = j0 + i;
    const int64_t idx = j < p.n ? __ldg(rows + j * p.rows_stride_j) : -1;
    valid[i] = idx >= 0;
    any |= valid[i];
    w_row[i] = w + (valid[i] ? idx : 0) * p.w_stride_n;
  }

  float acc[RPW][MAX_T];
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) acc[i][t] = 0.f;

  if (any) {
    const T* x_r = x + r * p.x_stride_r;
    const int64_t chunks = ceil_div(p.D, VEC);  // VEC > 1 only when VEC divides D
#pragma unroll 2
    for (int64_t c = static_cast<int64_t>(slice) * kWarpSize + lane; c < chunks; c += ksplit * kWarpSize) {
      const int64_t k = c * VEC;
      float wv[RPW][VEC];
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        if (valid[i]) {
          load_vec<T, VEC, true>(w_row[i] + k * p.w_stride_d, wv[i]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) wv[i][e] = 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < MAX_T; ++t) {
        if (t < p.T) {
          float xv[VEC];
          load_activations<T, VEC>(x_r + t * p.x_stride_t + k * p.x_stride_d, p.x_stride_d, x_packed, xv);
#pragma unroll
          for (int i = 0; i < RPW; ++i)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[i][t] = fmaf(wv[i][e], xv[e], acc[i][t]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) acc[i][t] = warp_sum(acc[i][t]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < RPW; ++i)
#pragma unroll
      for (int t = 0; t < MAX_T; ++t) partial[warp][i * MAX_T + t] = acc[i][t];
  }
  __syncthreads();

  // One thread per (group, row, token) output: sum the group's slices, add the bias, store.
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ out = static_cast<T*>(p.out);
  for (int o = threadIdx.x; o < groups * RPW * MAX_T; o += kBlockThreads) {
    const int g = o / (RPW * MAX_T);
    const int i = (o / MAX_T) % RPW;
    const int t = o % MAX_T;
    const int64_t j = (static_cast<int64_t>(blockIdx.x) * groups + g) * RPW + i;
    if (t >= p.T || j >= p.n) continue;
    float y = 0.f;
    for (int s = 0; s < ksplit; ++s) y += partial[g * ksplit + s][i * MAX_T + t];
    const int64_t idx = __ldg(rows + j * p.rows_stride_j);
    if (idx < 0) {
      y = 0.f;
    } else if (bias != nullptr) {
      y += to_float(bias[idx * p.bias_stride]);
    }
    out[r * p.out_stride_r + t * p.out_stride_t + j * p.out_stride_j] = from_float<T>(y);
  }
}

struct LaunchRows {
  const GatherRowsArgs& p;
  cudaStream_t stream;

  template <typename T, int MAX_T>
  const char* operator()() const {
    constexpr int V = kVec16<T>;
    constexpr int RPW = rows_per_warp<MAX_T>();
    // 16-byte weight loads need every listed row to start on a 16-byte boundary
    const bool w_packed = p.w_stride_d == 1 && p.D % V == 0 && p.w_stride_n % V == 0 && aligned16(p.weight);
    const bool x_packed = p.x_stride_d == 1 && (p.T == 1 || p.x_stride_t % V == 0) &&
                          (p.R == 1 || p.x_stride_r % V == 0) && aligned16(p.x);
    const Split split = split_outputs<RPW>(p.R, p.n, ceil_div(p.D, w_packed ? V : 1));
    if (w_packed) {
      gather_rows_kernel<T, V, MAX_T><<<split.grid, kBlockThreads, 0, stream>>>(p, split.ksplit, x_packed);
    } else {
      gather_rows_kernel<T, 1, MAX_T><<<split.grid, kBlockThreads, 0, stream>>>(p, split.ksplit, false);
    }
    return launch_status();
  }
};

}  // namespace

const char* launch_gather_rows(const GatherRowsArgs& args, void* stream) {
  if (const char* problem = gemv::shape_problem(args.T, args.R, args.n)) return problem;
  if (args.R == 0 || args.T == 0 || args.n == 0) return nullptr;
  return gemv::dispatch(args.dtype, args.T, LaunchRows{args, static_cast<cudaStream_t>(stream)});
}

}  // namespace adaptive_kernels
