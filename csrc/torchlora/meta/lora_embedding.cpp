// Meta (shape-only) kernels of lora_embedding.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/checks.h"

namespace torchlora::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_embedding_forward_meta(const at::Tensor& ids, const at::Tensor& base_out,
                                                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                               double scaling) {
  const auto dims = detail::check_lora_embedding(ids, base_out, lora_A, lora_B, scaling);
  return {at::empty_symint(base_out.sym_sizes(), base_out.options()),
          at::empty_symint({dims.tokens, dims.rank}, lora_A.options().dtype(detail::intermediate_dtype(lora_A)))};
}

std::tuple<at::Tensor, at::Tensor> lora_embedding_backward_meta(
    const at::Tensor& /*grad_out*/, const at::Tensor& /*ids*/, const at::Tensor& /*gathered*/,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double /*scaling*/, int64_t /*padding_idx*/,
    bool /*scale_grad_by_freq*/, std::array<bool, 2> output_mask) {
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, lora_A.options()); };
  return {output_mask[0] ? at::empty_symint(lora_A.sym_sizes(), lora_A.options()) : none(),
          output_mask[1] ? at::empty_symint(lora_B.sym_sizes(), lora_B.options()) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("_lora_embedding_forward", &lora_embedding_forward_meta);
  m.impl("_lora_embedding_backward", &lora_embedding_backward_meta);
}

}  // namespace torchlora::meta
