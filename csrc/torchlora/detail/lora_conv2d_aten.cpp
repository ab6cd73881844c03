#include "aten_math.h"

#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>

#include "checks.h"
#include "op_handles.h"

namespace torchlora::detail {
namespace {

at::Tensor dropped_input(const at::Tensor& x, double dropout_p, const std::optional<at::Tensor>& seed) {
  return dropout_p > 0.0 ? dropout_apply_op().call(x, dropout_p, *seed) : x;
}

}  // namespace

TensorPair lora_conv2d_forward_aten(const at::Tensor& x, const at::Tensor& base_out,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    const std::optional<at::Tensor>& lora_bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_lora_conv2d(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation, groups, scaling,
                    dropout_p, seed);
  const auto cd = compute_dtype(x);
  const at::Tensor shrunk =
      at::conv2d(dropped_input(x, dropout_p, seed).to(cd), lora_A.to(cd), {}, stride, padding, dilation, 1);
  std::optional<at::Tensor> bias;
  if (lora_bias.has_value() && lora_bias->defined()) bias = lora_bias->to(cd);
  const at::Tensor delta = at::conv2d(shrunk, lora_B.to(cd), bias, at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                                        at::IntArrayRef{1, 1}, groups);
  return {accumulate_into_base(base_out, delta, scaling), shrunk.to(intermediate_dtype(x))};
}

TensorQuad lora_conv2d_backward_aten(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& shrunk, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, bool needs_lora_bias_grad, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                     double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
                                     std::array<bool, 3> output_mask) {
  check_lora_conv2d_backward(grad_out, x, shrunk, lora_A, lora_B, scaling, dropout_p, seed);
  const auto cd = compute_dtype(x);
  const at::Tensor g = grad_out.to(cd);
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = none(), grad_A = none(), grad_B = none(), grad_lora_bias = none();
  const bool need_h = output_mask[0] || output_mask[1];
  const int64_t cout = lora_B.size(0);
  const std::vector<int64_t> bias_size{cout};
  auto [grad_h, gB, gbias] = at::convolution_backward(
      g, shrunk.to(cd), lora_B.to(cd), needs_lora_bias_grad ? at::OptionalIntArrayRef(bias_size) : std::nullopt, {1, 1},
      {0, 0}, {1, 1}, false, {0, 0}, groups, {need_h, output_mask[2], needs_lora_bias_grad});
  if (output_mask[2]) grad_B = gB.mul_(scaling).to(lora_B.scalar_type());
  if (needs_lora_bias_grad) grad_lora_bias = gbias.mul_(scaling).to(lora_B.scalar_type());
  if (need_h) {
    grad_h.mul_(scaling);
    auto [gx, gA, unused] = at::convolution_backward(
        grad_h, dropped_input(x, dropout_p, seed).to(cd), lora_A.to(cd), std::nullopt, stride, padding, dilation,
        false, {0, 0}, 1, {output_mask[0], output_mask[1], false});
    if (output_mask[1]) grad_A = gA.to(lora_A.scalar_type());
    if (output_mask[0]) grad_x = dropped_input(gx, dropout_p, seed).to(x.scalar_type());
  }
  return {grad_x, grad_A, grad_B, grad_lora_bias};
}

}  // namespace torchlora::detail
