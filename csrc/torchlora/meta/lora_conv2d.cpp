// Meta (shape-only) kernels of lora_conv2d.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/checks.h"

namespace torchlora::meta {
namespace {

std::tuple<at::Tensor, at::Tensor> lora_conv2d_forward_meta(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto d = detail::check_lora_conv2d(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation,
                                           groups, scaling, dropout_p, seed);
  const auto format = x.suggest_memory_format();
  return {at::empty_symint(base_out.sym_sizes(), base_out.options().memory_format(base_out.suggest_memory_format())),
          at::empty_symint({d.batch, d.rank, d.out_h, d.out_w}, x.options().dtype(detail::intermediate_dtype(x)).memory_format(format))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_conv2d_backward_meta(
    const at::Tensor& /*grad_out*/, const at::Tensor& x, const at::Tensor& /*shrunk*/, const at::Tensor& lora_A,
    const at::Tensor& lora_B, bool needs_lora_bias_grad, at::IntArrayRef /*stride*/, at::IntArrayRef /*padding*/,
    at::IntArrayRef /*dilation*/, int64_t /*groups*/, double /*scaling*/, double /*dropout_p*/,
    const std::optional<at::Tensor>& /*seed*/, std::array<bool, 3> output_mask) {
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  return {output_mask[0] ? at::empty_symint(x.sym_sizes(), x.options().memory_format(x.suggest_memory_format()))
                         : none(),
          output_mask[1] ? at::empty_symint(lora_A.sym_sizes(), lora_A.options()) : none(),
          output_mask[2] ? at::empty_symint(lora_B.sym_sizes(), lora_B.options()) : none(),
          needs_lora_bias_grad ? at::empty_symint({lora_B.sym_size(0)}, lora_B.options()) : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("_lora_conv2d_forward", &lora_conv2d_forward_meta);
  m.impl("_lora_conv2d_backward", &lora_conv2d_backward_meta);
}

}  // namespace torchlora::meta
