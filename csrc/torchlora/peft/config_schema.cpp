// PEFT's LoraConfig schema and validation (see config_schema.h).
#include <torchlora/peft/config_schema.h>
#include <torchlora/peft/config_schema_json.h>

#include <torchlora/peft/scaling.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

namespace torchlora::peft {
namespace {

using Json = nlohmann::ordered_json;

constexpr const char* kAllLinear = "all-linear";

// How a field's value is checked.
enum class Kind {
  OptStr,        // string or null
  Bool,
  Rank,          // positive int
  Alpha,         // positive finite number
  Dropout,       // number in [0, 1)
  Bias,          // "none" | "all" | "lora_only"
  Selector,      // string (regex or "all-linear"), list of strings, or null
  StrList,       // list of strings or null
  StrOrStrList,  // string, list of strings, or null
  Layers,        // int, list of ints, or null
  RankPattern,   // object of positive ints
  AlphaPattern,  // object of positive finite numbers
  OptDict,       // object or null
  Init,          // init_lora_weights
  TaskType,
  PeftType,
  TokenIndices,  // list of token ids, or object of module name -> list of token ids, or null
  Unsupported,   // a PEFT option torchlora lacks: only its default is accepted
};

struct Spec {
  const char* name;
  const char* default_json;
  Kind kind;
  bool baseline;  // read by PEFT since ~0.10, so always written
  bool written;   // part of adapter_config.json at all
};

// PEFT 0.21.2's LoraConfig fields, in its order.
constexpr Spec kSpecs[] = {
    {"task_type", "null", Kind::TaskType, true, true},
    {"peft_type", "null", Kind::PeftType, true, true},
    {"auto_mapping", "null", Kind::OptDict, true, true},
    {"peft_version", "null", Kind::OptStr, false, false},
    {"base_model_name_or_path", "null", Kind::OptStr, true, true},
    {"revision", "null", Kind::OptStr, true, true},
    {"inference_mode", "false", Kind::Bool, true, true},
    {"r", "8", Kind::Rank, true, true},
    {"target_modules", "null", Kind::Selector, true, true},
    {"exclude_modules", "null", Kind::Selector, false, true},
    {"lora_alpha", "8", Kind::Alpha, true, true},
    {"lora_dropout", "0.0", Kind::Dropout, true, true},
    {"fan_in_fan_out", "false", Kind::Bool, true, true},
    {"bias", "\"none\"", Kind::Bias, true, true},
    {"use_rslora", "false", Kind::Bool, true, true},
    {"modules_to_save", "null", Kind::StrList, true, true},
    {"init_lora_weights", "true", Kind::Init, true, true},
    {"layers_to_transform", "null", Kind::Layers, true, true},
    {"layers_pattern", "null", Kind::StrOrStrList, true, true},
    {"rank_pattern", "{}", Kind::RankPattern, true, true},
    {"alpha_pattern", "{}", Kind::AlphaPattern, true, true},
    {"megatron_config", "null", Kind::Unsupported, true, true},
    {"megatron_core", "\"megatron.core\"", Kind::Unsupported, true, true},
    {"trainable_token_indices", "null", Kind::TokenIndices, false, true},
    {"loftq_config", "{}", Kind::Unsupported, true, true},
    {"eva_config", "null", Kind::Unsupported, false, true},
    {"corda_config", "null", Kind::Unsupported, false, true},
    {"lora_ga_config", "null", Kind::Unsupported, false, true},
    {"use_dora", "false", Kind::Bool, true, true},
    {"velora_config", "null", Kind::Unsupported, false, true},
    {"alora_invocation_tokens", "null", Kind::Unsupported, false, true},
    {"use_qalora", "false", Kind::Unsupported, false, true},
    {"qalora_group_size", "16", Kind::Unsupported, false, true},
    {"monteclora_config", "null", Kind::Unsupported, false, true},
    {"layer_replication", "null", Kind::Unsupported, true, true},
    {"runtime_config", "null", Kind::Unsupported, false, false},
    {"lora_bias", "false", Kind::Bool, false, true},
    {"target_parameters", "null", Kind::StrList, false, true},
    {"use_bdlora", "null", Kind::Unsupported, false, true},
    {"arrow_config", "null", Kind::Unsupported, false, true},
    {"kasa_config", "null", Kind::Unsupported, false, true},
    {"ensure_weight_tying", "false", Kind::Bool, false, true},
};

// init_lora_weights values PEFT knows that torchlora does not implement.
constexpr const char* kUnsupportedInits[] = {"loftq", "eva", "corda", "lora_ga", "orthogonal", "mica"};

const Spec* find_spec(const std::string& name) {
  for (const auto& s : kSpecs) {
    if (name == s.name) return &s;
  }
  return nullptr;
}

// Every message starts with "<source>: " when a source is given.
struct Checker {
  const std::string& source;

  std::string where() const { return source.empty() ? std::string() : source + ": "; }

  [[noreturn]] void type_error(const std::string& field, const char* expected, const Json& value) const {
    TORCH_CHECK_TYPE(false, where(), field, " must be ", expected, ", got ", value.dump());
  }
  [[noreturn]] void value_error(const std::string& message) const { TORCH_CHECK_VALUE(false, where(), message); }

  // Re-raises a rule's own error with the source in front.
  template <typename F>
  void with_source(F&& f) const {
    if (source.empty()) {
      f();
      return;
    }
    try {
      f();
    } catch (const c10::ValueError& e) {
      TORCH_CHECK_VALUE(false, where(), e.msg());
    }
  }

  void opt_str(const std::string& field, const Json& v) const {
    if (!v.is_null() && !v.is_string()) type_error(field, "a string or None", v);
  }
  void boolean(const std::string& field, const Json& v) const {
    if (!v.is_boolean()) type_error(field, "a bool", v);
  }
  void string_list(const std::string& field, const Json& v, bool allow_str) const {
    if (v.is_null() || (allow_str && v.is_string())) return;
    const char* kinds = allow_str ? "a string, a list of strings or None" : "a list of strings or None";
    if (!v.is_array()) type_error(field, kinds, v);
    for (const auto& item : v) {
      if (!item.is_string()) type_error(field, kinds, v);
    }
  }
  void rank(const std::string& field, const Json& v) const {
    if (!v.is_number_integer()) type_error(field, "an int", v);
    with_source([&] { check_rank(v.get<int64_t>(), field.c_str()); });
  }
  void alpha(const std::string& field, const Json& v) const {
    if (!v.is_number()) type_error(field, "a number", v);
    with_source([&] { check_alpha(v.get<double>(), field.c_str()); });
  }
  void regex(const std::string& field, const std::string& pattern) const {
    try {
      std::regex(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      value_error(field + " is not a valid regular expression ('" + pattern + "'): " + e.what());
    }
  }
};

bool is_all_linear(const Json& v) { return v.is_string() && peft::is_all_linear(v.get<std::string>()); }

// PEFT's defaults compared as Python compares them: same JSON type, same value.
bool is_default(const Spec& spec, const Json& v) {
  const std::string name = spec.name;
  if (name == "runtime_config") {  // LoraRuntimeConfig(ephemeral_gpu_offload=False), or its dict
    if (v.is_null()) return true;
    if (!v.is_object()) return false;
    for (const auto& item : v.items()) {
      if (item.key() != "ephemeral_gpu_offload" || item.value() != Json(false)) return false;
    }
    return true;
  }
  if (name == "loftq_config") return v.is_null() || (v.is_object() && v.empty());
  const Json d = Json::parse(spec.default_json);
  if (d.is_null()) return v.is_null();
  // JSON keeps ints (signed or not) apart from floats and bools, as Python's types do
  const bool same_kind = (v.is_number_integer() && d.is_number_integer()) ||
                         (v.is_number_float() && d.is_number_float()) || v.type() == d.type();
  return same_kind && v == d;
}

void check_init(const Checker& c, const Json& v) {
  if (v.is_boolean()) return;
  if (!v.is_string()) c.type_error("init_lora_weights", "a bool or a string", v);
  const std::string s = v.get<std::string>();
  switch (init_lora_weights_method(s)) {
    case InitMethod::Unsupported:
      TORCH_CHECK_NOT_IMPLEMENTED(false, c.where(), "init_lora_weights='", s, "' is not supported by torchlora");
    case InitMethod::Unknown:
      c.value_error("init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<K>' or 'olora', got " +
                    v.dump());
    default: break;
  }
}

// trainable_token_indices: ids of the rows to train, for the input embedding (a list) or per
// module name (a dict). An empty list would train nothing, so it is an error.
void check_token_indices(const Checker& c, const Json& v) {
  const char* kinds = "a list of ints, a dict of module name -> list of ints, or None";
  const auto check_list = [&](const std::string& field, const Json& list) {
    if (!list.is_array()) c.type_error(field, kinds, v);
    if (list.empty()) c.value_error(field + " is empty: name at least one token index to train");
    for (const auto& item : list) {
      if (!item.is_number_integer()) c.type_error(field, kinds, v);
      if (item.get<int64_t>() < 0) c.value_error(field + " holds " + item.dump() + "; token indices are >= 0");
    }
  };
  if (v.is_null()) return;
  if (v.is_object()) {
    if (v.empty()) c.value_error("trainable_token_indices is an empty dict: name at least one module");
    for (const auto& item : v.items()) check_list("trainable_token_indices['" + item.key() + "']", item.value());
    return;
  }
  check_list("trainable_token_indices", v);
}

std::string join_types() {
  std::string out;
  for (const auto& t : task_types()) out += (out.empty() ? "" : ", ") + t;
  return out;
}

void check_field(const Checker& c, const Spec& spec, const Json& v) {
  const std::string field = spec.name;
  switch (spec.kind) {
    case Kind::OptStr: c.opt_str(field, v); break;
    case Kind::Bool: c.boolean(field, v); break;
    case Kind::Rank: c.rank(field, v); break;
    case Kind::Alpha: c.alpha(field, v); break;
    case Kind::Dropout: {
      if (!v.is_number()) c.type_error(field, "a number", v);
      const double p = v.get<double>();
      if (!(p >= 0.0 && p < 1.0)) c.value_error("lora_dropout must be in [0, 1), got " + v.dump());
      break;
    }
    case Kind::Bias: {
      if (!v.is_string() || (v != "none" && v != "all" && v != "lora_only")) {
        c.value_error("bias must be one of ['none', 'all', 'lora_only'], got " + v.dump());
      }
      break;
    }
    case Kind::Selector:
      c.string_list(field, v, true);
      if (v.is_string() && !is_all_linear(v)) c.regex(field, v.get<std::string>());
      break;
    case Kind::StrList: c.string_list(field, v, false); break;
    case Kind::StrOrStrList: c.string_list(field, v, true); break;
    case Kind::Layers: {
      const char* kinds = "an int, a list of ints or None";
      if (v.is_null() || v.is_number_integer()) break;
      if (!v.is_array()) c.type_error(field, kinds, v);
      for (const auto& item : v) {
        if (!item.is_number_integer()) c.type_error(field, kinds, v);
      }
      break;
    }
    case Kind::RankPattern:
    case Kind::AlphaPattern: {
      if (!v.is_object()) c.type_error(field, "a dict", v);
      for (const auto& item : v.items()) {
        const std::string name = field + "['" + item.key() + "']";
        if (spec.kind == Kind::RankPattern) {
          c.rank(name, item.value());
        } else {
          c.alpha(name, item.value());
        }
        c.regex(field, item.key());
      }
      break;
    }
    case Kind::OptDict:
      if (!v.is_null() && !v.is_object()) c.type_error(field, "a dict or None", v);
      break;
    case Kind::Init: check_init(c, v); break;
    case Kind::TaskType: {
      if (v.is_null()) break;
      const auto& types = task_types();
      if (!v.is_string() || std::find(types.begin(), types.end(), v.get<std::string>()) == types.end()) {
        c.value_error("Invalid task type: '" + (v.is_string() ? v.get<std::string>() : v.dump()) +
                      "'. Must be one of the following task types: " + join_types() + ".");
      }
      break;
    }
    case Kind::PeftType:
      if (!v.is_null() && v != "LORA") {
        c.value_error("peft_type must be 'LORA' for a LoraConfig, got " + v.dump() +
                      ": torchlora only implements LoRA");
      }
      break;
    case Kind::TokenIndices: check_token_indices(c, v); break;
    case Kind::Unsupported:
      TORCH_CHECK_NOT_IMPLEMENTED(is_default(spec, v), c.where(), "LoraConfig.", field, "=", v.dump(),
                                  " is not supported by torchlora (only the default ", spec.default_json, " is)");
      break;
  }
}

// The combinations PEFT rejects when a config is built.
void check_combinations(const Checker& c, const Json& o) {
  const bool regex_targets = o["target_modules"].is_string();
  if (regex_targets && !o["layers_to_transform"].is_null()) {
    c.value_error("`layers_to_transform` cannot be used when `target_modules` is a str.");
  }
  if (regex_targets && !o["layers_pattern"].is_null()) {
    c.value_error("`layers_pattern` cannot be used when `target_modules` is a str.");
  }
  const Json& pattern = o["layers_pattern"];
  const bool has_pattern = !pattern.is_null() && !(pattern.is_string() && pattern.get<std::string>().empty()) &&
                           !(pattern.is_array() && pattern.empty());
  if (has_pattern && o["layers_to_transform"].is_null()) {
    c.value_error("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ");
  }
  // LoRA on parameters adds B @ A to the weight itself: x never meets the factors (PEFT's ParamWrapper)
  const Json& params = o["target_parameters"];
  if (params.is_array() && !params.empty()) {
    const auto no = [&](bool bad, const std::string& what) {
      if (bad) c.value_error("target_parameters (lora.ParamWrapper) does not work with " + what);
    };
    no(o["lora_dropout"].get<double>() != 0.0, "lora_dropout != 0.");
    no(o["fan_in_fan_out"] == Json(true), "fan_in_fan_out.");
    no(o["lora_bias"] == Json(true), "lora_bias=True.");
    no(o["use_dora"] == Json(true), "use_dora=True.");
    const Json& init = o["init_lora_weights"];
    no(!init.is_boolean() && !(init.is_string() && init_lora_weights_method(init.get<std::string>()) ==
                                                       InitMethod::Standard),
       "init_lora_weights=" + init.dump() + " (only True, False and 'gaussian').");
  }
  if (o["lora_bias"] == Json(true) && !o["init_lora_weights"].is_boolean()) {
    c.value_error("The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                  "init_lora_weights=" + o["init_lora_weights"].dump() + " instead.");
  }
}

Json parse_object(const std::string& text, const Checker& c) {
  Json obj;
  try {
    obj = Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    c.value_error(std::string("not valid JSON: ") + e.what());
  }
  if (!obj.is_object()) c.value_error(std::string("a LoraConfig must be a JSON object, got ") + obj.type_name());
  return obj;
}

Json normalize(const Json& in, const Checker& c) {
  std::vector<std::string> unknown;
  for (const auto& item : in.items()) {
    if (find_spec(item.key()) == nullptr) unknown.push_back(item.key());
  }
  if (!unknown.empty()) {
    std::sort(unknown.begin(), unknown.end());
    std::string list;
    for (const auto& k : unknown) list += (list.empty() ? "'" : ", '") + k + "'";
    c.value_error("Unknown LoraConfig keys [" + list + "]; torchlora cannot interpret this config");
  }
  Json out = Json::object();
  for (const auto& spec : kSpecs) {
    auto it = in.find(spec.name);
    out[spec.name] = it == in.end() ? Json::parse(spec.default_json) : *it;
  }
  // Unsupported options first: their values may be of any type.
  for (const auto& spec : kSpecs) {
    if (spec.kind == Kind::Unsupported) check_field(c, spec, out[spec.name]);
  }
  for (const auto& spec : kSpecs) {
    if (spec.kind != Kind::Unsupported) check_field(c, spec, out[spec.name]);
  }
  check_combinations(c, out);
  out["peft_type"] = "LORA";
  return out;
}

// JSON's form of a value PEFT writes as a set: a sorted list.
Json sorted_if_list(const Json& v) {
  if (!v.is_array()) return v;
  Json copy = v;
  std::sort(copy.begin(), copy.end());
  return copy;
}

}  // namespace

InitMethod init_lora_weights_method(const std::string& value) {
  std::string lower = value;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (value == "true" || value == "false" || lower == "gaussian") return InitMethod::Standard;
  if (value == "pissa") return InitMethod::Pissa;
  if (std::regex_match(value, std::regex("pissa_niter_[0-9]+"))) return InitMethod::PissaNiter;
  if (lower == "olora") return InitMethod::Olora;
  for (const char* unsupported : kUnsupportedInits) {
    if (value == unsupported) return InitMethod::Unsupported;
  }
  return InitMethod::Unknown;
}

bool is_all_linear(const std::string& target_modules) {
  std::string s = target_modules;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s == kAllLinear;
}

const std::vector<ConfigField>& lora_config_fields() {
  static const std::vector<ConfigField> fields = [] {
    std::vector<ConfigField> out;
    for (const auto& s : kSpecs) {
      out.push_back({s.name, s.default_json, s.kind != Kind::Unsupported, s.written, s.baseline});
    }
    return out;
  }();
  return fields;
}

const std::vector<std::string>& task_types() {
  static const std::vector<std::string> types = {"SEQ_CLS",  "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS",
                                                 "QUESTION_ANS", "FEATURE_EXTRACTION"};
  return types;
}

std::string normalize_lora_config(const std::string& config_json, const std::string& source) {
  const Checker c{source};
  return normalize(parse_object(config_json, c), c).dump();
}

Json normalize_lora_config_object(const Json& config, const std::string& source) {
  const Checker c{source};
  if (!config.is_object()) c.value_error(std::string("a LoraConfig must be a JSON object, got ") + config.type_name());
  return normalize(config, c);
}

std::string lora_config_to_peft_json(const std::string& config_json) {
  const std::string source;
  return lora_config_object_to_peft_json(parse_object(config_json, Checker{source}));
}

std::string lora_config_object_to_peft_json(const Json& config_in) {
  const Json config = normalize_lora_config_object(config_in);
  Json out = Json::object();
  for (const auto& spec : kSpecs) {
    const Json& v = config[spec.name];
    if (!spec.written || (!spec.baseline && is_default(spec, v))) continue;
    const bool is_set = spec.kind == Kind::Selector;  // PEFT keeps module lists as sets
    out[spec.name] = is_set ? sorted_if_list(v) : v;
  }
  out["peft_type"] = "LORA";
  return out.dump(2);
}

std::string read_adapter_config_file(const std::string& path) {
  const Checker c{path};
  std::ifstream in(path);
  if (!in.good()) c.value_error("cannot open it (no adapter_config.json?)");
  std::stringstream text;
  text << in.rdbuf();
  Json obj = parse_object(text.str(), c);
  // A saved adapter names its method (PEFT picks the config class by it).
  if (!obj.contains("peft_type")) c.value_error("key 'peft_type' is missing");
  obj.erase("runtime_config");  // runtime-only; PEFT drops it on load too
  return normalize(obj, c).dump();
}

}  // namespace torchlora::peft
