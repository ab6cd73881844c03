// Public C++ entry point of the torchlora.lora_conv3d operator (LoRA on a 3-D convolution).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

#include <torchlora/export.h>

namespace torchlora {

// out = base_out + scaling * conv1x1x1(conv3d(dropout_p(x), lora_A, stride, padding, dilation),
//                                       lora_B, lora_bias, groups)
//   x [N, in, D, H, W]   lora_A [r, in, kd, kh, kw]   lora_B [out, r / groups, 1, 1, 1]
//   base_out [N, out, D', H', W']   lora_bias [out]
//   seed: one-element int64 tensor, required when dropout_p > 0 (the mask is regenerated from it).
TORCHLORA_API at::Tensor lora_conv3d(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    double scaling, double dropout_p = 0.0, const std::optional<at::Tensor>& seed = std::nullopt);

}  // namespace torchlora
