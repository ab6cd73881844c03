// torchlora._C.peft: PEFT's PiSSA / OLoRA rules (peft/mutated_init.h) for the Python package;
// torchlora._C.cpp: the C++ conversion and serving paths of such adapters, bound for tests.
#include "cpp_api_bindings.h"

#include <torch/extension.h>
#include <torch/script.h>

#include <torchlora/apply/script_model.h>
#include <torchlora/peft/names.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/io/weight_conversion.h>
#include <torchlora/peft/mutated_init.h>

namespace py = pybind11;

namespace torchlora_python {
namespace {

namespace peft = torchlora::peft;
namespace io = torchlora::io;

// init_lora_weights as the C++ rules spell it: true / false -> "true" / "false".
std::string init_text(const py::object& init) {
  if (py::isinstance<py::bool_>(init)) return init.cast<bool>() ? "true" : "false";
  if (py::isinstance<py::str>(init)) return init.cast<std::string>();
  throw py::type_error("init_lora_weights must be a bool or a string, got " + py::repr(init).cast<std::string>());
}

py::tuple factors_tuple(const peft::LoraFactors& f) { return py::make_tuple(f.lora_A, f.lora_B); }

template <typename T>
std::vector<std::pair<std::string, T>> pattern_items(const py::dict& d) {
  std::vector<std::pair<std::string, T>> out;
  for (const auto& [k, v] : d) out.emplace_back(py::cast<std::string>(k), py::cast<T>(v));  // dict order: first match wins
  return out;
}

template <typename T>
py::dict pattern_dict(const std::vector<std::pair<std::string, T>>& items) {
  py::dict d;
  for (const auto& [k, v] : items) d[py::str(k)] = v;
  return d;
}

void bind_peft(py::module_& m) {
  m.def("check_base_weights_reproducible",
        [](const py::object& init, const std::string& source) {
          peft::check_base_weights_reproducible(init_text(init), source);
        },
        py::arg("init_lora_weights"), py::arg("source"),
        "Raises ValueError (saying how to convert it) if an adapter saved with this init_lora_weights cannot be "
        "applied from its file and the original base weights (pissa_niter_<K>, corda, lora_ga, loftq).");
  m.def("pissa_factors",
        [](const at::Tensor& weight, int64_t r, double scaling) { return factors_tuple(peft::pissa_factors(weight, r, scaling)); },
        py::arg("weight"), py::arg("r"), py::arg("scaling"),
        "(lora_A, lora_B) of PiSSA for a weight [out, in]: exact SVD in float32.");
  m.def("pissa_factors_from_svd",
        [](const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, double scaling) {
          return factors_tuple(peft::pissa_factors_from_svd(U, S, Vh, scaling));
        },
        py::arg("U"), py::arg("S"), py::arg("Vh"), py::arg("scaling"),
        "(lora_A, lora_B) of PiSSA from the top-r singular triplets U [out, r], S [r], Vh [r, in].");
  m.def("olora_factors", [](const at::Tensor& weight, int64_t r) { return factors_tuple(peft::olora_factors(weight, r)); },
        py::arg("weight"), py::arg("r"), "(lora_A, lora_B) of OLoRA for a weight [out, in]: QR in float32.");
  m.def("residual_weight",
        [](const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
          return peft::residual_weight(weight, {lora_A, lora_B}, scaling);
        },
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
        "weight - (scaling * lora_B) @ lora_A in float32: the base weight PiSSA / OLoRA leave.");
  m.def("factors_for_original_weights",
        [](const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& initial_A,
           const std::optional<at::Tensor>& initial_B) {
          const peft::LoraFactors initial{initial_A.value_or(at::Tensor()), initial_B.value_or(at::Tensor())};
          return factors_tuple(peft::factors_for_original_weights({lora_A, lora_B}, initial));
        },
        py::arg("lora_A"), py::arg("lora_B"), py::arg("initial_A"), py::arg("initial_B"),
        "(cat(A, A0), cat(B, -B0)): trained factors converted to apply to the original base weight (None, None: "
        "the base weight was not rewritten, pad with zeros).");
  m.def("settings_for_original_weights",
        [](int64_t r, double lora_alpha, bool use_rslora, const py::dict& rank_pattern, const py::dict& alpha_pattern) {
          const auto s = peft::settings_for_original_weights(
              {r, lora_alpha, use_rslora, pattern_items<int64_t>(rank_pattern), pattern_items<double>(alpha_pattern)});
          py::dict out;
          out["r"] = s.r;
          out["lora_alpha"] = s.lora_alpha;
          out["rank_pattern"] = pattern_dict(s.rank_pattern);
          out["alpha_pattern"] = pattern_dict(s.alpha_pattern);
          return out;
        },
        py::arg("r"), py::arg("lora_alpha"), py::arg("use_rslora"), py::arg("rank_pattern"), py::arg("alpha_pattern"),
        "r, lora_alpha, rank_pattern and alpha_pattern of the converted adapter (ranks doubled, scalings kept).");
}

py::dict modules_dict(const io::PeftAdapter& adapter) {
  py::dict modules;
  for (const auto& [path, w] : adapter.modules) {
    py::dict d;
    d["lora_A"] = w.lora_A;
    d["lora_B"] = w.lora_B;
    d["scaling"] = w.scaling;
    d["delta_weight"] = io::delta_weight(w, adapter.config.fan_in_fan_out);
    modules[py::str(path)] = d;
  }
  return modules;
}

void bind_cpp(py::module_& m) {
  m.def("adapter_for_original_weights",
        [](const std::string& dir, const std::map<std::string, at::Tensor>& base_weights,
           const std::optional<std::string>& save_to) {
          const auto converted = io::adapter_for_original_weights(io::load_peft_adapter(dir), [&](const std::string& path) {
            auto it = base_weights.find(path);
            return it == base_weights.end() ? at::Tensor() : it->second;
          });
          if (save_to) io::save_peft_adapter(*save_to, converted);
          return py::make_tuple(io::adapter_config_to_json(converted.config), modules_dict(converted));
        },
        py::arg("dir"), py::arg("base_weights"), py::arg("save_to") = py::none(),
        "(config JSON, modules) of the adapter folder `dir` converted by the C++ loader to apply to the original "
        "weights `base_weights` (module path -> weight); `save_to` also writes it as a PEFT folder.");

  namespace apply = torchlora::apply;
  py::class_<apply::LoraScriptModel, std::shared_ptr<apply::LoraScriptModel>>(
      m, "LoraScriptModel", "torchlora::apply::LoraScriptModel (the C++ server's model) on a TorchScript file.")
      .def(py::init([](const std::string& path) { return std::make_shared<apply::LoraScriptModel>(torch::jit::load(path)); }),
           py::arg("path"))
      .def("load_adapter", &apply::LoraScriptModel::load_adapter, py::arg("name"), py::arg("dir"))
      .def("remove_adapter", &apply::LoraScriptModel::remove_adapter, py::arg("name"))
      .def("adapter_names", &apply::LoraScriptModel::adapter_names)
      .def("active_adapter", &apply::LoraScriptModel::active_adapter)
      .def("forward",
           [](apply::LoraScriptModel& model, const std::vector<at::Tensor>& inputs, const std::string& adapter) {
             std::vector<c10::IValue> args(inputs.begin(), inputs.end());
             const auto out = model.forward(std::move(args), adapter);
             TORCH_CHECK_TYPE(out.isTensor(), "the model returned a ", out.tagKind(), ", not a tensor");
             return out.toTensor();
           },
           py::arg("inputs"), py::arg("adapter") = std::string(torchlora::peft::kBaseAdapterName));
}

}  // namespace

void bind_weight_conversion(py::module_ peft_module, py::module_ cpp_module) {
  bind_peft(peft_module);
  bind_cpp(cpp_module);
}

}  // namespace torchlora_python
