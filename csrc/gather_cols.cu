// Split-K GEMV over gathered reduction columns, for the decode regime (1 to 16 tokens):
//   y[r, t, d] = sum_j a[r, t, j] * W[d, cols[r, j]]  over cols[r, j] >= 0.
//
// Each warp computes RPW output rows d of one batch row r over a slice of the reduction (the n
// listed columns); the KSPLIT warps of a group take interleaved 32-chunk slices and meet in
// shared memory. A chunk of VEC list entries that names VEC consecutive, 16-byte aligned
// columns (the case for whole heads and neuron groups in ascending order) is one 16-byte load
// per weight row; any other chunk is read element by element. Only listed columns are read
// (a padded, -1, entry costs no weight bytes and its activation is never read), in place
// through the weight's strides; products accumulate in fp32. Fastest for a row-major weight
// (nn.Linear's layout, column stride 1); other layouts take the element-wise path.
#include "gemv_common.cuh"

namespace adaptive_kernels {
namespace {

using namespace gemv;

template <typename T, int VEC, int MAX_T>
__global__ void __launch_bounds__(kBlockThreads)
    gather_cols_kernel(const GatherColsArgs p, const int ksplit, const bool a_packed) {
  constexpr int RPW = rows_per_warp<MAX_T>();
  __shared__ float partial[kBlockWarps][RPW * MAX_T];

  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int groups = kBlockWarps / ksplit;
  const int group = warp / ksplit;
  const int slice = warp % ksplit;
  const int64_t r = blockIdx.y;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x) * groups + group) * RPW;
  const int64_t* cols = p.cols + r * p.cols_stride_r;
  const T* a_r = a + r * p.a_stride_r;

  const T* w_row[RPW];
  bool valid[RPW];
  bool any = false;
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    valid[i] = d0 + i < p.D;
    any |= valid[i];
    w_row[i] = w + (valid[i] ? d0 + i : 0) * p.w_stride_d;
  }

  float acc[RPW][MAX_T];
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int t = 0; t < MAX_T; ++t) acc[i][t] = 0.f;

  if (any) {
    const int64_t chunks = ceil_div(p.n, VEC);
#pragma unroll 2
    for (int64_t c = static_cast<int64_t>(slice) * kWarpSize + lane; c < chunks; c += ksplit * kWarpSize) {
      const int64_t j = c * VEC;
      int64_t idx[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) idx[e] = j + e < p.n ? __ldg(cols + (j + e) * p.cols_stride_j) : -1;
      bool run = VEC > 1 && idx[0] >= 0 && idx[0] % VEC == 0;
#pragma unroll
      for (int e = 1; e < VEC; ++e) run = run && idx[e] == idx[0] + e;
      if (run) {  // VEC consecutive columns: one 16-byte load per weight row (w_stride_n == 1)
        float wv[RPW][VEC];
#pragma unroll
        for (int i = 0; i < RPW; ++i) {
          if (valid[i]) {
            load_vec<T, VEC, true>(w_row[i] + idx[0], wv[i]);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) wv[i][e] = 0.f;
          }
        }
#pragma unroll
        for (int t = 0; t < MAX_T; ++t) {
          if (t < p.T) {
            float av[VEC];
            load_activations<T, VEC>(a_r + t * p.a_stride_t + j * p.a_stride_j, p.a_stride_j, a_packed, av);
#pragma unroll
            for (int i = 0; i < RPW; ++i)
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[i][t] = fmaf(wv[i][e], av[e], acc[i][t]);
          }
        }
      } else {  // any other chunk: entry by entry, skipping padding
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (idx[e] < 0) continue;
          float wv[RPW];
#pragma unroll
          for (int i = 0; i < RPW; ++i) wv[i] = valid[i] ? to_float(w_row[i][idx[e] * p.w_stride_n]) : 0.f;
#pragma unroll
          for (int t = 0; t < MAX_T; ++t) {
            if (t < p.T) {
              const float av = to_float(a_r[t * p.a_stride_t + (j + e) * p.a_stride_j]);
#pragma unroll
              for (int i = 0; i < RPW; ++i) acc[i][t] = fmaf(wv[i], av, acc[i][t]);
            }
          }
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

  T* __restrict__ out = static_cast<T*>(p.out);
  for (int o = threadIdx.x; o < groups * RPW * MAX_T; o += kBlockThreads) {
    const int g = o / (RPW * MAX_T);
    const int i = (o / MAX_T) % RPW;
    const int t = o % MAX_T;
    const int64_t d = (static_cast<int64_t>(blockIdx.x) * groups + g) * RPW + i;
    if (t >= p.T || d >= p.D) continue;
    float y = 0.f;
    for (int s = 0; s < ksplit; ++s) y += partial[g * ksplit + s][i * MAX_T + t];
    out[r * p.out_stride_r + t * p.out_stride_t + d * p.out_stride_d] = from_float<T>(y);
  }
}

struct LaunchCols {
  const GatherColsArgs& p;
  cudaStream_t stream;

  template <typename T, int MAX_T>
  const char* operator()() const {
    constexpr int V = kVec16<T>;
    constexpr int RPW = rows_per_warp<MAX_T>();
    // 16-byte loads of a run of columns need column stride 1 and 16-byte aligned weight rows
    const bool w_packed = p.w_stride_n == 1 && p.w_stride_d % V == 0 && aligned16(p.weight);
    const bool a_packed = p.a_stride_j == 1 && (p.T == 1 || p.a_stride_t % V == 0) &&
                          (p.R == 1 || p.a_stride_r % V == 0) && aligned16(p.a);
    const Split split = split_outputs<RPW>(p.R, p.D, ceil_div(p.n, w_packed ? V : 1));
    if (w_packed) {
      gather_cols_kernel<T, V, MAX_T><<<split.grid, kBlockThreads, 0, stream>>>(p, split.ksplit, a_packed);
    } else {
      gather_cols_kernel<T, 1, MAX_T><<<split.grid, kBlockThreads, 0, stream>>>(p, split.ksplit, false);
    }
    return launch_status();
  }
};

}  // namespace

const char* launch_gather_cols(const GatherColsArgs& args, void* stream) {
  if (const char* problem = gemv::shape_problem(args.T, args.R, args.D)) return problem;
  if (args.R == 0 || args.T == 0 || args.D == 0) return nullptr;
  return gemv::dispatch(args.dtype, args.T, LaunchCols{args, static_cast<cudaStream_t>(stream)});
}

}  // namespace adaptive_kernels
