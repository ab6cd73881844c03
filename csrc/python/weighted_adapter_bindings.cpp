// torchlora._C.peft: add_weighted_adapter's plan (checks, new rank, config changes) and the
// per-module combination, so that LoraModel.add_weighted_adapter only collects factors and
// installs the result. Calls run under torch's warning handler: the core's TORCH_WARN (density
// >= 1) reaches Python as a UserWarning, c10 errors as ValueError / TypeError.
#include "weighted_adapter_bindings.h"

#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torchlora/io/adapter_config.h>
#include <torchlora/peft/adapter_combination.h>
#include <torchlora/peft/weighted_adapter.h>

namespace py = pybind11;
namespace peft = torchlora::peft;

namespace torchlora_python {

void bind_weighted_adapter(py::module_& m) {
  py::module_ mod = m.attr("peft");
  py::class_<peft::CombinationOptions>(mod, "CombinationOptions",
                                       "The checked options of one add_weighted_adapter call (weighted_adapter_plan).")
      .def_property_readonly("combination_type",
                             [](const peft::CombinationOptions& o) { return peft::combination_type_name(o.type); })
      .def_readonly("rank", &peft::CombinationOptions::rank)
      .def_readonly("density", &peft::CombinationOptions::density);

  mod.def(
      "weighted_adapter_plan",
      torch::wrap_pybind_function([](const std::vector<std::string>& configs_json, const std::vector<std::string>& names,
                                     const std::string& combination_type, std::optional<int64_t> svd_rank,
                                     std::optional<double> svd_clamp, bool svd_full_matrices,
                                     std::optional<std::string> svd_driver, std::optional<double> density,
                                     const std::string& majority_sign_method) {
        std::vector<torchlora::io::LoraConfig> configs;
        for (size_t i = 0; i < configs_json.size(); ++i) {
          configs.push_back(torchlora::io::parse_adapter_config(
              configs_json[i], "the config of adapter '" + (i < names.size() ? names[i] : std::string()) + "'"));
        }
        peft::WeightedAdapterOptions options;
        options.combination_type = combination_type;
        options.svd_rank = svd_rank;
        options.svd_clamp = svd_clamp;
        options.svd_full_matrices = svd_full_matrices;
        options.svd_driver = std::move(svd_driver);
        options.density = density;
        options.majority_sign_method = majority_sign_method;
        const auto plan = peft::plan_weighted_adapter(configs, names, options);
        return std::make_tuple(plan.combination, peft::weighted_adapter_config_changes(plan));
      }),
      py::arg("configs_json"), py::arg("names"), py::arg("combination_type"), py::arg("svd_rank"),
      py::arg("svd_clamp"), py::arg("svd_full_matrices"), py::arg("svd_driver"), py::arg("density"),
      py::arg("majority_sign_method"),
      "PEFT's checks of add_weighted_adapter over the adapters' configs (adapter_config.json text): returns "
      "(CombinationOptions, the JSON object of the new config's changed fields).");

  mod.def(
      "combine_lora_factors",
      torch::wrap_pybind_function([](const std::vector<std::tuple<at::Tensor, at::Tensor, double, double>>& factors,
                                     const peft::CombinationOptions& options, bool transposed_delta) {
        std::vector<peft::WeightedFactors> adapters;
        for (const auto& [lora_A, lora_B, scaling, weight] : factors) adapters.push_back({lora_A, lora_B, scaling, weight});
        return peft::combine_lora_factors(adapters, options, transposed_delta);
      }),
      py::arg("factors"), py::arg("options"), py::arg("transposed_delta") = false,
      "(lora_A, lora_B) of the combined adapter in one module, from [(lora_A, lora_B, scaling, weight)] of the "
      "adapters that hold it; transposed_delta: the module's delta weight is [in, out] (Embedding, fan_in_fan_out).");
}

}  // namespace torchlora_python
