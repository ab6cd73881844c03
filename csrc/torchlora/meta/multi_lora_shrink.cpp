// Meta (shape-only) kernels of multi_lora_shrink and its backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/multi_lora_checks.h"

namespace torchlora::meta {
namespace {

at::Tensor multi_lora_shrink_meta(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& slot_index) {
  const auto d = detail::check_multi_lora_shrink(x, lora_A, slot_index);
  return at::empty_symint({d.tokens, d.rank}, x.options().dtype(detail::multi_intermediate_dtype(x.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> multi_lora_shrink_backward_meta(const at::Tensor& grad_h, const at::Tensor& x,
                                                                   const at::Tensor& lora_A,
                                                                   const at::Tensor& slot_index,
                                                                   std::array<bool, 2> output_mask) {
  detail::check_multi_lora_shrink_backward(grad_h, x, lora_A, slot_index);
  return {output_mask[0] ? at::empty_symint(x.sym_sizes(), x.options()) : at::empty({0}, x.options()),
          output_mask[1] ? at::empty_symint(lora_A.sym_sizes(), lora_A.options()) : at::empty({0}, lora_A.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_meta);
  m.impl("_multi_lora_shrink_backward", &multi_lora_shrink_backward_meta);
}

}  // namespace torchlora::meta
