// Input validation and output shapes of the DoRA operators, shared by their CPU, CUDA and Meta
// kernels. Sizes are SymInts so the Meta kernels serve torch.compile with dynamic shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <cstdint>
#include <optional>

namespace torchlora::detail {

// The weight read as a matrix of output rows: [out, in_features] (in_features = in * kh * kw for
// a conv kernel), and the adapter's rank.
struct DoraNormDims {
  c10::SymInt out_features, in_features, rank;
};

// weight [out, in] ([in, out] with fan_in_fan_out) or [out, in, kh, kw]; lora_A [r, in] or
// [r, in, kh, kw]; lora_B [out, r] or [out, r, 1, 1]; weight_sq_norm [out] in the accumulation dtype.
DoraNormDims check_dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    double scaling, bool fan_in_fan_out,
                                    const std::optional<at::Tensor>& weight_sq_norm, const char* op);

// weight [out, in] ([in, out] with fan_in_fan_out) or a conv kernel [out, ...]: returns out.
c10::SymInt check_dora_weight(const at::Tensor& weight, bool fan_in_fan_out, const char* op);

// z [..., C, ...] with C = z.size(dim); magnitude, weight_norm and bias with C elements each.
// Returns dim made non-negative.
int64_t check_dora_scale(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                         const std::optional<at::Tensor>& bias, int64_t dim, const char* op);

// The dtype DoRA's math accumulates in: float64 for float64, else float32.
inline at::ScalarType dora_accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace torchlora::detail
