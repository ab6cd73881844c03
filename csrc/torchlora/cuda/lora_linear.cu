// CUDA kernels of lora_linear: the low-rank path as custom kernels, the dropout mask drawn in
// the kernels from (seed, row-major index in the [T, in] view) and regenerated in backward,
// never stored.
//   forward   shrink  s = keep(x) A^T / (1 - p)             [T, r] float32 (split over in_features
//                                                          for few tokens, summed by the expand)
//             expand  out = base_out + scaling (s B^T + lora_bias)
//   backward  dB (+ dbias) = scaling g^T s                 column reduce over tokens
//             ds = scaling g B                             shrink kernel with B as weight
//             dx = keep(ds A) / (1 - p)                    expand kernel with A as weight
//             dA = ds^T keep(x) / (1 - p)                  column reduce over tokens
// float64, a base_out of another dtype and empty shapes take the ATen path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../detail/aten_math.h"
#include "../detail/checks.h"
#include "lowrank_kernels.cuh"

namespace torchlora::cuda {
namespace {

constexpr const char* kForwardOp = "torchlora._lora_linear_forward";
constexpr const char* kBackwardOp = "torchlora._lora_linear_backward";

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_cuda(
    const at::Tensor& x,         // [..., in]
    const at::Tensor& base_out,  // [..., out]
    const at::Tensor& lora_A,    // [r, in]
    const at::Tensor& lora_B,    // [out, r]
    const std::optional<at::Tensor>& lora_bias,  // [out]
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto dims = detail::check_lora_linear(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  const int64_t T = dims.tokens.expect_int(), K = dims.in_features.expect_int();
  const int64_t R = dims.rank.expect_int(), N = dims.out_features.expect_int();
  if (!has_kernel_dtype(x.scalar_type()) || base_out.scalar_type() != x.scalar_type() || T == 0 || K == 0 ||
      N == 0) {
    return detail::lora_linear_forward_aten(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({T, K}).contiguous();
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const at::Tensor base2 = base_out.reshape({T, N}).contiguous();
  const bool has_lora_bias = lora_bias.has_value() && lora_bias->defined();
  const at::Tensor bias = has_lora_bias ? lora_bias->contiguous() : at::Tensor();
  const DropoutParams dropout = make_dropout_params(dropout_p, seed);

  // s partials [splits, T, R]; A[r, k] = A[r * K + k]
  const at::Tensor partial = launch_shrink(x2, A, K, 1, R, dropout_scale(dropout_p), dropout, kForwardOp);
  const int64_t splits = partial.size(0);
  const at::Tensor shrunk = splits == 1 ? partial.view({T, R}) : at::empty({T, R}, partial.options());
  at::Tensor out = at::empty({T, N}, base2.options());
  dispatch_kernel_dtype(x.scalar_type(), kForwardOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    // B[n, r] = B[n * R + r]; the expand sums the partials and, when split, stores s
    launch_expand<scalar_t>(out, &base2,
                            partial_source<scalar_t>(partial, splits > 1 ? shrunk.mutable_data_ptr<float>() : nullptr),
                            R, B, R, 1, has_lora_bias ? &bias : nullptr, static_cast<float>(scaling), DropoutParams{},
                            kForwardOp);
  });
  return {out.view(base_out.sizes()), shrunk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_out,  // [..., out]
    const at::Tensor& x,         // [..., in]
    const at::Tensor& shrunk,    // [T, r] float32, from the forward
    const at::Tensor& lora_A, const at::Tensor& lora_B, bool needs_lora_bias_grad, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 3> output_mask) {
  const auto dims = detail::check_lora_linear_backward(grad_out, x, shrunk, lora_A, lora_B, scaling, dropout_p, seed,
                                                       kBackwardOp);
  const int64_t T = dims.tokens, K = dims.in_features, R = dims.rank, N = dims.out_features;
  if (!has_kernel_dtype(x.scalar_type()) || T == 0 || K == 0 || N == 0) {
    return detail::lora_linear_backward_aten(grad_out, x, shrunk, lora_A, lora_B, needs_lora_bias_grad, scaling, dropout_p,
                                             seed, output_mask);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor g = grad_out.reshape({T, N}).to(x.scalar_type()).contiguous();
  const at::Tensor s = shrunk.to(at::kFloat).contiguous();
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const DropoutParams dropout = make_dropout_params(dropout_p, seed);
  const float keep_scale = dropout_scale(dropout_p);
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = none(), grad_A = none(), grad_B = none(), grad_lora_bias = none();

  if (output_mask[2] || needs_lora_bias_grad) {
    const at::Tensor dB = output_mask[2] ? at::empty({N, R}, B.options()) : at::Tensor();
    if (needs_lora_bias_grad) grad_lora_bias = at::empty({N}, B.options());
    // dB[n, r] = dB[n * R + r]
    launch_column_reduce(g, s, static_cast<float>(scaling), DropoutParams{}, dB, R, 1,
                         needs_lora_bias_grad ? &grad_lora_bias : nullptr, kBackwardOp);
    if (output_mask[2]) grad_B = dB;
  }
  if (output_mask[0] || output_mask[1]) {
    // ds partials: the shrink with W[r, n] = B[n * R + r]
    const at::Tensor partial = launch_shrink(g, B, 1, R, R, static_cast<float>(scaling), DropoutParams{}, kBackwardOp);
    const int64_t splits = partial.size(0);
    at::Tensor ds;
    if (output_mask[0]) {
      if (output_mask[1]) ds = splits == 1 ? partial.view({T, R}) : at::empty({T, R}, partial.options());
      const at::Tensor dx = at::empty({T, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
      dispatch_kernel_dtype(x.scalar_type(), kBackwardOp, [&](auto tag) {
        using scalar_t = typename decltype(tag)::type;
        // W[k, r] = A[r * K + k]; the dx expand also stores the summed ds for dA
        float* write_back = (output_mask[1] && splits > 1) ? ds.mutable_data_ptr<float>() : nullptr;
        launch_expand<scalar_t>(dx, nullptr, partial_source<scalar_t>(partial, write_back), R, A, 1, K, nullptr,
                                keep_scale, dropout, kBackwardOp);
      });
      grad_x = dx.view(x.sizes());
    } else {
      ds = reduce_partials(partial);
    }
    if (output_mask[1]) {
      const at::Tensor x2 = x.reshape({T, K}).contiguous();
      grad_A = at::empty({R, K}, A.options());
      // dA[r, k] = dA[k + r * K]
      launch_column_reduce(x2, ds, keep_scale, dropout, grad_A, 1, K, nullptr, kBackwardOp);
    }
  }
  return {grad_x, grad_A, grad_B, grad_lora_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("_lora_linear_forward", &lora_linear_forward_cuda);
  m.impl("_lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace torchlora::cuda
