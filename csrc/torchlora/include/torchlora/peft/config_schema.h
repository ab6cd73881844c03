// PEFT's LoraConfig schema: every field PEFT 0.21 knows, its default, its type and range, the
// options torchlora does not implement, and which keys adapter_config.json carries. The one
// definition for C++ (io::parse_adapter_config) and Python (torchlora.LoraConfig via _C.peft).
//
// Configs cross this API as JSON text (an object of field -> value), so the header needs no
// JSON library. Errors are c10::TypeError (wrong type), c10::ValueError (bad value, unknown key,
// bad combination) or c10::NotImplementedError (a PEFT option torchlora lacks), each naming the
// field; `source` (a file path, or empty) starts the message.
#pragma once

#include <string>
#include <vector>

#include <torchlora/export.h>

namespace torchlora::peft {

struct ConfigField {
  std::string name;
  std::string default_json;  // PEFT's default, as JSON text
  bool supported;            // false: accepted only at its default (NotImplementedError otherwise)
  bool written;              // part of adapter_config.json
  bool baseline;             // read by PEFT since ~0.10: written even at its default
};

// target_modules="all-linear" (any case): every linear layer but the output head.
TORCHLORA_API bool is_all_linear(const std::string& target_modules);

// What an init_lora_weights value means ("true" / "false" stand for the bools).
enum class InitMethod {
  Standard,     // true, false, "gaussian" (any case): A and B only
  Pissa,        // "pissa": exact SVD of the base weight
  PissaNiter,   // "pissa_niter_<K>": randomised SVD
  Olora,        // "olora" (any case): QR of the base weight
  Unsupported,  // a PEFT method torchlora does not implement ("loftq", "eva", "corda", "lora_ga", "orthogonal")
  Unknown,      // not a PEFT value
};
TORCHLORA_API InitMethod init_lora_weights_method(const std::string& value);

// Every LoraConfig field, in PEFT's order.
TORCHLORA_API const std::vector<ConfigField>& lora_config_fields();

// The task types PEFT knows (TaskType values).
TORCHLORA_API const std::vector<std::string>& task_types();

// Validates a config object. Keys not in lora_config_fields() are an error; missing keys take
// their defaults. Returns the object with every field present and peft_type "LORA".
TORCHLORA_API std::string normalize_lora_config(const std::string& config_json, const std::string& source = "");

// adapter_config.json content for a config object (validated first): only keys PEFT knows;
// keys newer than PEFT ~0.10 only when they differ from their default (older PEFT refuses
// keys it does not know); peft_type "LORA"; pretty-printed.
TORCHLORA_API std::string lora_config_to_peft_json(const std::string& config_json);

// The adapter_config.json at `path`, parsed and normalized (runtime_config, which PEFT also
// drops on load, is removed first; peft_type must be present). Errors name the file.
TORCHLORA_API std::string read_adapter_config_file(const std::string& path);

}  // namespace torchlora::peft
