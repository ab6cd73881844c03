// PEFT's LoRA scaling, the one definition for C++ and Python (torchlora._C.peft.lora_scaling).
#pragma once

#include <cstdint>

#include <torchlora/export.h>

namespace torchlora::peft {

// lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA. Raises c10::ValueError unless r > 0
// and lora_alpha is a positive finite number.
TORCHLORA_API double lora_scaling(double lora_alpha, int64_t r, bool use_rslora);

// The checks lora_scaling makes, for callers that validate before they compute.
TORCHLORA_API void check_rank(int64_t r, const char* field = "r");
TORCHLORA_API void check_alpha(double lora_alpha, const char* field = "lora_alpha");

}  // namespace torchlora::peft
