// LoraConfig's per-module rules (rank_pattern, alpha_pattern, scaling); validation is the
// schema's (peft/config_schema.cpp), JSON in adapter_config_json.cpp.
#include <torchlora/io/adapter_config.h>

#include <torchlora/peft/scaling.h>

#include <c10/util/Exception.h>

#include <regex>

namespace torchlora::io {
namespace {

std::regex compile(const std::string& pattern, const char* field) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    TORCH_CHECK_VALUE(false, field, " contains the invalid regular expression '", pattern, "': ", e.what());
  }
}

}  // namespace

bool pattern_key_matches(const std::string& key, const std::string& module_name) {
  return std::regex_match(module_name, compile("(.*\\.)?(" + key + ")", "rank_pattern / alpha_pattern"));
}

namespace {
// The first key in file order wins, as in PEFT.
template <typename T>
const T* find_pattern(const std::vector<std::pair<std::string, T>>& patterns, const std::string& module_name) {
  for (const auto& [key, value] : patterns) {
    if (pattern_key_matches(key, module_name)) return &value;
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
  const auto* r_found = find_pattern(rank_pattern, module_name);
  return r_found ? *r_found : r;
}

double LoraConfig::alpha_for(const std::string& module_name) const {
  const auto* a_found = find_pattern(alpha_pattern, module_name);
  return a_found ? *a_found : lora_alpha;
}

double LoraConfig::scaling_for(const std::string& module_name) const {
  return peft::lora_scaling(alpha_for(module_name), rank_for(module_name), use_rslora);
}

}  // namespace torchlora::io
