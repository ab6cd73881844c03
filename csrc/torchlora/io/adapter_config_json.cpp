// adapter_config.json <-> io::LoraConfig. Validation and the written keys are the schema's
// (peft/config_schema.cpp); this file only maps the normalized JSON object onto the struct.
#include <torchlora/io/adapter_config.h>

#include <torchlora/peft/config_schema.h>
#include <torchlora/peft/config_schema_json.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <fstream>

namespace torchlora::io {
namespace {

using Json = nlohmann::ordered_json;

ModuleSelector selector_from(const Json& v) {
  if (v.is_string()) return ModuleSelector::from_regex(v.get<std::string>());
  if (v.is_array()) return ModuleSelector::from_names(v.get<std::vector<std::string>>());
  return {};
}

Json selector_json(const ModuleSelector& s) {
  switch (s.kind) {
    case ModuleSelector::Kind::Regex: return s.regex;
    case ModuleSelector::Kind::Names: return s.names;
    case ModuleSelector::Kind::None: break;
  }
  return nullptr;
}

std::vector<std::string> strings_from(const Json& v) {
  if (v.is_string()) return {v.get<std::string>()};
  if (v.is_array()) return v.get<std::vector<std::string>>();
  return {};
}

template <typename T>
std::optional<T> optional_from(const Json& v) {
  return v.is_null() ? std::nullopt : std::optional<T>(v.get<T>());
}

template <typename T>
Json optional_json(const std::optional<T>& v) {
  return v.has_value() ? Json(*v) : Json(nullptr);
}

std::string init_from(const Json& v) { return v.is_boolean() ? (v.get<bool>() ? "true" : "false") : v.get<std::string>(); }

Json init_json(const std::string& v) {
  if (v == "true") return true;
  if (v == "false") return false;
  return v;
}

// The struct from a normalized object (types already checked by the schema).
LoraConfig from_normalized(const Json& o) {
  LoraConfig c;
  c.peft_type = o["peft_type"].get<std::string>();
  c.r = o["r"].get<int64_t>();
  c.lora_alpha = o["lora_alpha"].get<double>();
  c.lora_dropout = o["lora_dropout"].get<double>();
  c.target_modules = selector_from(o["target_modules"]);
  c.exclude_modules = selector_from(o["exclude_modules"]);
  c.fan_in_fan_out = o["fan_in_fan_out"].get<bool>();
  c.bias = o["bias"].get<std::string>();
  c.use_rslora = o["use_rslora"].get<bool>();
  c.modules_to_save = strings_from(o["modules_to_save"]);
  const Json& layers = o["layers_to_transform"];
  if (layers.is_number_integer()) {
    c.layers_to_transform = std::vector<int64_t>{layers.get<int64_t>()};
  } else if (layers.is_array()) {
    c.layers_to_transform = layers.get<std::vector<int64_t>>();
  }
  c.layers_pattern = strings_from(o["layers_pattern"]);
  for (const auto& item : o["rank_pattern"].items()) c.rank_pattern.emplace_back(item.key(), item.value().get<int64_t>());
  for (const auto& item : o["alpha_pattern"].items()) c.alpha_pattern.emplace_back(item.key(), item.value().get<double>());
  c.lora_bias = o["lora_bias"].get<bool>();
  c.use_dora = o["use_dora"].get<bool>();
  c.init_lora_weights = init_from(o["init_lora_weights"]);
  c.inference_mode = o["inference_mode"].get<bool>();
  c.task_type = optional_from<std::string>(o["task_type"]);
  c.base_model_name_or_path = optional_from<std::string>(o["base_model_name_or_path"]);
  c.revision = optional_from<std::string>(o["revision"]);
  c.original_json = o.dump();
  return c;
}

// The struct as a config object (NaN stays NaN, to fail as a bad value of its field).
Json struct_json(const LoraConfig& c);

}  // namespace

std::string LoraConfig::to_json() const { return struct_json(*this).dump(); }

void LoraConfig::validate() const { peft::normalize_lora_config_object(struct_json(*this)); }

namespace {
Json struct_json(const LoraConfig& c) {
  Json obj;
  try {
    obj = Json::parse(c.original_json);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK_VALUE(false, "torchlora: LoraConfig::original_json is not valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(obj.is_object(), "torchlora: LoraConfig::original_json must hold a JSON object");
  obj["peft_type"] = c.peft_type;
  obj["r"] = c.r;
  obj["lora_alpha"] = c.lora_alpha;
  obj["lora_dropout"] = c.lora_dropout;
  obj["target_modules"] = selector_json(c.target_modules);
  obj["exclude_modules"] = selector_json(c.exclude_modules);
  obj["fan_in_fan_out"] = c.fan_in_fan_out;
  obj["bias"] = c.bias;
  obj["use_rslora"] = c.use_rslora;
  obj["modules_to_save"] = c.modules_to_save.empty() ? Json(nullptr) : Json(c.modules_to_save);
  obj["layers_to_transform"] = optional_json(c.layers_to_transform);
  obj["layers_pattern"] = c.layers_pattern.empty() ? Json(nullptr) : Json(c.layers_pattern);
  Json rank = Json::object(), alpha = Json::object();
  for (const auto& [k, v] : c.rank_pattern) rank[k] = v;
  for (const auto& [k, v] : c.alpha_pattern) alpha[k] = v;
  obj["rank_pattern"] = rank;
  obj["alpha_pattern"] = alpha;
  obj["lora_bias"] = c.lora_bias;
  obj["use_dora"] = c.use_dora;
  obj["init_lora_weights"] = init_json(c.init_lora_weights);
  obj["inference_mode"] = c.inference_mode;
  obj["task_type"] = optional_json(c.task_type);
  obj["base_model_name_or_path"] = optional_json(c.base_model_name_or_path);
  obj["revision"] = optional_json(c.revision);
  return obj;
}
}  // namespace

LoraConfig parse_adapter_config(const std::string& json_text, const std::string& source) {
  Json obj;
  try {
    obj = Json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK_VALUE(false, source, ": not valid JSON: ", e.what());
  }
  TORCH_CHECK_VALUE(obj.is_object(), source, ": expected a JSON object, got ", obj.type_name());
  obj.erase("runtime_config");  // runtime-only; PEFT drops it on load too
  return from_normalized(peft::normalize_lora_config_object(obj, source));
}

LoraConfig load_adapter_config(const std::string& path) {
  return from_normalized(Json::parse(peft::read_adapter_config_file(path)));
}

std::string adapter_config_to_json(const LoraConfig& c) {
  Json obj = struct_json(c);
  obj["inference_mode"] = true;  // a saved adapter loads for inference unless asked otherwise
  return peft::lora_config_object_to_peft_json(obj);
}

void save_adapter_config(const std::string& path, const LoraConfig& config) {
  const auto text = adapter_config_to_json(config);
  std::ofstream out(path, std::ios::trunc);
  TORCH_CHECK(out.good(), "torchlora: ", path, ": cannot open it for writing");
  out << text << '\n';
  out.flush();
  TORCH_CHECK(out.good(), "torchlora: ", path, ": write failed");
}

}  // namespace torchlora::io
