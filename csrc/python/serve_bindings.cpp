// torchlora._C.serve: the adapter pool, its leases, PoolBinding for the bound C++ modules and
// ExportedModel (AOTInductor packages), for Python services and tests.
#include "serve_bindings.h"

#include <torch/extension.h>

#include <optional>

#include <torchlora/apply/inject.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/nn/lora_layer.h>
#include <torchlora/serve/adapter_pool.h>
#include <torchlora/serve/exported_model.h>
#include <torchlora/serve/module_slots.h>

namespace py = pybind11;
namespace serve = torchlora::serve;
using torchlora::io::LoraKind;

namespace torchlora_python {
namespace {

using release_gil = py::call_guard<py::gil_scoped_release>;

std::string kind_name(LoraKind kind) {
  return kind == LoraKind::Linear ? "linear" : kind == LoraKind::Embedding ? "embedding" : "conv2d";
}

LoraKind parse_kind(const std::string& kind) {
  if (kind == "linear") return LoraKind::Linear;
  if (kind == "embedding") return LoraKind::Embedding;
  if (kind == "conv2d") return LoraKind::Conv2d;
  throw py::value_error("TargetLayer kind must be \"linear\", \"embedding\" or \"conv2d\", got \"" + kind + "\"");
}

c10::Device parse_device(const py::object& device) {
  if (py::isinstance<py::str>(device)) return c10::Device(device.cast<std::string>());
  return device.cast<c10::Device>();
}

std::vector<serve::AdapterRequest> requests_from(const std::vector<std::pair<std::string, double>>& pairs) {
  std::vector<serve::AdapterRequest> out;
  out.reserve(pairs.size());
  for (const auto& [adapter, scale] : pairs) out.push_back({adapter, scale});
  return out;
}

py::tuple stacks_tuple(const serve::SlotStacks& s) {
  return py::make_tuple(s.lora_A, s.lora_B, s.lora_bias.defined() ? py::cast(s.lora_bias) : py::none(), s.scale);
}

// A C++ module tree made of bound LoRA layers at given module paths ("model.layers.0.q_proj"),
// with plain modules in between, so that Python tests can serve a tree of C++ layers.
struct ModuleTreeImpl : torch::nn::Module {
  explicit ModuleTreeImpl(const std::map<std::string, std::shared_ptr<torchlora::nn::LoraLayer>>& layers)
      : torch::nn::Module("torchlora::ModuleTree") {
    for (const auto& [path, layer] : layers) {
      if (!layer) throw py::type_error("ModuleTree: layer '" + path + "' is None");
      torch::nn::Module* parent = this;
      size_t start = 0;
      for (size_t dot = path.find('.'); dot != std::string::npos; start = dot + 1, dot = path.find('.', start)) {
        const std::string part = path.substr(start, dot - start);
        auto children = parent->named_children();
        parent = children.contains(part) ? children[part].get()
                                         : parent->register_module(part, std::make_shared<torch::nn::Module>()).get();
      }
      const std::string last = path.substr(start);
      if (last.empty() || parent->named_children().contains(last)) {
        throw py::value_error("ModuleTree: module path '" + path + "' is empty or given twice");
      }
      parent->register_module(last, layer);
    }
  }
};

// PoolBinding as a Python context manager: it keeps the module, pool and lease alive while bound.
struct PyPoolBinding {
  std::shared_ptr<torch::nn::Module> root;
  std::shared_ptr<serve::AdapterPool> pool;
  std::shared_ptr<serve::BatchLease> lease;
  std::unique_ptr<serve::PoolBinding> binding;
};

// The C++ module behind a bound LoraLayer or ModuleTree.
std::shared_ptr<torch::nn::Module> cpp_module(const py::object& root) {
  if (py::isinstance<ModuleTreeImpl>(root)) return root.cast<std::shared_ptr<ModuleTreeImpl>>();
  if (py::isinstance<torchlora::nn::LoraLayer>(root)) return root.cast<std::shared_ptr<torchlora::nn::LoraLayer>>();
  throw py::type_error("expected a C++ module of torchlora._C.cpp (LoraLinear, LoraEmbedding, LoraConv2d or "
                       "ModuleTree), got " + py::repr(py::type::of(root)).cast<std::string>());
}

void bind_pool(py::module_& m) {
  py::class_<serve::TargetLayer>(m, "TargetLayer", "One LoRA layer of the served model, as the pool stacks it.")
      .def(py::init([](std::string name, const std::string& kind, std::vector<int64_t> weight_shape, int64_t groups,
                       const std::optional<at::Tensor>& base_weight) {
             return serve::TargetLayer{std::move(name), parse_kind(kind), std::move(weight_shape), groups,
                                       base_weight.value_or(at::Tensor())};
           }),
           py::arg("name"), py::arg("kind"), py::arg("weight_shape"), py::arg("groups") = 1,
           py::arg("base_weight") = py::none())
      .def_property_readonly("base_weight", [](const serve::TargetLayer& t) {
        return t.base_weight.defined() ? py::cast(t.base_weight) : py::none();
      }, "The base weight DoRA adapters need (None: the layer serves plain LoRA only).")
      .def_readonly("name", &serve::TargetLayer::name)
      .def_property_readonly("kind", [](const serve::TargetLayer& t) { return kind_name(t.kind); })
      .def_readonly("weight_shape", &serve::TargetLayer::weight_shape)
      .def_readonly("groups", &serve::TargetLayer::groups)
      .def("__repr__", [](const serve::TargetLayer& t) {
        std::string shape;
        for (size_t i = 0; i < t.weight_shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.weight_shape[i]);
        return "TargetLayer(name='" + t.name + "', kind='" + kind_name(t.kind) + "', weight_shape=[" + shape +
               "], groups=" + std::to_string(t.groups) + ")";
      });

  py::class_<serve::BatchLease, std::shared_ptr<serve::BatchLease>>(
      m, "BatchLease", "The slots of one batch, held until release() (or the end of a with block).")
      .def_property_readonly("sample_slots", &serve::BatchLease::sample_slots, "[n] int64: row i's slot (-1: none)")
      .def_property_readonly("slot_scale", &serve::BatchLease::slot_scale, "[S] float32: each slot's request scale")
      .def_property_readonly("slots", &serve::BatchLease::slots, "sample_slots on the host")
      .def_property_readonly("uses_dora", &serve::BatchLease::uses_dora, "whether a slot of the batch holds a DoRA adapter")
      .def("release", &serve::BatchLease::release, release_gil(), "Gives the slots back now (idempotent).")
      .def("__enter__", [](std::shared_ptr<serve::BatchLease> self) { return self; })
      .def("__exit__", [](serve::BatchLease& self, const py::args&) { self.release(); }, release_gil());

  py::class_<serve::AdapterPool, std::shared_ptr<serve::AdapterPool>>(
      m, "AdapterPool", "torchlora::serve::AdapterPool: device slots, a host tier with LRU, per-slot refcounts.")
      .def(py::init([](std::vector<serve::TargetLayer> layers, int64_t max_loras, int64_t max_lora_rank,
                       int64_t max_cpu_loras, bool lora_bias, at::ScalarType dtype, const py::object& device) {
             serve::PoolOptions o;
             o.max_loras = max_loras;
             o.max_lora_rank = max_lora_rank;
             o.max_cpu_loras = max_cpu_loras;
             o.lora_bias = lora_bias;
             o.dtype = dtype;
             o.device = parse_device(device);
             return std::make_shared<serve::AdapterPool>(std::move(layers), o);
           }),
           py::arg("layers"), py::arg("max_loras"), py::arg("max_lora_rank"), py::arg("max_cpu_loras") = 0,
           py::arg("lora_bias") = false, py::arg("dtype") = at::kFloat, py::arg("device") = py::str("cpu"))
      .def("load", &serve::AdapterPool::load, py::arg("name"), py::arg("folder"), release_gil(),
           "Reads and checks a PEFT folder and registers it under `name` (replacing one of that name).")
      .def("compose",
           [](serve::AdapterPool& p, const std::string& name, const std::vector<std::pair<std::string, double>>& adapters,
              const std::string& combination_type, std::optional<int64_t> svd_rank, std::optional<double> svd_clamp,
              bool svd_full_matrices, std::optional<std::string> svd_driver, std::optional<double> density,
              const std::string& majority_sign_method) {
             torchlora::peft::WeightedAdapterOptions o;
             o.combination_type = combination_type;
             o.svd_rank = svd_rank;
             o.svd_clamp = svd_clamp;
             o.svd_full_matrices = svd_full_matrices;
             o.svd_driver = std::move(svd_driver);
             o.density = density;
             o.majority_sign_method = majority_sign_method;
             p.compose(name, adapters, o);
           },
           py::arg("name"), py::arg("adapters"), py::arg("combination_type") = "svd", py::arg("svd_rank") = py::none(),
           py::arg("svd_clamp") = py::none(), py::arg("svd_full_matrices") = true, py::arg("svd_driver") = py::none(),
           py::arg("density") = py::none(), py::arg("majority_sign_method") = "total", release_gil(),
           "Registers `name` as PEFT's add_weighted_adapter of loaded adapters [(adapter, weight)], computed now; "
           "served like any adapter.")
      .def("unload", &serve::AdapterPool::unload, py::arg("name"), release_gil(), "Forgets `name`; whether it was there.")
      .def("has_adapter", &serve::AdapterPool::has_adapter, py::arg("name"))
      .def("adapter_names", &serve::AdapterPool::adapter_names)
      .def("status",
           [](const serve::AdapterPool& p) {
             py::list out;
             for (const auto& s : p.status()) {
               py::dict d;
               d["name"] = s.name;
               d["rank"] = s.rank;
               d["folder"] = s.folder;
               d["slot"] = s.slot;
               d["on_host"] = s.on_host;
               d["in_use"] = s.in_use;
               out.append(d);
             }
             return out;
           },
           "One dict per adapter: name, rank, folder, slot, on_host, in_use.")
      .def("stats",
           [](const serve::AdapterPool& p) {
             const auto s = p.stats();
             py::dict d;
             d["slot_hits"] = s.slot_hits;
             d["slot_loads"] = s.slot_loads;
             d["slot_evictions"] = s.slot_evictions;
             d["host_evictions"] = s.host_evictions;
             d["host_reloads"] = s.host_reloads;
             return d;
           },
           "Counters: slot_hits, slot_loads, slot_evictions, host_evictions, host_reloads.")
      .def("acquire",
           [](serve::AdapterPool& p, const std::vector<std::pair<std::string, double>>& requests) {
             return std::make_shared<serve::BatchLease>(p.acquire(requests_from(requests)));
           },
           py::arg("requests"), release_gil(),
           "Slots for one batch of (adapter, scale) requests (\"\" or \"__base__\": no adapter); never waits.")
      .def("fits",
           [](const serve::AdapterPool& p, const std::vector<std::pair<std::string, double>>& batch,
              const std::pair<std::string, double>& request) {
             return p.fits(requests_from(batch), {request.first, request.second});
           },
           py::arg("batch"), py::arg("request"))
      .def_property_readonly("layers", &serve::AdapterPool::layers)
      .def("stacks", [](const serve::AdapterPool& p, const std::string& layer) { return stacks_tuple(p.stacks(layer)); },
           py::arg("layer_name"), "(lora_A, lora_B, lora_bias or None, scale) of one layer (they share the pool's memory).")
      .def("dora_factors", [](const serve::AdapterPool& p, const std::string& layer) { return p.stacks(layer).dora_factor; },
           py::arg("layer_name"), "[S, out] DoRA factors of one layer (1 for plain-LoRA and empty slots).")
      .def("all_stacks",
           [](const serve::AdapterPool& p) {
             py::list out;
             for (const auto& s : p.all_stacks()) out.append(stacks_tuple(s));
             return out;
           })
      .def_property_readonly("max_loras", [](const serve::AdapterPool& p) { return p.options().max_loras; })
      .def_property_readonly("max_lora_rank", [](const serve::AdapterPool& p) { return p.options().max_lora_rank; })
      .def_property_readonly("max_cpu_loras", [](const serve::AdapterPool& p) { return p.options().max_cpu_loras; })
      .def_property_readonly("lora_bias", [](const serve::AdapterPool& p) { return p.options().lora_bias; })
      .def_property_readonly("dtype", [](const serve::AdapterPool& p) { return p.options().dtype; })
      .def_property_readonly("device", [](const serve::AdapterPool& p) { return p.options().device; });

  py::class_<PyPoolBinding>(m, "PoolBinding",
                            "While entered, the C++ LoRA module `root` serves each sample from the lease's pool slot.")
      .def(py::init([](const py::object& root, std::shared_ptr<serve::AdapterPool> pool,
                       std::shared_ptr<serve::BatchLease> lease) {
             if (!pool || !lease) throw py::type_error("PoolBinding needs a pool and a lease");
             return PyPoolBinding{cpp_module(root), std::move(pool), std::move(lease), nullptr};
           }),
           py::arg("root"), py::arg("pool"), py::arg("lease"))
      .def("__enter__",
           [](PyPoolBinding& b) -> PyPoolBinding& {
             if (b.binding) throw py::value_error("PoolBinding is already entered");
             b.binding = std::make_unique<serve::PoolBinding>(*b.root, *b.pool, *b.lease);
             return b;
           },
           py::return_value_policy::reference)
      .def("__exit__", [](PyPoolBinding& b, const py::args&) { b.binding.reset(); });

  m.def("target_layers", [](const py::object& root) { return serve::target_layers(*cpp_module(root)); },
        py::arg("root"), "The LoRA layers under a C++ module (a LoraLayer or a ModuleTree) as target layers.");
}

void bind_exported_model(py::module_& m) {
  py::class_<serve::ExportedModel, std::shared_ptr<serve::ExportedModel>>(
      m, "ExportedModel", "A torchlora export (.pt2, AOTInductor) whose LoRA layers read an AdapterPool's slots.")
      .def(py::init<const std::string&, const std::string&, c10::DeviceIndex>(), py::arg("path"),
           py::arg("model_name") = "model", py::arg("device_index") = -1, release_gil())
      .def_property_readonly("info",
                             [](const serve::ExportedModel& e) {
                               const auto& i = e.info();
                               py::dict d;
                               d["format"] = i.format;
                               d["num_model_inputs"] = i.num_model_inputs;
                               d["max_loras"] = i.pool.max_loras;
                               d["max_lora_rank"] = i.pool.max_lora_rank;
                               d["lora_bias"] = i.pool.lora_bias;
                               d["dtype"] = i.pool.dtype;
                               d["device"] = i.pool.device;
                               d["layers"] = i.layers;
                               return d;
                             })
      .def("make_pool", &serve::ExportedModel::make_pool, py::arg("max_cpu_loras") = 0)
      .def("forward",
           [](const serve::ExportedModel& e, const std::vector<at::Tensor>& inputs, const serve::AdapterPool& pool,
              const serve::BatchLease& lease) { return e.forward(inputs, pool, lease); },
           py::arg("inputs"), py::arg("pool"), py::arg("lease"), release_gil());
}

}  // namespace

void bind_serve(py::module_& parent) {
  auto m = parent.def_submodule("serve", "Serving many adapters: torchlora::serve (pool, leases, exported models).");
  static py::exception<serve::AdapterNotFound> not_found(m, "AdapterNotFoundError", PyExc_KeyError);
  static py::exception<serve::PoolExhausted> exhausted(m, "PoolExhaustedError", PyExc_RuntimeError);
  static py::exception<serve::AdapterRejected> rejected(m, "AdapterRejectedError", PyExc_ValueError);
  // Registered after bind_cpp_api's translator, so it is tried first (the serve types are c10::Errors).
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const serve::AdapterNotFound& e) {
      PyErr_SetString(not_found.ptr(), e.what_without_backtrace());
    } catch (const serve::PoolExhausted& e) {
      PyErr_SetString(exhausted.ptr(), e.what_without_backtrace());
    } catch (const serve::AdapterRejected& e) {
      PyErr_SetString(rejected.ptr(), e.what_without_backtrace());
    }
  });
  py::module_ cpp = parent.attr("cpp");
  py::class_<ModuleTreeImpl, std::shared_ptr<ModuleTreeImpl>>(
      cpp, "ModuleTree", "A C++ module tree holding the given C++ LoRA layers at their module paths.")
      .def(py::init<const std::map<std::string, std::shared_ptr<torchlora::nn::LoraLayer>>&>(), py::arg("layers"))
      .def("named_modules", [](ModuleTreeImpl& t) {
        std::vector<std::string> names;
        for (const auto& item : t.named_modules()) names.push_back(item.key());
        return names;
      }, "The module paths of the tree.");
  cpp.def("load_adapter",
          [](const py::object& root, const std::string& folder, const std::string& adapter_name) {
            torchlora::apply::load_adapter(*cpp_module(root), torchlora::io::load_peft_adapter(folder), adapter_name);
          },
          py::arg("root"), py::arg("folder"), py::arg("adapter_name") = "default",
          "Loads a PEFT folder into the C++ LoRA layers of `root` (apply::load_adapter; not activated).");
  cpp.def("set_adapter",
          [](const py::object& root, const std::vector<std::string>& names) {
            torchlora::apply::set_adapter(*cpp_module(root), names);
          },
          py::arg("root"), py::arg("adapter_names"));
  cpp.def("merge_adapter",
          [](const py::object& root, const std::vector<std::string>& names) {
            torchlora::apply::merge_adapter(*cpp_module(root), names);
          },
          py::arg("root"), py::arg("adapter_names") = std::vector<std::string>{});
  cpp.def("unmerge_adapter", [](const py::object& root) { torchlora::apply::unmerge_adapter(*cpp_module(root)); },
          py::arg("root"));
  bind_pool(m);
  bind_exported_model(m);
}

}  // namespace torchlora_python
