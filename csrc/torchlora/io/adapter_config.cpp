// LoraConfig's per-module rules and validation (no JSON here: see adapter_config_json.cpp).
#include <torchlora/io/adapter_config.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <regex>

namespace torchlora::io {
namespace {

std::regex compile(const std::string& pattern, const char* field) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    TORCH_CHECK(false, "torchlora: ", field, " contains the invalid regular expression '", pattern, "': ", e.what());
  }
}

// PEFT: re.match(rf"(.*\.)?({key})$", module_name), i.e. key matches a dotted suffix.
template <typename T>
const T* find_pattern(const std::vector<std::pair<std::string, T>>& patterns, const std::string& module_name,
                      const char* field) {
  for (const auto& [key, value] : patterns) {
    if (std::regex_match(module_name, compile("(.*\\.)?(" + key + ")", field))) {
      return &value;
    }
  }
  return nullptr;
}

}  // namespace

ModuleSelector ModuleSelector::from_names(std::vector<std::string> names) {
  ModuleSelector s;
  s.kind = Kind::Names;
  s.names = std::move(names);
  return s;
}

ModuleSelector ModuleSelector::from_regex(std::string regex) {
  ModuleSelector s;
  s.kind = Kind::Regex;
  s.regex = std::move(regex);
  return s;
}

int64_t LoraConfig::rank_for(const std::string& module_name) const {
  const auto* r_found = find_pattern(rank_pattern, module_name, "rank_pattern");
  return r_found ? *r_found : r;
}

double LoraConfig::alpha_for(const std::string& module_name) const {
  const auto* a_found = find_pattern(alpha_pattern, module_name, "alpha_pattern");
  return a_found ? *a_found : lora_alpha;
}

double LoraConfig::scaling_for(const std::string& module_name) const {
  const auto rank = rank_for(module_name);
  TORCH_CHECK(rank > 0, "torchlora: the rank for module '", module_name, "' must be positive, got ", rank);
  const double alpha = alpha_for(module_name);
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

void LoraConfig::validate() const {
  TORCH_CHECK(peft_type == "LORA", "torchlora: peft_type must be \"LORA\", got \"", peft_type, "\"");
  TORCH_CHECK(r > 0, "torchlora: `r` should be a positive integer value but the value passed is ", r);
  TORCH_CHECK(std::isfinite(lora_alpha), "torchlora: lora_alpha must be finite, got ", lora_alpha);
  TORCH_CHECK(lora_dropout >= 0.0 && lora_dropout < 1.0, "torchlora: lora_dropout must be in [0, 1), got ",
              lora_dropout);
  TORCH_CHECK(bias == "none" || bias == "all" || bias == "lora_only",
              "torchlora: bias must be \"none\", \"all\" or \"lora_only\", got \"", bias, "\"");
  TORCH_CHECK(!use_dora, "torchlora: use_dora=true (DoRA) is not supported");
  for (const auto& [key, value] : rank_pattern) {
    TORCH_CHECK(value > 0, "torchlora: rank_pattern['", key, "'] must be positive, got ", value);
    compile(key, "rank_pattern");
  }
  for (const auto& [key, value] : alpha_pattern) {
    TORCH_CHECK(std::isfinite(value), "torchlora: alpha_pattern['", key, "'] must be finite");
    compile(key, "alpha_pattern");
  }
  if (target_modules.kind == ModuleSelector::Kind::Regex) {
    compile(target_modules.regex, "target_modules");
    TORCH_CHECK(!layers_to_transform.has_value(),
                "torchlora: `layers_to_transform` cannot be used when `target_modules` is a str.");
    TORCH_CHECK(layers_pattern.empty(), "torchlora: `layers_pattern` cannot be used when `target_modules` is a str.");
  }
  if (exclude_modules.kind == ModuleSelector::Kind::Regex) {
    compile(exclude_modules.regex, "exclude_modules");
  }
  TORCH_CHECK(layers_pattern.empty() || layers_to_transform.has_value(),
              "torchlora: When `layers_pattern` is specified, `layers_to_transform` must also be specified.");
}

}  // namespace torchlora::io
