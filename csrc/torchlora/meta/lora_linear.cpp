// Meta (shape-only) kernels of lora_linear, for FakeTensor, torch.compile and torch.export.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/checks.h"

namespace torchlora::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_meta(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto dims = detail::check_lora_linear(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  return {at::empty_symint(base_out.sym_sizes(), base_out.options()),
          at::empty_symint({dims.tokens, dims.rank}, x.options().dtype(detail::intermediate_dtype(x)))};
}

// base_out keeps its shape and dtype; only the float32 [T, r] shrunk is new.
at::Tensor lora_linear_forward_inplace_meta(at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A,
                                            const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                            double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto dims = detail::check_lora_linear(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  return at::empty_symint({dims.tokens, dims.rank}, x.options().dtype(detail::intermediate_dtype(x)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_meta(
    const at::Tensor& /*grad_out*/, const at::Tensor& x, const at::Tensor& /*shrunk*/, const at::Tensor& lora_A,
    const at::Tensor& lora_B, bool needs_lora_bias_grad, double /*scaling*/, double /*dropout_p*/,
    const std::optional<at::Tensor>& /*seed*/, std::array<bool, 3> output_mask) {
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  return {output_mask[0] ? at::empty_symint(x.sym_sizes(), x.options()) : none(),
          output_mask[1] ? at::empty_symint(lora_A.sym_sizes(), lora_A.options()) : none(),
          output_mask[2] ? at::empty_symint(lora_B.sym_sizes(), lora_B.options()) : none(),
          needs_lora_bias_grad ? at::empty_symint({lora_B.sym_size(0)}, lora_B.options()) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("_lora_linear_forward", &lora_linear_forward_meta);
  m.impl("_lora_linear_forward_", &lora_linear_forward_inplace_meta);
  m.impl("_lora_linear_backward", &lora_linear_backward_meta);
}

}  // namespace torchlora::meta
