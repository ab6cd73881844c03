// Meta (shape-only) kernels of multi_lora_expand, its in-place variant and its backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/multi_lora_checks.h"

namespace torchlora::meta {
namespace {

at::Tensor multi_lora_expand_meta(const at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                  const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                  const at::Tensor& slot_index) {
  detail::check_multi_lora_expand(base_out, h, lora_B, lora_bias, scale, slot_index);
  return at::empty_symint(base_out.sym_sizes(), base_out.options());
}

at::Tensor& multi_lora_expand_inplace_meta(at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                           const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                           const at::Tensor& slot_index) {
  detail::check_multi_lora_expand(base_out, h, lora_B, lora_bias, scale, slot_index, "torchlora.multi_lora_expand_");
  return base_out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_expand_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale, const at::Tensor& slot_index,
    std::array<bool, 4> output_mask) {
  const auto d = detail::check_multi_lora_expand(grad_out, h, lora_B, lora_bias, scale, slot_index,
                                                 "torchlora._multi_lora_expand_backward");
  const bool has_bias = lora_bias.has_value() && lora_bias->defined();
  return {output_mask[0] ? at::empty_symint(h.sym_sizes(), h.options()) : at::empty({0}, h.options()),
          output_mask[1] ? at::empty_symint(lora_B.sym_sizes(), lora_B.options()) : at::empty({0}, lora_B.options()),
          output_mask[2] && has_bias ? at::empty_symint({d.slots, d.out_features}, lora_B.options())
                                     : at::empty({0}, lora_B.options()),
          output_mask[3] ? at::empty_symint({d.slots}, scale.options()) : at::empty({0}, scale.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("multi_lora_expand", &multi_lora_expand_meta);
  m.impl("multi_lora_expand_", &multi_lora_expand_inplace_meta);
  m.impl("_multi_lora_expand_backward", &multi_lora_expand_backward_meta);
}

}  // namespace torchlora::meta
