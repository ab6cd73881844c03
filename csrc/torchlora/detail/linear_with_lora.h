// linear_with_lora: a frozen nn.Linear and one LoRA adapter as a single op,
//   out = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T + scaling * lora_bias.
// The device-generic forward/backward (the base GEMM plus the lora_linear ops) serve CUDA and
// the CPU dtypes without a fused kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchlora::detail {

// grad_x, grad_weight, grad_A, grad_B, grad_bias, grad_lora_bias ([0] where not asked for).
using LinearWithLoraGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// out; shrunk (float32 [T, r]) and dropped_bits (int64 [dropped_words(T * in)], the format of
// dropped_bits_format.h) for backward: [0] without keep_shrunk, and dropped_bits [0] also
// without dropout.
using LinearWithLoraOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The frozen weight in x's dtype. The op also takes a float32 weight with 16-bit x: autocast
// leaves the frozen weight so on the CPU, whose fold reads it as it is and rounds
// W + scaling * B @ A once (no rounded copy of W is made, or kept for backward); the paths
// that do not fold round it here.
at::Tensor weight_like_x(const at::Tensor& weight, const at::Tensor& x);

LinearWithLoraOutputs linear_with_lora_forward_generic(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, bool keep_shrunk);

// output_mask: x, weight, lora_A, lora_B; the bias gradients follow needs_bias_grad / needs_lora_bias_grad.
// The generic backward regenerates the mask from the seed (dropped_bits is checked, not read).
LinearWithLoraGrads linear_with_lora_backward_generic(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shrunk,
    const at::Tensor& dropped_bits, const at::Tensor& lora_A, const at::Tensor& lora_B, bool needs_bias_grad, bool needs_lora_bias_grad, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, std::array<bool, 4> output_mask);

}  // namespace torchlora::detail
