#include "cpp_api_bindings.h"

#include <torch/extension.h>

#include <torchlora/nn/lora_conv2d.h>
#include <torchlora/nn/lora_embedding.h>
#include <torchlora/nn/lora_linear.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/io/safetensors.h>

namespace py = pybind11;
namespace tnn = torchlora::nn;

namespace torchlora_python {
namespace {

tnn::LoraInit parse_init(const py::object& init) {
  if (py::isinstance<py::bool_>(init)) {
    return init.cast<bool>() ? tnn::LoraInit::Default : tnn::LoraInit::Random;
  }
  if (py::isinstance<py::str>(init) && init.cast<std::string>() == "gaussian") {
    return tnn::LoraInit::Gaussian;
  }
  throw py::value_error("init_lora_weights must be True, False or \"gaussian\", got " + py::repr(init).cast<std::string>());
}

tnn::AdapterOptions make_options(int64_t r, double lora_alpha, double lora_dropout, bool use_rslora, bool lora_bias,
                                 const py::object& init, bool use_dora) {
  return tnn::AdapterOptions().r(r).lora_alpha(lora_alpha).lora_dropout(lora_dropout).use_rslora(use_rslora)
      .lora_bias(lora_bias).init(parse_init(init)).use_dora(use_dora);
}

py::dict named_parameters(const torch::nn::Module& m) {
  py::dict d;
  for (const auto& p : m.named_parameters()) d[py::str(p.key())] = p.value();
  return d;
}

void copy_param(torch::Tensor& dst, const torch::Tensor& src) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(dst.sizes() == src.sizes(), "shape mismatch: ", dst.sizes(), " vs ", src.sizes());
  dst.copy_(src);
}

void bind_modules(py::module_& m) {
  py::class_<tnn::LoraLayer, std::shared_ptr<tnn::LoraLayer>>(m, "LoraLayer",
      "Shared bookkeeping of the C++ LoRA modules (torchlora::nn::LoraLayer).")
      .def("update_layer",
           [](tnn::LoraLayer& l, const std::string& name, int64_t r, double lora_alpha, double lora_dropout,
              bool use_rslora, bool lora_bias, const py::object& init_lora_weights, bool use_dora) {
             l.update_layer(name, make_options(r, lora_alpha, lora_dropout, use_rslora, lora_bias, init_lora_weights,
                                               use_dora));
           },
           py::arg("adapter_name"), py::arg("r") = 8, py::arg("lora_alpha") = 8.0, py::arg("lora_dropout") = 0.0,
           py::arg("use_rslora") = false, py::arg("lora_bias") = false, py::arg("init_lora_weights") = true,
           py::arg("use_dora") = false)
      .def("uses_dora", &tnn::LoraLayer::uses_dora, py::arg("adapter_name"))
      .def("magnitude", &tnn::LoraLayer::magnitude, py::arg("adapter_name"),
           "DoRA's magnitude parameter of the adapter (shares memory with the module).")
      .def("dora_weight_norm", &tnn::LoraLayer::dora_weight_norm, py::arg("adapter_name"),
           "||W + scaling * B A|| per output feature (detached).")
      .def("set_adapter",
           [](tnn::LoraLayer& l, const py::object& names, bool inference_mode) {
             if (py::isinstance<py::str>(names)) {
               l.set_adapter(names.cast<std::string>(), inference_mode);
             } else {
               l.set_adapter(names.cast<std::vector<std::string>>(), inference_mode);
             }
           },
           py::arg("adapter_names"), py::arg("inference_mode") = false)
      .def("forward", &tnn::LoraLayer::forward, py::arg("x"))
      .def("__call__", &tnn::LoraLayer::forward, py::arg("x"))
      .def("forward_mixed", &tnn::LoraLayer::forward_mixed, py::arg("x"), py::arg("adapter_names"),
           "Mixed batch: sample i uses adapter_names[i] (\"__base__\": none).")
      .def("forward_slots", &tnn::LoraLayer::forward_slots, py::arg("x"), py::arg("adapter_slots"),
           "Mixed batch with the assignment as a tensor: sample i takes adapter_names()[adapter_slots[i]] (-1: none).")
      .def("enable_adapters", &tnn::LoraLayer::enable_adapters, py::arg("enabled"))
      .def("delete_adapter", &tnn::LoraLayer::delete_adapter, py::arg("adapter_name"))
      .def("merge", &tnn::LoraLayer::merge, py::arg("safe_merge") = false,
           py::arg("adapter_names") = std::vector<std::string>{})
      .def("unmerge", &tnn::LoraLayer::unmerge)
      .def("get_delta_weight", &tnn::LoraLayer::get_delta_weight, py::arg("adapter_name"))
      .def("scaling", &tnn::LoraLayer::scaling, py::arg("adapter_name"))
      .def_property_readonly("merged", &tnn::LoraLayer::merged)
      .def_property_readonly("merged_adapters", &tnn::LoraLayer::merged_adapters)
      .def_property_readonly("active_adapters", &tnn::LoraLayer::active_adapters)
      .def_property_readonly("disable_adapters", &tnn::LoraLayer::adapters_disabled)
      .def("adapter_names", &tnn::LoraLayer::adapter_names)
      .def("train", [](tnn::LoraLayer& l, bool mode) { l.train(mode); }, py::arg("mode") = true)
      .def("eval", [](tnn::LoraLayer& l) { l.eval(); })
      .def_property_readonly("training", [](const tnn::LoraLayer& l) { return l.is_training(); })
      .def("named_parameters", [](tnn::LoraLayer& l) { return named_parameters(l); }, "Parameter name -> tensor (shares memory with the module).")
      .def("to", [](tnn::LoraLayer& l, const torch::Dtype& dtype) { l.to(dtype); }, py::arg("dtype"));

  py::class_<tnn::LoraLinearImpl, tnn::LoraLayer, std::shared_ptr<tnn::LoraLinearImpl>> linear(m, "LoraLinear",
      "torchlora::nn::LoraLinear around a LibTorch Linear built from `weight` [out, in] and `bias`.");
  linear.def(py::init([](const torch::Tensor& weight, const std::optional<torch::Tensor>& bias) {
               TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be [out, in], got ", weight.sizes());
               torch::nn::Linear base(torch::nn::LinearOptions(weight.size(1), weight.size(0)).bias(bias.has_value()));
               base->to(weight.scalar_type());
               copy_param(base->weight, weight);
               if (bias) copy_param(base->bias, *bias);
               return std::make_shared<tnn::LoraLinearImpl>(base);
             }),
             py::arg("weight"), py::arg("bias") = py::none());

  py::class_<tnn::LoraEmbeddingImpl, tnn::LoraLayer, std::shared_ptr<tnn::LoraEmbeddingImpl>> embedding(
      m, "LoraEmbedding", "torchlora::nn::LoraEmbedding around a LibTorch Embedding built from `weight` [V, D].");
  embedding.def(py::init([](const torch::Tensor& weight, std::optional<int64_t> padding_idx, std::optional<double> max_norm,
                            double norm_type, bool scale_grad_by_freq) {
                  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be [num_embeddings, dim], got ", weight.sizes());
                  auto options = torch::nn::EmbeddingOptions(weight.size(0), weight.size(1))
                                     .padding_idx(padding_idx).max_norm(max_norm).norm_type(norm_type)
                                     .scale_grad_by_freq(scale_grad_by_freq);
                  torch::nn::Embedding base(options);
                  base->to(weight.scalar_type());
                  copy_param(base->weight, weight);
                  return std::make_shared<tnn::LoraEmbeddingImpl>(base);
                }),
                py::arg("weight"), py::arg("padding_idx") = py::none(), py::arg("max_norm") = py::none(),
                py::arg("norm_type") = 2.0, py::arg("scale_grad_by_freq") = false);

  py::class_<tnn::LoraConv2dImpl, tnn::LoraLayer, std::shared_ptr<tnn::LoraConv2dImpl>> conv(m, "LoraConv2d",
      "torchlora::nn::LoraConv2d around a LibTorch Conv2d built from `weight` [out, in / groups, kh, kw].");
  conv.def(py::init([](const torch::Tensor& weight, const std::optional<torch::Tensor>& bias, std::vector<int64_t> stride,
                       std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups) {
             TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be [out, in / groups, kh, kw], got ", weight.sizes());
             TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                               "stride, padding and dilation must have two values each");
             auto options = torch::nn::Conv2dOptions(weight.size(1) * groups, weight.size(0),
                                                     {weight.size(2), weight.size(3)})
                                .stride({stride[0], stride[1]}).padding(torch::ExpandingArray<2>({padding[0], padding[1]}))
                                .dilation({dilation[0], dilation[1]}).groups(groups).bias(bias.has_value());
             torch::nn::Conv2d base(options);
             base->to(weight.scalar_type());
             copy_param(base->weight, weight);
             if (bias) copy_param(base->bias, *bias);
             return std::make_shared<tnn::LoraConv2dImpl>(base);
           }),
           py::arg("weight"), py::arg("bias") = py::none(), py::arg("stride") = std::vector<int64_t>{1, 1},
           py::arg("padding") = std::vector<int64_t>{0, 0}, py::arg("dilation") = std::vector<int64_t>{1, 1},
           py::arg("groups") = 1);
}

py::tuple contents_tuple(const torchlora::io::SafetensorsContents& c) {
  py::dict tensors;
  for (const auto& [k, v] : c.tensors) tensors[py::str(k)] = v;
  return py::make_tuple(tensors, c.metadata);
}

void bind_io(py::module_& m) {
  namespace io = torchlora::io;
  m.def("load_safetensors", [](const std::string& path) { return contents_tuple(io::load_safetensors(path)); },
        py::arg("path"), "(tensors, metadata) of a safetensors file, read by the C++ reader.");
  m.def("parse_safetensors",
        [](const py::bytes& data, const std::string& source) {
          const std::string bytes = data;
          return contents_tuple(io::parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), source));
        },
        py::arg("data"), py::arg("source") = "<bytes>");
  m.def("serialize_safetensors",
        [](const std::map<std::string, torch::Tensor>& tensors, const std::map<std::string, std::string>& metadata) {
          const auto bytes = io::serialize_safetensors(tensors, metadata);
          return py::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
        },
        py::arg("tensors"), py::arg("metadata") = std::map<std::string, std::string>{});
  m.def("load_adapter_config", [](const std::string& path) { return io::adapter_config_to_json(io::load_adapter_config(path)); },
        py::arg("path"), "adapter_config.json as read (and written back) by the C++ LoraConfig, as JSON text.");
  m.def("load_peft_adapter",
        [](const std::string& dir) {
          const auto adapter = io::load_peft_adapter(dir);
          py::dict modules;
          for (const auto& [path, w] : adapter.modules) {
            py::dict d;
            d["kind"] = w.kind == io::LoraKind::Linear ? "linear" : w.kind == io::LoraKind::Embedding ? "embedding" : "conv2d";
            d["lora_A"] = w.lora_A;
            d["lora_B"] = w.lora_B;
            d["lora_bias"] = w.lora_bias.defined() ? py::cast(w.lora_bias) : py::none();
            d["magnitude"] = w.magnitude.defined() ? py::cast(w.magnitude) : py::none();
            d["scaling"] = w.scaling;
            d["delta_weight"] = io::delta_weight(w, adapter.config.fan_in_fan_out);
            modules[py::str(path)] = d;
          }
          py::dict other;
          for (const auto& [k, v] : adapter.other_tensors) other[py::str(k)] = v;
          return py::make_tuple(modules, other);
        },
        py::arg("dir"), "(modules, other_tensors) of a PEFT adapter folder, mapped by the C++ loader.");
  m.def("copy_peft_adapter",
        [](const std::string& src, const std::string& dst) { io::save_peft_adapter(dst, io::load_peft_adapter(src)); },
        py::arg("src"), py::arg("dst"), "Reads a PEFT folder and writes it again with the C++ loader and writer.");
}

}  // namespace

void bind_cpp_api(py::module_& m) {
  // Local to this module: a global translator would also take over torch's own functions
  // (pybind11 shares translators between modules) and turn e.g. IndexError into RuntimeError.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  auto cpp = m.def_submodule("cpp", "The C++ API of torchlora (LibTorch modules, adapter files), bound for testing.");
  bind_modules(cpp);
  bind_io(cpp);
  m.def_submodule("peft").def("check_adapter_tensor", &torchlora::io::check_adapter_tensor, py::arg("tensor"),
                              py::arg("key"), py::arg("source"),
                              "A saved adapter's tensor must be floating point and finite (ValueError otherwise).");
  bind_weight_conversion(m.def_submodule("peft", "PEFT's rules, defined once in the C++ core."), cpp);
}

}  // namespace torchlora_python
