// PEFT's LoRA on nn.Parameters (LoraConfig.target_parameters, PEFT's lora.ParamWrapper): which
// parameters a config targets, the factor shapes with experts, and the delta weight. The one
// definition for C++ and Python (torchlora._C.peft).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include <torchlora/export.h>

namespace torchlora::peft {

// How a targeted parameter is seen by LoRA. A 2-D parameter is [out, in] (one expert). A 3-D
// parameter is a stack of experts: [experts, out, in] as in transformers' fused MoE weights, or
// [experts, in, out] for modules that set `is_transposed`.
struct TORCHLORA_API ParameterLoraShape {
  int64_t num_experts = 1;
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool experts_in_out = false;  // a 3-D parameter stored [experts, in, out]
};

// Raises c10::ValueError unless the parameter has 2 or 3 dimensions.
TORCHLORA_API ParameterLoraShape parameter_lora_shape(const std::vector<int64_t>& param_shape, bool is_transposed);

// PEFT's factor shapes for rank r: lora_A [r * experts, in], lora_B [out, r * experts]; rows of
// lora_A are grouped by expert, columns of lora_B interleave experts (rank-major).
TORCHLORA_API std::vector<int64_t> parameter_lora_A_shape(const ParameterLoraShape& s, int64_t r);
TORCHLORA_API std::vector<int64_t> parameter_lora_B_shape(const ParameterLoraShape& s, int64_t r);

// scaling * B_e @ A_e for every expert, in the parameter's layout and the factors' dtype
// (differentiable). Raises c10::ValueError naming the shapes when the factors do not fit.
TORCHLORA_API at::Tensor parameter_delta_weight(const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                                const std::vector<int64_t>& param_shape, bool is_transposed);

// Whether a parameter (full dotted name, "<module>.<param>") is targeted: it equals an entry of
// target_parameters or ends with "." + an entry (PEFT's matching).
TORCHLORA_API bool parameter_is_targeted(const std::string& param_key, const std::vector<std::string>& targets);

// A module path without PEFT's wrapper segments ("experts.base_layer" -> "experts"), and how
// many there were: the parameters of one module are wrapped one inside the other, the first
// targeted parameter (in the module's order) innermost, so a LoRA module at nesting depth d of
// a module with n targeted parameters adapts the parameter at position n - 1 - d.
TORCHLORA_API std::string strip_base_layer(const std::string& module_path, int64_t* depth = nullptr);

}  // namespace torchlora::peft
