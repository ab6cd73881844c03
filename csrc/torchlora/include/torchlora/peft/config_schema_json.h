// The schema of config_schema.h on nlohmann_json objects, for code that has one already (the
// Python bindings, io::LoraConfig): unlike JSON text, an object can hold a NaN, which must
// fail as a bad value of its field rather than as a null. Needs nlohmann_json.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include <torchlora/export.h>

namespace torchlora::peft {

TORCHLORA_API nlohmann::ordered_json normalize_lora_config_object(const nlohmann::ordered_json& config,
                                                                  const std::string& source = "");
TORCHLORA_API std::string lora_config_object_to_peft_json(const nlohmann::ordered_json& config);

}  // namespace torchlora::peft
