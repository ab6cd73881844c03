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
  // true / false as "true" / "false", else the string ("gaussian", "pissa", "olora", ...).
  std::string init_lora_weights = "true";
  bool inference_mode = true;
  std::optional<std::string> task_type;
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> revision;
  // The file's JSON object as read: keys this struct does not model (megatron_config,
  // loftq_config, ...) are written back unchanged by save_adapter_config.
  std::string original_json = "{}";

  // Rank, alpha and scaling for one module (full dotted name), applying rank_pattern and
  // alpha_pattern as PEFT does: a key matches when `(.*\.)?(key)$` matches the whole name.
  int64_t rank_for(const std::string& module_name) const;
  double alpha_for(const std::string& module_name) const;
  double scaling_for(const std::string& module_name) const;

  // Raises c10::Error naming the field for values PEFT rejects or torchlora cannot apply
  // (r <= 0, unknown bias, dropout outside [0, 1), use_dora, peft_type other than LORA,
  // layers_pattern without layers_to_transform, layer filters with a regex target).
  void validate() const;
};

// Parses adapter_config.json text; `source` names the file in errors.
TORCHLORA_API LoraConfig parse_adapter_config(const std::string& json_text, const std::string& source = "adapter_config.json");
TORCHLORA_API LoraConfig load_adapter_config(const std::string& path);
// JSON text PEFT can read back (its known keys only, sets as lists, inference_mode true).
TORCHLORA_API std::string adapter_config_to_json(const LoraConfig& config);
TORCHLORA_API void save_adapter_config(const std::string& path, const LoraConfig& config);

}  // namespace torchlora::io
