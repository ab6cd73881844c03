// LoRA on nn.Parameters (LoraConfig.target_parameters, e.g. the fused expert weights of MoE
// models) read from a PeftAdapter and applied to a model's parameters by merging: C++ module
// trees have no layer for them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/io/peft_adapter.h>

namespace torchlora::io {

// The config's target_parameters (empty when unset).
TORCHLORA_API std::vector<std::string> target_parameters(const LoraConfig& config);

// One adapted parameter: its full name in the model and its factors (peft/parameter_lora.h).
struct ParameterLoraWeights {
  std::string parameter;
  at::Tensor lora_A;  // [r * experts, in]
  at::Tensor lora_B;  // [out, r * experts]
  double scaling = 1.0;
};

// The adapter's modules that adapt parameters, by their module path in the file, resolved
// against the model's parameters (full names in the model's order, with shapes): the module
// "<m>" / "<m>.base_layer" / ... adapts the targeted parameters "<m>.<name>" from the last one
// inwards, as PEFT nests its wrappers. Rank and scaling follow rank_pattern / alpha_pattern by
// the parameter's name. Raises c10::ValueError naming the module for a module with no such
// parameter, factors whose shapes do not fit it, or a rank that is not the config's.
TORCHLORA_API std::map<std::string, ParameterLoraWeights> parameter_adapters(
    const PeftAdapter& adapter, const std::vector<std::pair<std::string, std::vector<int64_t>>>& named_shapes,
    const std::vector<std::string>& transposed_modules = {});

// Adds the adapter's deltas (times `sign`: -1 removes a merged adapter) to the parameters in
// place, rounding once into each parameter's dtype; returns the names of the parameters
// changed. `transposed_modules` lists the modules whose 3-D parameters are [experts, in, out]
// (PEFT's `is_transposed`); others are [experts, out, in].
TORCHLORA_API std::vector<std::string> merge_parameter_adapters(
    const PeftAdapter& adapter, const std::vector<std::pair<std::string, at::Tensor>>& named_parameters,
    const std::vector<std::string>& transposed_modules = {}, double sign = 1.0);

}  // namespace torchlora::io
