// PEFT's state-dict key names: the one definition for C++ and Python (torchlora._C.peft).
#pragma once

#include <string>

#include <torchlora/export.h>

namespace torchlora::peft {

// The prefix of every key in a saved adapter (the PeftModel -> LoraModel -> model path).
inline constexpr const char* kPeftKeyPrefix = "base_model.model.";

// A module state-dict key in PEFT's file form, with the adapter-name segment removed:
// "a.lora_A.<adapter>.weight" -> "a.lora_A.weight", "a.lora_embedding_A.<adapter>" ->
// "a.lora_embedding_A"; keys without that segment are returned unchanged.
TORCHLORA_API std::string remove_adapter_name(const std::string& key, const std::string& adapter_name);

}  // namespace torchlora::peft
