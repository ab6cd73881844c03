// Meta (shape-only) kernels of linear_with_lora.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../detail/checks.h"
#include "../detail/dropped_bits_format.h"

namespace torchlora::meta {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_with_lora_forward_meta(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, bool keep_shrunk) {
  const auto dims = detail::check_linear_with_lora(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  std::vector<c10::SymInt> out_shape(x.sym_sizes().begin(), x.sym_sizes().end());
  out_shape.back() = dims.out_features;
  const auto shrunk_options = x.options().dtype(detail::intermediate_dtype(x));
  const bool with_bits = keep_shrunk && dropout_p > 0.0;
  return {at::empty_symint(out_shape, x.options()),
          at::empty_symint(keep_shrunk ? std::vector<c10::SymInt>{dims.tokens, dims.rank}
                                              : std::vector<c10::SymInt>{0},
                           shrunk_options),
          at::empty_symint(with_bits ? std::vector<c10::SymInt>{detail::dropped_words(dims.tokens * dims.in_features)}
                                     : std::vector<c10::SymInt>{0},
                           x.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_with_lora_backward_meta(
    const at::Tensor& /*grad_out*/, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& /*shrunk*/,
    const at::Tensor& /*dropped_bits*/, const at::Tensor& lora_A, const at::Tensor& lora_B, bool needs_bias_grad, bool needs_lora_bias_grad, double /*scaling*/,
    double /*dropout_p*/, const std::optional<at::Tensor>& /*seed*/, std::array<bool, 4> output_mask) {
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  auto like = [&](bool wanted, const at::Tensor& t) { return wanted ? at::empty_symint(t.sym_sizes(), t.options()) : none(); };
  auto bias_like = [&](bool wanted) { return wanted ? at::empty_symint({weight.sym_size(0)}, x.options()) : none(); };
  return {like(output_mask[0], x), like(output_mask[1], weight), like(output_mask[2], lora_A),
          like(output_mask[3], lora_B), bias_like(needs_bias_grad), bias_like(needs_lora_bias_grad)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("_linear_with_lora_forward", &linear_with_lora_forward_meta);
  m.impl("_linear_with_lora_backward", &linear_with_lora_backward_meta);
}

}  // namespace torchlora::meta
