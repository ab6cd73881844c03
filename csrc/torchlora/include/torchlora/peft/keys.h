// PEFT's state-dict key names: the one definition for C++ and Python (torchlora._C.peft).
#pragma once

#include <array>
#include <string>

#include <torchlora/export.h>

namespace torchlora::peft {

// The prefix of every key in a saved adapter (the PeftModel -> LoraModel -> model path).
inline constexpr const char* kPeftKeyPrefix = "base_model.model.";

// The tensors of one LoRA layer under PEFT's local names. In a model each container (lora_A,
// ...) holds one entry per adapter ("lora_A.<adapter>.weight"); in a file the adapter name is
// left out ("lora_A.weight"). DoRA's magnitude is "lora_magnitude_vector.<adapter>.weight" in a
// model and "lora_magnitude_vector" in a file.
inline constexpr std::array<const char*, 6> kLoraTensorNames = {
    "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"};

// A model state-dict key -> its key in a PEFT file: "<path>.lora_A.<adapter>.weight" ->
// "base_model.model.<path>.lora_A.weight"; keys that are not LoRA tensors (modules_to_save
// copies, biases, embedding layers) only get the prefix (none with with_prefix=false, as PEFT
// does for a model from inject_adapter_in_model).
TORCHLORA_API std::string to_peft_key(const std::string& module_key, const std::string& adapter_name,
                                      bool with_prefix = true);

// The inverse: a file key (with or without the prefix) -> the model key, with `adapter_name`
// put back into LoRA tensor keys.
TORCHLORA_API std::string from_peft_key(const std::string& peft_key, const std::string& adapter_name);

// For a file key (prefix removed) that ends in one of kLoraTensorNames: the index of that name
// and the module path before it; -1 (and the key unchanged) otherwise.
TORCHLORA_API int split_lora_key(const std::string& key, std::string* module_path);

}  // namespace torchlora::peft
