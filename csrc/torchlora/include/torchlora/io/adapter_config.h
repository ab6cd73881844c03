// PEFT's LoraConfig as written in adapter_config.json, for C++ programs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torchlora/export.h>

namespace torchlora::io {

// target_modules / exclude_modules: unset, a list of names (a module matches an entry exactly
// or as a "."-suffix) or one regular expression that must match the whole module name.
struct TORCHLORA_API ModuleSelector {
  enum class Kind { None, Names, Regex };
  Kind kind = Kind::None;
  std::vector<std::string> names;
  std::string regex;

  static ModuleSelector from_names(std::vector<std::string> names);
  static ModuleSelector from_regex(std::string regex);
  bool is_set() const { return kind != Kind::None; }
};

struct TORCHLORA_API LoraConfig {
  std::string peft_type = "LORA";
  int64_t r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  bool fan_in_fan_out = false;
  std::string bias = "none";  // "none" | "all" | "lora_only"
  bool use_rslora = false;
  std::vector<std::string> modules_to_save;
  std::optional<std::vector<int64_t>> layers_to_transform;
  std::vector<std::string> layers_pattern;
  // Regex key -> value, in file order (the first matching key wins).
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  bool lora_bias = false;
  bool use_dora = false;
  // PEFT's init_lora_weights: "true", "false", or the method ("gaussian", "pissa", "olora", ...).
  std::string init_lora_weights = "true";
  bool inference_mode = true;
  std::optional<std::string> task_type;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> revision;
  // The config as read, every field present (peft::normalize_lora_config): fields this
  // struct does not model (megatron_core, ...) are written back unchanged.
  std::string original_json = "{}";

  // Rank, alpha and scaling for one module (full dotted name), applying rank_pattern and
  // alpha_pattern as PEFT does: a key matches when `(.*\.)?(key)$` matches the whole name.
  int64_t rank_for(const std::string& module_name) const;
  double alpha_for(const std::string& module_name) const;
  double scaling_for(const std::string& module_name) const;

  // Checks the config against PEFT's schema (peft/config_schema.h, the rules Python's
  // LoraConfig uses too); raises c10::Error naming the field.
  void validate() const;
  // The config as a JSON object with every PEFT field (original_json updated by this struct).
  std::string to_json() const;
};

// Whether a rank_pattern / alpha_pattern key applies to a module: PEFT's
// re.match(rf"(.*\.)?({key})$", module_name).
TORCHLORA_API bool pattern_key_matches(const std::string& key, const std::string& module_name);

// Parses adapter_config.json text; `source` names the file in errors. Unknown keys, bad values
// and options torchlora does not implement are errors, exactly as in Python.
TORCHLORA_API LoraConfig parse_adapter_config(const std::string& json_text, const std::string& source = "adapter_config.json");
TORCHLORA_API LoraConfig load_adapter_config(const std::string& path);
// JSON text PEFT can read back (its known keys only, sets as lists, inference_mode true).
TORCHLORA_API std::string adapter_config_to_json(const LoraConfig& config);
TORCHLORA_API void save_adapter_config(const std::string& path, const LoraConfig& config);

}  // namespace torchlora::io
