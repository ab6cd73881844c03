// torchlora._C.peft: the rules of target_parameters and trainable_token_indices;
// torchlora._C.cpp: the C++ loader's view of such adapters, bound for testing.
#include "parameter_token_bindings.h"

#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <torchlora/io/parameter_adapters.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/io/trainable_tokens.h>
#include <torchlora/peft/parameter_lora.h>
#include <torchlora/peft/trainable_tokens_keys.h>

namespace py = pybind11;

namespace torchlora_python {

void bind_parameter_and_token_adapters(py::module_& m) {
  namespace peft = torchlora::peft;
  namespace io = torchlora::io;
  auto p = m.def_submodule("peft");
  p.attr("TRAINABLE_TOKENS_DELTA") = peft::kTrainableTokensDelta;
  p.def(
      "parameter_lora_shape",
      [](const std::vector<int64_t>& shape, bool is_transposed) {
        const auto s = peft::parameter_lora_shape(shape, is_transposed);
        return py::make_tuple(s.num_experts, s.in_features, s.out_features);
      },
      py::arg("param_shape"), py::arg("is_transposed") = false,
      "(num_experts, in_features, out_features) that LoRA sees in a targeted parameter of this shape.");
  p.def("parameter_delta_weight", &peft::parameter_delta_weight, py::arg("lora_A"), py::arg("lora_B"),
        py::arg("scaling"), py::arg("param_shape"), py::arg("is_transposed") = false,
        "scaling * B_e @ A_e per expert, in the parameter's layout (differentiable).");
  p.def("parameter_is_targeted", &peft::parameter_is_targeted, py::arg("param_key"), py::arg("targets"),
        "Whether target_parameters selects the parameter with this full name.");
  p.def(
      "strip_base_layer",
      [](const std::string& path) {
        int64_t depth = 0;
        auto stripped = peft::strip_base_layer(path, &depth);
        return py::make_tuple(stripped, depth);
      },
      py::arg("module_path"), "(module path without '.base_layer' suffixes, how many there were).");

  p.def(
      "with_trainable_tokens",
      [](const at::Tensor& weight, const std::vector<int64_t>& indices, const at::Tensor& values) {
        return io::with_trainable_tokens(weight, io::TrainableTokenRows{indices, values}, "trainable tokens");
      },
      py::arg("weight"), py::arg("indices"), py::arg("values"),
      "The weight with rows `indices` replaced by `values` (index_copy, differentiable): how trainable tokens "
      "compute and merge.");

  auto cpp = m.def_submodule("cpp");
  cpp.def(
      "load_trainable_tokens",
      [](const std::string& dir) {
        const auto adapter = io::load_peft_adapter(dir);
        py::dict out;
        for (const auto& [path, rows] : io::trainable_token_rows(adapter, dir)) {
          out[py::str(path)] = py::make_tuple(rows.indices, rows.values);
        }
        return out;
      },
      py::arg("dir"), "{embedding path: (indices, rows)} of a PEFT adapter folder, read by the C++ loader.");
  cpp.def(
      "merge_parameter_adapter",
      [](const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& named_parameters,
         const std::vector<std::string>& transposed_modules, bool unmerge) {
        return io::merge_parameter_adapters(io::load_peft_adapter(dir), named_parameters, transposed_modules,
                                            unmerge ? -1.0 : 1.0);
      },
      py::arg("dir"), py::arg("named_parameters"), py::arg("transposed_modules") = std::vector<std::string>{},
      py::arg("unmerge") = false,
      "Merges a PEFT folder's target_parameters LoRA into the given (name, parameter) pairs in place, with the C++ "
      "loader; returns the names of the parameters changed.");
}

}  // namespace torchlora_python
