// CUDA kernels of dora_scale: out = g (z - bias) + bias with g = magnitude / weight_norm per
// channel, one element per thread over z seen as [outer, C, inner]. Backward: dz = g grad by the
// same indexing, and the per-channel sums R = sum grad (z - bias), S = sum grad through ATen
// reductions.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../detail/dora_checks.h"
#include "../detail/dora_math.h"

namespace torchlora::cuda {
namespace {

// out[e] = g[c] * (in[e] - b[c]) + b[c], c = (e / inner) % C; b may be null (zero).
template <typename scalar_t, typename acc_t>
__global__ void dora_channel_affine_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                           const acc_t* __restrict__ g, const acc_t* __restrict__ b, int64_t n,
                                           int64_t channels, int64_t inner) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t c = (e / inner) % channels;
    const acc_t bc = b ? b[c] : acc_t(0);
    out[e] = static_cast<scalar_t>(g[c] * (static_cast<acc_t>(in[e]) - bc) + bc);
  }
}

void launch_affine(const at::Tensor& in, at::Tensor& out, const at::Tensor& g, const at::Tensor& b,
                   const detail::DoraScaleShape& shape, const char* op) {
  const int64_t n = in.numel();
  if (n == 0) return;
  constexpr int threads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(in.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dora_channel_affine_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr, n, shape.channels, shape.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dora_scale_cuda(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                           const std::optional<at::Tensor>& bias, int64_t dim) {
  const int64_t d = detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, "torchlora.dora_scale");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto shape = detail::dora_scale_shape(z, d);
  const auto ct = detail::dora_accumulate_dtype(z.scalar_type());
  const at::Tensor g = detail::dora_channel_vector(magnitude, ct) / detail::dora_channel_vector(weight_norm, ct);
  const at::Tensor b = bias.has_value() && bias->defined() ? detail::dora_channel_vector(*bias, ct) : at::Tensor();
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty(z.sizes(), zc.options());
  launch_affine(zc, out, g, b, shape, "torchlora_dora_scale_cuda");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_scale_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& bias, int64_t dim, std::array<bool, 4> output_mask) {
  constexpr const char* op = "torchlora._dora_scale_backward";
  const int64_t d = detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, op);
  TORCH_CHECK_VALUE(grad_out.sizes() == z.sizes(), op, ": grad_out ", grad_out.sizes(), " must match z ", z.sizes());
  const c10::cuda::CUDAGuard guard(z.device());
  const auto shape = detail::dora_scale_shape(z, d);
  const auto ct = detail::dora_accumulate_dtype(z.scalar_type());
  const at::Tensor g = detail::dora_channel_vector(magnitude, ct) / detail::dora_channel_vector(weight_norm, ct);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? detail::dora_channel_vector(*bias, ct) : at::Tensor();
  const at::Tensor gc = grad_out.to(z.scalar_type()).contiguous();
  auto none = [](const at::Tensor& t) { return at::empty({0}, t.options()); };
  static constexpr int64_t kOuterInner[2] = {0, 2};

  at::Tensor grad_z = none(z);
  if (output_mask[0]) {
    grad_z = at::empty(z.sizes(), gc.options());
    launch_affine(gc, grad_z, g, at::Tensor(), shape, "torchlora_dora_scale_backward_cuda");
  }
  const bool need_r = output_mask[1] || output_mask[2];
  const bool need_s = output_mask[3] && has_bias;
  if (!need_r && !need_s) {
    return {grad_z, none(magnitude), none(weight_norm), has_bias ? none(*bias) : none(magnitude)};
  }
  const at::Tensor g3 = gc.view({shape.outer, shape.channels, shape.inner}).to(ct);
  at::Tensor R, S;
  if (need_r) {
    at::Tensor centred = z.contiguous().view({shape.outer, shape.channels, shape.inner}).to(ct);
    if (has_bias) centred = centred - b.view({1, shape.channels, 1});
    R = at::sum(g3 * centred, at::IntArrayRef(kOuterInner));
  }
  if (need_s) S = at::sum(g3, at::IntArrayRef(kOuterInner));
  auto [grad_m, grad_n, grad_b] = detail::dora_scale_vector_grads(R, S, magnitude, weight_norm, bias, output_mask);
  return {grad_z, grad_m, grad_n, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("dora_scale", &dora_scale_cuda);
  m.impl("_dora_scale_backward", &dora_scale_backward_cuda);
}

}  // namespace torchlora::cuda
