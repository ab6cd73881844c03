#include "linear_with_lora.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/bitwise_left_shift.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include "checks.h"
#include "dropped_bits_format.h"
#include "op_handles.h"

namespace torchlora::detail {
namespace {

// The dropped bits (dropped_bits_format.h) of a [T, in] input, from the dropout_apply op of
// x's device. Packed a byte at a time (bool -> uint8 weights summed in uint8), so the
// temporaries stay at a byte per element; 8 little-endian bytes are a word.
at::Tensor pack_dropped_bits(const at::Tensor& x, int64_t tokens, int64_t in, double dropout_p,
                             const at::Tensor& seed) {
  const int64_t count = tokens * in, words = dropped_words(count);
  const at::Tensor dropped = dropout_apply_op().call(at::ones({count}, x.options()), dropout_p, seed).eq(0);
  const auto byte_options = x.options().dtype(at::kByte);
  const at::Tensor bits =
      at::constant_pad_nd(dropped.to(at::kByte), {0, words * kDroppedBitsPerWord - count}).view({words * 8, 8});
  const at::Tensor weight = at::bitwise_left_shift(at::ones({8}, byte_options), at::arange(8, byte_options));
  return at::sum(bits.mul(weight), {1}, false, at::kByte).view(at::kLong);  // distinct bits: the sum is their OR
}

}  // namespace

at::Tensor weight_like_x(const at::Tensor& weight, const at::Tensor& x) {
  return weight.scalar_type() == x.scalar_type() ? weight : weight.to(x.scalar_type());
}

LinearWithLoraOutputs linear_with_lora_forward_generic(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, bool keep_shrunk) {
  const auto dims = check_linear_with_lora(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  at::Tensor out = at::linear(x, weight_like_x(weight, x), bias);
  at::Tensor shrunk =
      lora_linear_forward_inplace_op().call(out, x, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  at::Tensor bits = keep_shrunk && dropout_p > 0.0
                        ? pack_dropped_bits(x, dims.tokens.expect_int(), dims.in_features.expect_int(), dropout_p, *seed)
                        : at::empty({0}, x.options().dtype(at::kLong));
  if (!keep_shrunk) shrunk = at::empty({0}, x.options().dtype(intermediate_dtype(x)));
  return {out, shrunk, bits};
}

LinearWithLoraGrads linear_with_lora_backward_generic(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shrunk,
    const at::Tensor& dropped_bits, const at::Tensor& lora_A, const at::Tensor& lora_B, bool needs_bias_grad, bool needs_lora_bias_grad, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, std::array<bool, 4> output_mask) {
  const auto dims = check_linear_with_lora_backward(grad_out, x, weight, shrunk, dropped_bits, lora_A, lora_B, scaling,
                                                    dropout_p, seed);
  const int64_t in = dims.in_features, out_features = dims.out_features;
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  auto [grad_x, grad_A, grad_B, grad_lora_bias] = lora_linear_backward_op().call(
      grad_out, x, shrunk, lora_A, lora_B, needs_lora_bias_grad, scaling, dropout_p, seed,
      {output_mask[0], output_mask[2], output_mask[3]});
  const at::Tensor g2 = grad_out.reshape({-1, out_features});
  if (output_mask[0]) {
    at::Tensor gx2 = grad_x.reshape({-1, in}).contiguous();  // a fresh tensor of this op's own
    grad_x = gx2.addmm_(g2, weight_like_x(weight, x)).view(x.sizes());
  }
  at::Tensor grad_weight = output_mask[1] ? at::mm(g2.t(), x.reshape({-1, in})).to(weight.scalar_type()) : none();
  at::Tensor grad_bias = needs_bias_grad ? at::sum(g2, {0}) : none();
  return {grad_x, grad_weight, grad_A, grad_B, grad_bias, needs_lora_bias_grad ? grad_lora_bias : none()};
}

}  // namespace torchlora::detail
