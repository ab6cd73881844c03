// Meta (shape-only) kernel of _linear_with_multi_lora_forward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/multi_lora_checks.h"

namespace torchlora::meta {
namespace {

at::Tensor linear_with_multi_lora_forward_meta(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& /*bias*/, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                               const at::Tensor& scale, const at::Tensor& slot_index) {
  constexpr const char* op = "torchlora._linear_with_multi_lora_forward";
  const auto d = detail::check_multi_lora_shrink(x, lora_A, slot_index, op);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features]");
  at::Tensor out = at::empty_symint({d.tokens, weight.sym_size(0)}, x.options());
  at::Tensor h = at::empty_symint({d.tokens, d.rank}, x.options().dtype(detail::multi_intermediate_dtype(x.scalar_type())));
  detail::check_multi_lora_expand(out, h, lora_B, lora_bias, scale, slot_index, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("_linear_with_multi_lora_forward", &linear_with_multi_lora_forward_meta);
}

}  // namespace torchlora::meta
