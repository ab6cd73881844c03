// torchlora._C.peft: the PEFT rules of the C++ core (config schema, target matching, scaling,
// key names, reserved names), so that Python applies the very same definitions.
#include "peft_bindings.h"

#include <pybind11/stl.h>

#include <torchlora/apply/target_match.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/peft/config_schema.h>
#include <torchlora/peft/config_schema_json.h>
#include <torchlora/peft/keys.h>
#include <torchlora/peft/names.h>
#include <torchlora/peft/scaling.h>

#include <nlohmann/json.hpp>

#include <algorithm>

namespace py = pybind11;

namespace torchlora_python {
namespace {

using Json = nlohmann::ordered_json;

// Python config values -> JSON. Sets become sorted lists (PEFT writes them so).
Json to_json(const py::handle& obj, const std::string& path) {
  if (obj.is_none()) return nullptr;
  if (py::isinstance<py::bool_>(obj)) return obj.cast<bool>();
  if (py::isinstance<py::int_>(obj)) return obj.cast<int64_t>();
  if (py::isinstance<py::float_>(obj)) return obj.cast<double>();
  if (py::isinstance<py::str>(obj)) return obj.cast<std::string>();
  if (py::isinstance<py::dict>(obj)) {
    Json out = Json::object();
    for (const auto& [key, value] : obj.cast<py::dict>()) {
      if (!py::isinstance<py::str>(key)) {
        throw py::type_error(path + " keys must be strings, got " + py::repr(key).cast<std::string>());
      }
      const auto k = key.cast<std::string>();
      out[k] = to_json(value, path + "['" + k + "']");
    }
    return out;
  }
  const bool is_set = py::isinstance<py::set>(obj) || py::isinstance<py::frozenset>(obj);
  if (is_set || py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    Json out = Json::array();
    for (const auto& item : obj) out.push_back(to_json(item, path));
    if (is_set) std::sort(out.begin(), out.end());
    return out;
  }
  throw py::type_error(path + " cannot be stored in adapter_config.json (a value of type " +
                       py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>() + ")");
}

py::object to_python(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return py::none();
    case Json::value_t::boolean: return py::bool_(v.get<bool>());
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return py::int_(v.get<int64_t>());
    case Json::value_t::number_float: return py::float_(v.get<double>());
    case Json::value_t::string: return py::str(v.get<std::string>());
    case Json::value_t::array: {
      py::list out;
      for (const auto& item : v) out.append(to_python(item));
      return out;
    }
    case Json::value_t::object: {
      py::dict out;
      for (const auto& item : v.items()) out[py::str(item.key())] = to_python(item.value());
      return out;
    }
    default: break;
  }
  throw py::value_error("cannot convert a JSON " + std::string(v.type_name()) + " to Python");
}

Json config_json(const py::dict& config) {
  Json out = Json::object();
  for (const auto& [key, value] : config) {
    const auto k = py::str(key).cast<std::string>();
    out[k] = to_json(value, k);
  }
  return out;
}

py::dict parse_dict(const std::string& text) { return to_python(Json::parse(text)).cast<py::dict>(); }

// A config's per-module rules, parsed once for a whole model walk.
class TargetRules {
 public:
  explicit TargetRules(const py::dict& config)
      : config_(torchlora::io::parse_adapter_config(config_json(config).dump(), "LoraConfig")) {}
  // (A NaN cannot reach here: LoraConfig validated the values when it was built.)

  int match(const std::string& name) const {
    return static_cast<int>(torchlora::apply::match_target_module(config_, name));
  }
  int64_t rank_for(const std::string& name) const { return config_.rank_for(name); }
  double alpha_for(const std::string& name) const { return config_.alpha_for(name); }
  double scaling_for(const std::string& name) const { return config_.scaling_for(name); }

 private:
  torchlora::io::LoraConfig config_;
};

}  // namespace

void bind_peft(py::module_& m) {
  auto peft = m.def_submodule("peft", "PEFT's rules as the C++ core defines them (the one definition).");
  peft.attr("BASE_ADAPTER_NAME") = torchlora::peft::kBaseAdapterName;
  peft.attr("DEFAULT_ADAPTER_NAME") = torchlora::peft::kDefaultAdapterName;
  peft.attr("PEFT_KEY_PREFIX") = torchlora::peft::kPeftKeyPrefix;

  peft.def(
      "lora_config_fields",
      [] {
        py::list out;
        for (const auto& f : torchlora::peft::lora_config_fields()) {
          out.append(py::make_tuple(f.name, to_python(Json::parse(f.default_json)), f.supported));
        }
        return out;
      },
      "[(name, default, supported)] for every PEFT LoraConfig field, in PEFT's order.");
  peft.def(
      "peft_file_keys",
      [] {
        py::set known, baseline;
        for (const auto& f : torchlora::peft::lora_config_fields()) {
          if (f.written) known.add(py::str(f.name));
          if (f.written && f.baseline) baseline.add(py::str(f.name));
        }
        return py::make_tuple(py::frozenset(known), py::frozenset(baseline));
      },
      "(keys adapter_config.json may hold, keys written even at their default).");
  peft.def("is_all_linear", &torchlora::peft::is_all_linear, py::arg("target_modules"),
           "Whether target_modules is PEFT's \"all-linear\" (any case).");
  peft.def("task_types", &torchlora::peft::task_types, "PEFT's TaskType values.");
  peft.def(
      "normalize_lora_config",
      [](const py::dict& config, const std::string& source) {
        return to_python(torchlora::peft::normalize_lora_config_object(config_json(config), source)).cast<py::dict>();
      },
      py::arg("config"), py::arg("source") = "",
      "Validates a config dict by PEFT's schema; returns it with every field present. Raises "
      "TypeError / ValueError / NotImplementedError naming the field.");
  peft.def(
      "lora_config_to_peft_json",
      [](const py::dict& config) { return torchlora::peft::lora_config_object_to_peft_json(config_json(config)); },
      py::arg("config"), "The adapter_config.json text for a config dict.");
  peft.def(
      "read_adapter_config",
      [](const std::string& path) { return parse_dict(torchlora::peft::read_adapter_config_file(path)); },
      py::arg("path"), "An adapter_config.json, parsed and validated; every field present.");
  peft.def("lora_scaling", &torchlora::peft::lora_scaling, py::arg("lora_alpha"), py::arg("r"),
           py::arg("use_rslora"), "lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.");
  peft.attr("LORA_TENSOR_NAMES") = py::tuple(py::cast(std::vector<std::string>(
      torchlora::peft::kLoraTensorNames.begin(), torchlora::peft::kLoraTensorNames.end())));
  peft.def("to_peft_key", &torchlora::peft::to_peft_key, py::arg("module_key"), py::arg("adapter_name"),
           py::arg("with_prefix") = true, "A model state-dict key -> its key in a PEFT file.");
  peft.def("from_peft_key", &torchlora::peft::from_peft_key, py::arg("peft_key"), py::arg("adapter_name"),
           "A PEFT file key -> the model state-dict key of adapter_name.");
  peft.def("pattern_matches", &torchlora::io::pattern_key_matches, py::arg("key"), py::arg("module_name"),
           "Whether a rank_pattern / alpha_pattern key applies to a module.");
  peft.def("layer_index", &torchlora::apply::layer_index, py::arg("module_name"), py::arg("layers_pattern"),
           "The layer index PEFT reads from a module name, or None.");

  py::class_<TargetRules>(peft, "TargetRules", "A config's per-module rules: targets, ranks, alphas, scalings.")
      .def(py::init<const py::dict&>(), py::arg("config"))
      .def("match", &TargetRules::match, py::arg("module_name"),
           "0: not a target, 1: a target, 2: excluded (exclude_modules or modules_to_save).")
      .def("rank_for", &TargetRules::rank_for, py::arg("module_name"))
      .def("alpha_for", &TargetRules::alpha_for, py::arg("module_name"))
      .def("scaling_for", &TargetRules::scaling_for, py::arg("module_name"));
}

}  // namespace torchlora_python
