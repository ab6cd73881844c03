// Which modules a LoraConfig targets, by PEFT's rules (no tensors involved).
#pragma once

#include <optional>
#include <string>

#include <torchlora/export.h>
#include <torchlora/io/adapter_config.h>

namespace torchlora::apply {

// A list selector matches a name that equals an entry or ends with "." + entry; a regex
// selector must match the whole name. An unset selector matches nothing.
TORCHLORA_API bool selector_matches(const io::ModuleSelector& selector, const std::string& module_name);

// The layer index PEFT reads from a module name: the number after the first
// ".<pattern>." (any "<x>." when `layers_pattern` is empty), or nullopt.
TORCHLORA_API std::optional<int64_t> layer_index(const std::string& module_name,
                                                 const std::vector<std::string>& layers_pattern);

// target_modules match, exclude_modules do not, and layers_to_transform (if set) contains
// the module's layer index.
TORCHLORA_API bool is_target_module(const io::LoraConfig& config, const std::string& module_name);

}  // namespace torchlora::apply
