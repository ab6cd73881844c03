#include <torchlora/apply/script_model.h>
#include <torchlora/peft/names.h>

#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <optional>
#include <sstream>

#include <torchlora/io/weight_conversion.h>

namespace torchlora::apply {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

bool is_base(const std::string& name) { return name.empty() || name == peft::kBaseAdapterName; }

}  // namespace

ScriptModuleMerger::ScriptModuleMerger(torch::jit::Module module) : module_(std::move(module)) {
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) {
    params_.emplace(p.name, p.value);
  }
}

at::Tensor ScriptModuleMerger::parameter(const std::string& name) const {
  auto it = params_.find(name);
  return it == params_.end() ? at::Tensor() : it->second;
}

void ScriptModuleMerger::check_compatible(const io::PeftAdapter& adapter) const {
  TORCH_CHECK_NOT_IMPLEMENTED(!adapter.config.use_dora, "torchlora: DoRA adapters (use_dora=true) cannot be merged "
                              "into TorchScript models; load them into torchlora's C++ modules (apply::load_adapter)");
  for (const auto& [path, w] : adapter.modules) {
    const auto weight = parameter(path + ".weight");
    TORCH_CHECK(weight.defined(), "torchlora: the adapter targets module '", path,
                "' but the TorchScript model has no parameter '", path, ".weight'");
    const auto delta_shape = io::delta_weight(w, adapter.config.fan_in_fan_out).sizes().vec();
    TORCH_CHECK(weight.sizes().vec() == delta_shape, "torchlora: module '", path, "': the adapter changes a weight of shape ",
                shape_str(delta_shape), " but '", path, ".weight' has shape ", shape_str(weight.sizes()));
    TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "torchlora: '", path,
                ".weight' is not floating point; the adapter cannot be merged into it");
    if (w.lora_bias.defined()) {
      const auto bias = parameter(path + ".bias");
      TORCH_CHECK(bias.defined(), "torchlora: module '", path,
                  "': the adapter has lora_bias but the model has no parameter '", path, ".bias'");
      TORCH_CHECK(bias.sizes() == w.lora_bias.sizes(), "torchlora: '", path, ".bias' has shape ",
                  shape_str(bias.sizes()), " but lora_B.bias has ", shape_str(w.lora_bias.sizes()));
    }
  }
  for (const auto& [name, t] : adapter.other_tensors) {
    const auto param = parameter(name);
    TORCH_CHECK(param.defined(), "torchlora: the adapter holds '", name,
                "' (modules_to_save) but the TorchScript model has no such parameter");
    TORCH_CHECK(param.sizes() == t.sizes(), "torchlora: '", name, "' has shape ", shape_str(param.sizes()),
                " in the model but ", shape_str(t.sizes()), " in the adapter");
  }
}

void ScriptModuleMerger::remember_original(const std::string& name, const at::Tensor& param) {
  if (originals_.find(name) == originals_.end()) {
    originals_.emplace(name, param.detach().clone());
  }
  touched_.push_back(name);
}

at::Tensor ScriptModuleMerger::original_parameter(const std::string& name) const {
  auto it = originals_.find(name);
  return it != originals_.end() ? it->second : parameter(name);
}

io::PeftAdapter ScriptModuleMerger::for_original_weights(const io::PeftAdapter& adapter) const {
  return io::adapter_for_original_weights(adapter,
                                          [this](const std::string& path) { return original_parameter(path + ".weight"); });
}

void ScriptModuleMerger::merge(const io::PeftAdapter& given) {
  TORCH_CHECK(!merged_, "torchlora: an adapter is already merged into the TorchScript model; unmerge it first");
  check_compatible(given);
  std::optional<io::PeftAdapter> converted;
  if (io::applies_to_rewritten_base_weights(given.config)) {
    converted = for_original_weights(given);
  }
  const io::PeftAdapter& adapter = converted ? *converted : given;
  at::NoGradGuard no_grad;
  touched_.clear();
  merged_ = true;  // from here on, unmerge() undoes whatever was applied, also after an error
  try {
    for (const auto& [path, w] : adapter.modules) {
      auto weight = parameter(path + ".weight");
      remember_original(path + ".weight", weight);
      const auto delta = io::delta_weight(w, adapter.config.fan_in_fan_out).to(weight.device());
      // Sum in the wider type, round once into the parameter's dtype.
      weight.copy_(originals_.at(path + ".weight").to(delta.scalar_type()).add(delta));
      if (w.lora_bias.defined()) {
        auto bias = parameter(path + ".bias");
        remember_original(path + ".bias", bias);
        const auto db = io::delta_bias(w).to(bias.device());
        bias.copy_(originals_.at(path + ".bias").to(db.scalar_type()).add(db));
      }
    }
    for (const auto& [name, t] : adapter.other_tensors) {
      auto param = parameter(name);
      remember_original(name, param);
      param.copy_(t);
    }
  } catch (...) {
    unmerge();
    throw;
  }
}

void ScriptModuleMerger::unmerge() {
  if (!merged_) {
    return;
  }
  at::NoGradGuard no_grad;
  for (const auto& name : touched_) {
    parameter(name).copy_(originals_.at(name));
  }
  touched_.clear();
  merged_ = false;
}

LoraScriptModel::LoraScriptModel(torch::jit::Module module) : merger_(std::move(module)) {
  TORCH_WARN_ONCE("torchlora: LoraScriptModel serves TorchScript models, which PyTorch deprecates (torch >= 2.10 "
                  "warns on torch.jit.script/trace/save/load); new servers should export with torchlora.export "
                  "(torch.export + AOTInductor) and load the package with torchlora::serve::ExportedModel");
  merger_.module().eval();
}

void LoraScriptModel::load_adapter(const std::string& name, const std::string& dir) {
  add_adapter(name, io::load_peft_adapter(dir));
}

void LoraScriptModel::add_adapter(const std::string& name, io::PeftAdapter adapter) {
  // Shapes and names of parameters never change, so checking needs no lock.
  merger_.check_compatible(adapter);
  if (io::applies_to_rewritten_base_weights(adapter.config, "adapter '" + name + "'")) {
    // Converted once, here. A swap changes parameters only under the exclusive lock: copy each
    // original weight under the shared lock and factor it outside, so serving goes on meanwhile.
    adapter = io::adapter_for_original_weights(adapter, [this](const std::string& path) {
      std::shared_lock lock(state_mutex_);
      return merger_.original_parameter(path + ".weight").clone();
    });
  }
  registry_.add(name, std::make_shared<const io::PeftAdapter>(std::move(adapter)));
}

bool LoraScriptModel::remove_adapter(const std::string& name) {
  // A merged adapter stays merged (and alive through active_) until the next switch.
  return registry_.remove(name);
}

std::string LoraScriptModel::active_adapter() const {
  std::shared_lock lock(state_mutex_);
  return active_name_;
}

void LoraScriptModel::switch_to(const std::string& name, const AdapterRegistry::AdapterPtr& adapter) {
  merger_.unmerge();
  active_name_ = peft::kBaseAdapterName;
  active_ = nullptr;
  if (adapter != nullptr) {
    merger_.merge(*adapter);
    active_name_ = name;
    active_ = adapter;
  }
}

c10::IValue LoraScriptModel::forward(std::vector<c10::IValue> inputs, const std::string& adapter) {
  // Resolve the name first: an unknown adapter fails without touching the model.
  const auto wanted = is_base(adapter) ? nullptr : registry_.get(adapter);
  {
    std::shared_lock lock(state_mutex_);
    if (active_ == wanted) {
      c10::InferenceMode inference;
      return merger_.module().forward(std::move(inputs));
    }
  }
  std::unique_lock lock(state_mutex_);
  if (active_ != wanted) {
    switch_to(adapter, wanted);
  }
  c10::InferenceMode inference;
  return merger_.module().forward(std::move(inputs));
}

}  // namespace torchlora::apply
