// PEFT's reserved adapter names, the one definition for C++ and Python (torchlora._C.peft).
#pragma once

namespace torchlora::peft {

// The adapter name a mixed batch uses for "no adapter" (PEFT: "__base__").
inline constexpr const char* kBaseAdapterName = "__base__";
// The adapter name get_peft_model and from_pretrained use when none is given.
inline constexpr const char* kDefaultAdapterName = "default";

}  // namespace torchlora::peft
