// Meta (shape-only) kernels of the DoRA operators.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/dora_checks.h"

namespace torchlora::meta {
namespace {

at::Tensor dora_weight_norm_meta(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scaling, bool fan_in_fan_out, const std::optional<at::Tensor>& weight_sq_norm) {
  const auto dims = detail::check_dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm,
                                                   "torchlora.dora_weight_norm");
  return at::empty_symint({dims.out_features}, lora_A.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_weight_norm_backward_meta(
    const at::Tensor& /*grad_norm*/, const at::Tensor& norm, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double /*scaling*/, bool /*fan_in_fan_out*/, bool /*has_sq_norm*/,
    std::array<bool, 4> output_mask) {
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [](const at::Tensor& t) { return at::empty({0}, t.options()); };
  const auto acc = lora_A.options().dtype(detail::dora_accumulate_dtype(lora_A.scalar_type()));
  return {output_mask[0] ? at::empty_symint(weight.sym_sizes(), weight.options()) : none(weight),
          output_mask[1] ? at::empty_symint(lora_A.sym_sizes(), lora_A.options()) : none(lora_A),
          output_mask[2] ? at::empty_symint(lora_B.sym_sizes(), lora_B.options()) : none(lora_B),
          output_mask[3] ? at::empty_symint({norm.sym_numel()}, acc) : at::empty({0}, acc)};
}

at::Tensor dora_scale_meta(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                           const std::optional<at::Tensor>& bias, int64_t dim) {
  detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, "torchlora.dora_scale");
  return at::empty_symint(z.sym_sizes(), z.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_scale_backward_meta(
    const at::Tensor& /*grad_out*/, const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& bias, int64_t dim, std::array<bool, 4> output_mask) {
  detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, "torchlora._dora_scale_backward");
  auto none = [](const at::Tensor& t) { return at::empty({0}, t.options()); };
  const bool has_bias = bias.has_value() && bias->defined();
  return {output_mask[0] ? at::empty_symint(z.sym_sizes(), z.options()) : none(z),
          output_mask[1] ? at::empty_symint(magnitude.sym_sizes(), magnitude.options()) : none(magnitude),
          output_mask[2] ? at::empty_symint(weight_norm.sym_sizes(), weight_norm.options()) : none(weight_norm),
          output_mask[3] && has_bias ? at::empty_symint(bias->sym_sizes(), bias->options())
                                     : none(has_bias ? *bias : magnitude)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("dora_weight_norm", &dora_weight_norm_meta);
  m.impl("_dora_weight_norm_backward", &dora_weight_norm_backward_meta);
  m.impl("dora_scale", &dora_scale_meta);
  m.impl("_dora_scale_backward", &dora_scale_backward_meta);
}

}  // namespace torchlora::meta
