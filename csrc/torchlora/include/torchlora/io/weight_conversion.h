// Adapters trained from an initialisation that rewrote the base weights (PiSSA, OLoRA) and saved
// as they are (PEFT's default): their factors apply to the residual W - scaling * B0 @ A0 that
// the initialisation left in the model, not to the original W the file's users have. PEFT
// recomputes that residual when it loads such a file; the C++ serving paths instead convert the
// adapter, with the original weights, to the plain LoRA adapter PEFT's
// save_pretrained(path_initial_model_for_weight_conversion=...) writes (rank 2r, same outputs),
// so that the base weights stay shared by every adapter.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

#include <torchlora/export.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/io/peft_adapter.h>

namespace torchlora::io {

// Whether the adapter's factors apply to rewritten base weights ("pissa", "olora") and must be
// converted before they are applied to the original model. Raises c10::ValueError, saying how
// to convert the file, for initialisations whose rewrite cannot be recomputed
// ("pissa_niter_<K>": randomised SVD; "corda", "lora_ga", "loftq") and for unknown values.
TORCHLORA_API bool applies_to_rewritten_base_weights(const LoraConfig& config, const std::string& source = "adapter");

// The original base weight of a module (by path), in the layout the model stores it: [out, in],
// or [in, out] for transformers Conv1D (config.fan_in_fan_out).
using BaseWeightLookup = std::function<at::Tensor(const std::string& module_path)>;

// The adapter for the original base weights: every Linear module's factors become
// A' = cat(A, A0), B' = cat(B, -B0) with A0, B0 recomputed from its original weight as the
// initialisation did; other modules (their base weights were not rewritten) are padded with
// zeros to the same rank. The config says r and alpha doubled (rank_pattern / alpha_pattern
// likewise) and init_lora_weights true; each module's scaling is unchanged. An adapter that
// needs no conversion is returned as it is.
TORCHLORA_API PeftAdapter adapter_for_original_weights(const PeftAdapter& adapter, const BaseWeightLookup& base_weight);

// The config of such a converted adapter.
TORCHLORA_API LoraConfig config_for_original_weights(const LoraConfig& config);

}  // namespace torchlora::io
