// The device-generic parts of the DoRA operators, written with ATen calls: the GEMMs of the weight
// norm (shared by the CPU and CUDA kernels, which differ only in the per-row combination), its
// gradient, and the per-channel reductions of dora_scale's backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchlora::detail {

// What the per-row combination of dora_weight_norm reads, all contiguous in the accumulation
// dtype: n_i = sqrt(max(0, sq_i + 2s WA_i . B_i + s^2 BG_i . B_i)).
struct DoraNormTerms {
  at::Tensor weight_a;   // W A^T        [out, r]
  at::Tensor b_gram;     // B (A A^T)    [out, r]
  at::Tensor lora_b;     // B            [out, r]
  at::Tensor sq_norm;    // ||W_i||^2    [out]
};

// Checks the operands, then the GEMMs (half/bfloat16 weights upcast a block of rows at a time).
DoraNormTerms dora_norm_terms(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              double scaling, bool fan_in_fan_out, const std::optional<at::Tensor>& weight_sq_norm,
                              const char* op);

// The weight as its matrix of output rows [out, K] (a view where the layout allows).
at::Tensor dora_weight_rows(const at::Tensor& weight, bool fan_in_fan_out);

// ||W_i||^2 [out] in `dtype`, a block of rows at a time.
at::Tensor dora_rows_sq_norm(const at::Tensor& rows, at::ScalarType dtype);

// _dora_weight_norm_backward on any device (empty [0] tensors where not asked for).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_weight_norm_backward_aten(
    const at::Tensor& grad_norm, const at::Tensor& norm, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, bool fan_in_fan_out, bool has_sq_norm, std::array<bool, 4> output_mask);

// z seen as [outer, C, inner] around dimension `dim` (non-negative).
struct DoraScaleShape {
  int64_t outer, channels, inner;
};
DoraScaleShape dora_scale_shape(const at::Tensor& z, int64_t dim);

// The per-channel vectors of dora_scale, flattened, contiguous, in the accumulation dtype.
at::Tensor dora_channel_vector(const at::Tensor& t, at::ScalarType dtype);

// The gradients of magnitude, weight_norm and bias from the per-channel sums
// R = sum grad * (z - bias) and S = sum grad (either may be undefined when not needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_scale_vector_grads(
    const at::Tensor& R, const at::Tensor& S, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& bias, std::array<bool, 4> output_mask);

}  // namespace torchlora::detail
