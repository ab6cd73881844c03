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

enum class TargetMatch : int { NotTarget = 0, Target = 1, Excluded = 2 };

// Excluded when exclude_modules match or the module lies inside a modules_to_save module;
// Target when target_modules match and layers_to_transform (if set) holds its layer index.
// ("all-linear" is expanded into names by the caller, which knows the module types.)
TORCHLORA_API TargetMatch match_target_module(const io::LoraConfig& config, const std::string& module_name);
TORCHLORA_API bool is_target_module(const io::LoraConfig& config, const std::string& module_name);

}  // namespace torchlora::apply
