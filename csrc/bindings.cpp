// CUDA implementations of the adaptive_kernels::cuda_* operators. Their schemas, fake (meta)
// implementations and FLOP formulas are defined in Python (adaptive_kernels/cuda_ext.py) before
// this library is loaded; this file checks arguments, allocates outputs and launches the
// kernels on the current stream. It includes only device-generic torch headers (no CUDA ones),
// so it compiles against any torch build.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "adaptive_kernels.h"

namespace adaptive_kernels {
namespace {

void* current_stream(const c10::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(device).native_handle();
}

DType element_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_on(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == first.device(), op, ": all tensors must be on one device; ", name, " is on ", t.device(),
              ", the first argument on ", first.device());
}

// Index lists as int64 (int32 lists are widened: a copy of the indices, never of weights).
at::Tensor index_list(const at::Tensor& idx, const char* op, const char* name) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, op, ": ", name,
                   " must be int64 (or int32), got ", idx.scalar_type());
  return idx.scalar_type() == at::kLong ? idx : idx.to(at::kLong);
}

// What both GEMV ops check alike: the token count, act's float dtype (returned) shared by the
// weight, and one CUDA device for act, weight and the index list.
DType check_gemv(const char* op, const at::Tensor& act, const char* act_name, const at::Tensor& weight,
                 const at::Tensor& index, const char* index_name) {
  TORCH_CHECK(act.size(1) <= kMaxDecodeTokens, op, ": the GEMV kernels take 1 to ", kMaxDecodeTokens,
              " tokens, got T = ", act.size(1));
  const DType dtype = element_type(act, op, act_name);
  TORCH_CHECK_TYPE(weight.scalar_type() == act.scalar_type(), op, ": weight must have ", act_name, "'s dtype ",
                   act.scalar_type(), ", got ", weight.scalar_type());
  check_on(act, act, op, act_name);
  check_on(weight, act, op, "weight");
  check_on(index, act, op, index_name);
  return dtype;
}

void check_status(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err); }

at::Tensor cuda_gather_rows_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rows_in,
                                   const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "cuda_gather_rows_linear";
  TORCH_CHECK(x.dim() == 3, op, ": x must be [R, T, D], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [N, D], got ", weight.sizes());
  TORCH_CHECK(rows_in.dim() == 2, op, ": rows must be [R, n], got ", rows_in.sizes());
  const int64_t R = x.size(0), T = x.size(1), D = x.size(2), N = weight.size(0), n = rows_in.size(1);
  TORCH_CHECK(weight.size(1) == D, op, ": weight must be [N, D] with D = ", D, " (x's last size), got ", weight.sizes());
  TORCH_CHECK(rows_in.size(0) == R, op, ": rows must have one list per row of x (", R, "), got ", rows_in.sizes());
  const DType dtype = check_gemv(op, x, "x", weight, rows_in, "rows");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [N] with N = ", N, ", got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                     ", got ", bias->scalar_type());
    check_on(*bias, x, op, "bias");
  }
  const c10::DeviceGuard guard(x.device());
  const at::Tensor rows = index_list(rows_in, op, "rows");
  at::Tensor out = at::empty({R, T, n}, x.options());
  if (out.numel() == 0) return out;
  GatherRowsArgs a{};
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.rows = rows.data_ptr<int64_t>();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.R = R, a.T = T, a.D = D, a.n = n;
  a.x_stride_r = x.stride(0), a.x_stride_t = x.stride(1), a.x_stride_d = x.stride(2);
  a.w_stride_n = weight.stride(0), a.w_stride_d = weight.stride(1);
  a.rows_stride_r = rows.stride(0), a.rows_stride_j = rows.stride(1);
  a.bias_stride = bias.has_value() ? bias->stride(0) : 0;
  a.out_stride_r = out.stride(0), a.out_stride_t = out.stride(1), a.out_stride_j = out.stride(2);
  a.dtype = dtype;
  check_status(launch_gather_rows(a, current_stream(x.device())), op);
  return out;
}

at::Tensor cuda_gather_cols_linear(const at::Tensor& act, const at::Tensor& weight, const at::Tensor& cols_in) {
  constexpr const char* op = "cuda_gather_cols_linear";
  TORCH_CHECK(act.dim() == 3, op, ": a must be [R, T, n], got ", act.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [D, N], got ", weight.sizes());
  TORCH_CHECK(cols_in.dim() == 2, op, ": cols must be [R, n], got ", cols_in.sizes());
  const int64_t R = act.size(0), T = act.size(1), n = act.size(2), D = weight.size(0);
  TORCH_CHECK(cols_in.size(0) == R && cols_in.size(1) == n, op, ": cols must be [R, n] = [", R, ", ", n,
              "] (a's first and last sizes), got ", cols_in.sizes());
  const DType dtype = check_gemv(op, act, "a", weight, cols_in, "cols");
  const c10::DeviceGuard guard(act.device());
  if (n == 0) return at::zeros({R, T, D}, act.options());
  const at::Tensor cols = index_list(cols_in, op, "cols");
  at::Tensor out = at::empty({R, T, D}, act.options());
  if (out.numel() == 0) return out;
  GatherColsArgs a{};
  a.a = act.data_ptr();
  a.weight = weight.data_ptr();
  a.cols = cols.data_ptr<int64_t>();
  a.out = out.data_ptr();
  a.R = R, a.T = T, a.D = D, a.n = n;
  a.a_stride_r = act.stride(0), a.a_stride_t = act.stride(1), a.a_stride_j = act.stride(2);
  a.w_stride_d = weight.stride(0), a.w_stride_n = weight.stride(1);
  a.cols_stride_r = cols.stride(0), a.cols_stride_j = cols.stride(1);
  a.out_stride_r = out.stride(0), a.out_stride_t = out.stride(1), a.out_stride_d = out.stride(2);
  a.dtype = dtype;
  check_status(launch_gather_cols(a, current_stream(act.device())), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_compact_plan(
    const at::Tensor& heads_in, const at::Tensor& groups_in, int64_t head_dim, int64_t num_kv_heads,
    int64_t intermediate_size) {
  constexpr const char* op = "cuda_compact_plan";
  TORCH_CHECK(heads_in.dim() == 3 && heads_in.scalar_type() == at::kBool, op,
              ": heads must be a bool tensor [B, L, H], got ", heads_in.scalar_type(), " ", heads_in.sizes());
  TORCH_CHECK(groups_in.dim() == 3 && groups_in.scalar_type() == at::kBool, op,
              ": groups must be a bool tensor [B, L, G], got ", groups_in.scalar_type(), " ", groups_in.sizes());
  const int64_t B = heads_in.size(0), L = heads_in.size(1), H = heads_in.size(2), G = groups_in.size(2);
  TORCH_CHECK(groups_in.size(0) == B && groups_in.size(1) == L, op, ": heads ", heads_in.sizes(), " and groups ",
              groups_in.sizes(), " must agree on [B, L]");
  TORCH_CHECK(H >= 1 && H <= kMaxUnits && G >= 1 && G <= kMaxUnits, op, ": H and G must lie in [1, ", kMaxUnits,
              "], got H = ", H, ", G = ", G);
  TORCH_CHECK(head_dim >= 1, op, ": head_dim must be positive, got ", head_dim);
  TORCH_CHECK(num_kv_heads >= 1 && H % num_kv_heads == 0, op, ": num_kv_heads must divide the ", H,
              " heads, got ", num_kv_heads);
  TORCH_CHECK(intermediate_size >= 0 && intermediate_size < (int64_t{1} << 31), op,
              ": intermediate_size must lie in [0, 2^31), got ", intermediate_size);
  check_on(heads_in, heads_in, op, "heads");
  check_on(groups_in, heads_in, op, "groups");
  const c10::DeviceGuard guard(heads_in.device());
  const at::Tensor heads = heads_in.contiguous(), groups = groups_in.contiguous();
  const auto opts = heads.options().dtype(at::kLong);
  at::Tensor q_rows = at::empty({B, L, H * head_dim}, opts);
  at::Tensor kv_rows = at::empty({B, L, num_kv_heads * head_dim}, opts);
  at::Tensor q_to_kv = at::empty({B, L, H}, opts);
  at::Tensor mlp_rows = at::empty({B, L, intermediate_size}, opts);
  at::Tensor counts = at::empty({B, L, 3}, opts);
  CompactPlanArgs a{};
  a.heads = heads.data_ptr<bool>();
  a.groups = groups.data_ptr<bool>();
  a.P = B * L, a.H = H, a.G = G, a.Hkv = num_kv_heads, a.head_dim = head_dim, a.M = intermediate_size;
  a.q_rows = q_rows.data_ptr<int64_t>();
  a.kv_rows = kv_rows.data_ptr<int64_t>();
  a.q_to_kv = q_to_kv.data_ptr<int64_t>();
  a.mlp_rows = mlp_rows.data_ptr<int64_t>();
  a.counts = counts.data_ptr<int64_t>();
  check_status(launch_compact_plan(a, current_stream(heads.device())), op);
  return {q_rows, kv_rows, q_to_kv, mlp_rows, counts};
}

}  // namespace
}  // namespace adaptive_kernels

TORCH_LIBRARY_IMPL(adaptive_kernels, CUDA, m) {
  m.impl("cuda_gather_rows_linear", &adaptive_kernels::cuda_gather_rows_linear);
  m.impl("cuda_gather_cols_linear", &adaptive_kernels::cuda_gather_cols_linear);
  m.impl("cuda_compact_plan", &adaptive_kernels::cuda_compact_plan);
}
