// adapter_config.json <-> LoraConfig (nlohmann_json).
#include <torchlora/io/adapter_config.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace torchlora::io {
namespace {

using Json = nlohmann::ordered_json;

struct Reader {
  const Json& obj;
  const std::string& source;

  const Json* get(const char* key) const {
    auto it = obj.find(key);
    return (it == obj.end() || it->is_null()) ? nullptr : &*it;
  }
  [[noreturn]] void fail(const char* key, const char* expected, const Json& value) const {
    TORCH_CHECK(false, "torchlora: ", source, ": field '", key, "' must be ", expected, ", got ", value.dump());
  }
  void read(const char* key, int64_t& out) const {
    if (const auto* v = get(key)) {
      if (!v->is_number_integer()) fail(key, "an integer", *v);
      out = v->get<int64_t>();
    }
  }
  void read(const char* key, double& out) const {
    if (const auto* v = get(key)) {
      if (!v->is_number()) fail(key, "a number", *v);
      out = v->get<double>();
    }
  }
  void read(const char* key, bool& out) const {
    if (const auto* v = get(key)) {
      if (!v->is_boolean()) fail(key, "true or false", *v);
      out = v->get<bool>();
    }
  }
  void read(const char* key, std::string& out) const {
    if (const auto* v = get(key)) {
      if (!v->is_string()) fail(key, "a string", *v);
      out = v->get<std::string>();
    }
  }
  void read(const char* key, std::optional<std::string>& out) const {
    if (const auto* v = get(key)) {
      if (!v->is_string()) fail(key, "a string or null", *v);
      out = v->get<std::string>();
    }
  }
  std::vector<std::string> strings(const char* key, const Json& v) const {
    std::vector<std::string> out;
    for (const auto& item : v) {
      if (!item.is_string()) fail(key, "a list of strings", v);
      out.push_back(item.get<std::string>());
    }
    return out;
  }
  void read(const char* key, std::vector<std::string>& out, bool allow_single) const {
    if (const auto* v = get(key)) {
      if (allow_single && v->is_string()) {
        out = {v->get<std::string>()};
      } else if (v->is_array()) {
        out = strings(key, *v);
      } else {
        fail(key, allow_single ? "a string or a list of strings" : "a list of strings", *v);
      }
    }
  }
  void read(const char* key, ModuleSelector& out) const {
    if (const auto* v = get(key)) {
      if (v->is_string()) {
        out = ModuleSelector::from_regex(v->get<std::string>());
      } else if (v->is_array()) {
        out = ModuleSelector::from_names(strings(key, *v));
      } else {
        fail(key, "a string (regular expression) or a list of module names", *v);
      }
    }
  }
  template <typename T>
  void read_pattern(const char* key, std::vector<std::pair<std::string, T>>& out) const {
    if (const auto* v = get(key)) {
      if (!v->is_object()) fail(key, "an object", *v);
      for (const auto& item : v->items()) {
        const bool ok = std::is_integral_v<T> ? item.value().is_number_integer() : item.value().is_number();
        if (!ok) fail(key, std::is_integral_v<T> ? "an object of integers" : "an object of numbers", *v);
        out.emplace_back(item.key(), item.value().get<T>());
      }
    }
  }
};

Json selector_json(const ModuleSelector& s) {
  switch (s.kind) {
    case ModuleSelector::Kind::Regex: return s.regex;
    case ModuleSelector::Kind::Names: return s.names;
    case ModuleSelector::Kind::None: break;
  }
  return nullptr;
}

template <typename T>
Json optional_json(const std::optional<T>& v) {
  return v.has_value() ? Json(*v) : Json(nullptr);
}

}  // namespace

LoraConfig parse_adapter_config(const std::string& json_text, const std::string& source) {
  Json obj;
  try {
    obj = Json::parse(json_text);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "torchlora: ", source, ": not valid JSON: ", e.what());
  }
  TORCH_CHECK(obj.is_object(), "torchlora: ", source, ": expected a JSON object, got ", obj.type_name());
  const Reader in{obj, source};
  LoraConfig c;
  in.read("peft_type", c.peft_type);
  in.read("r", c.r);
  in.read("lora_alpha", c.lora_alpha);
  in.read("lora_dropout", c.lora_dropout);
  in.read("target_modules", c.target_modules);
  in.read("exclude_modules", c.exclude_modules);
  in.read("fan_in_fan_out", c.fan_in_fan_out);
  in.read("bias", c.bias);
  in.read("use_rslora", c.use_rslora);
  in.read("modules_to_save", c.modules_to_save, false);
  if (const auto* v = in.get("layers_to_transform")) {
    if (v->is_number_integer()) {
      c.layers_to_transform = std::vector<int64_t>{v->get<int64_t>()};
    } else if (v->is_array()) {
      std::vector<int64_t> layers;
      for (const auto& item : *v) {
        if (!item.is_number_integer()) in.fail("layers_to_transform", "an integer or a list of integers", *v);
        layers.push_back(item.get<int64_t>());
      }
      c.layers_to_transform = layers;
    } else {
      in.fail("layers_to_transform", "an integer or a list of integers", *v);
    }
  }
  in.read("layers_pattern", c.layers_pattern, true);
  in.read_pattern("rank_pattern", c.rank_pattern);
  in.read_pattern("alpha_pattern", c.alpha_pattern);
  in.read("lora_bias", c.lora_bias);
  in.read("use_dora", c.use_dora);
  if (const auto* v = in.get("init_lora_weights")) {
    if (v->is_boolean()) {
      c.init_lora_weights = v->get<bool>() ? "true" : "false";
    } else if (v->is_string()) {
      c.init_lora_weights = v->get<std::string>();
    } else {
      in.fail("init_lora_weights", "true, false or a string", *v);
    }
  }
  in.read("inference_mode", c.inference_mode);
  in.read("task_type", c.task_type);
  in.read("base_model_name_or_path", c.base_model_name_or_path);
  in.read("revision", c.revision);
  // Features that change what the adapter computes and that torchlora does not implement.
  if (const auto* v = in.get("target_parameters")) {
    TORCH_CHECK(v->is_array() && v->empty(), "torchlora: ", source,
                ": target_parameters (LoRA on raw parameters) is not supported, got ", v->dump());
  }
  for (const char* key : {"layer_replication", "trainable_token_indices"}) {
    if (const auto* v = in.get(key)) {
      TORCH_CHECK(false, "torchlora: ", source, ": '", key, "' is not supported, got ", v->dump());
    }
  }
  c.original_json = obj.dump();
  try {
    c.validate();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "torchlora: ", source, ": ", e.msg());
  }
  return c;
}

LoraConfig load_adapter_config(const std::string& path) {
  std::ifstream in(path);
  TORCH_CHECK(in.good(), "torchlora: ", path, ": cannot open it (no adapter_config.json?)");
  std::stringstream text;
  text << in.rdbuf();
  return parse_adapter_config(text.str(), path);
}

std::string adapter_config_to_json(const LoraConfig& c) {
  c.validate();
  Json obj;
  try {
    obj = Json::parse(c.original_json);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "torchlora: LoraConfig::original_json is not valid JSON: ", e.what());
  }
  TORCH_CHECK(obj.is_object(), "torchlora: LoraConfig::original_json must hold a JSON object");
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
  const bool init_is_bool = c.init_lora_weights == "true" || c.init_lora_weights == "false";
  obj["init_lora_weights"] = init_is_bool ? Json(c.init_lora_weights == "true") : Json(c.init_lora_weights);
  obj["inference_mode"] = true;
  obj["task_type"] = optional_json(c.task_type);
  obj["base_model_name_or_path"] = optional_json(c.base_model_name_or_path);
  obj["revision"] = optional_json(c.revision);
  return obj.dump(2);
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
