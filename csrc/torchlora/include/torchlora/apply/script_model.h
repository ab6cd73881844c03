// Adapters on a TorchScript model (torch::jit::Module exported from Python): an adapter's
// delta is merged into the parameters it targets, by name, and unmerged by restoring a copy of
// the original values, so base weights come back bit for bit and swapping adapter A for B is
// exact.
#pragma once

#include <torch/csrc/jit/api/module.h>

#include <map>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include <torchlora/apply/adapter_registry.h>
#include <torchlora/peft/names.h>
#include <torchlora/export.h>
#include <torchlora/io/peft_adapter.h>

namespace torchlora::apply {

// Merging one adapter at a time into a TorchScript module's parameters. Not thread-safe by
// itself; LoraScriptModel adds the locking.
class TORCHLORA_API ScriptModuleMerger {
 public:
  explicit ScriptModuleMerger(torch::jit::Module module);

  // Raises c10::Error (naming the module and parameter) if `adapter` targets a parameter the
  // model lacks or whose shape differs from the adapter's delta.
  void check_compatible(const io::PeftAdapter& adapter) const;
  // Adds the adapter's deltas (and lora_bias, and modules_to_save tensors) to the parameters.
  // A PiSSA / OLoRA adapter is first converted with for_original_weights (LoraScriptModel
  // converts once, when the adapter is added). Only one adapter can be merged at a time:
  // unmerge first.
  void merge(const io::PeftAdapter& adapter);
  // The adapter as it applies to the original parameters: PiSSA / OLoRA adapters (whose
  // factors apply to the residual weights their initialisation left) become the equivalent
  // plain adapters (io::adapter_for_original_weights); others are returned as they are.
  io::PeftAdapter for_original_weights(const io::PeftAdapter& adapter) const;
  // The value of parameter `name` before any merge (undefined if the model lacks it).
  at::Tensor original_parameter(const std::string& name) const;
  // Restores every parameter the merged adapter changed to its original value (exactly).
  void unmerge();
  bool merged() const { return merged_; }

  torch::jit::Module& module() { return module_; }
  const torch::jit::Module& module() const { return module_; }

 private:
  at::Tensor parameter(const std::string& name) const;  // undefined if missing
  void remember_original(const std::string& name, const at::Tensor& param);

  torch::jit::Module module_;
  std::map<std::string, at::Tensor> params_;     // the module's parameters (shared storage)
  std::map<std::string, at::Tensor> originals_;  // copies of the values before any merge
  std::vector<std::string> touched_;             // parameters the merged adapter changed
  bool merged_ = false;
};

// TorchScript is deprecated upstream (torch >= 2.10 warns on torch.jit.script/trace/save/load):
// this class stays for existing deployments and warns once when constructed. New servers load a
// torch.export + AOTInductor package with torchlora::serve::ExportedModel, whose adapters share
// one batch instead of taking turns under a lock.
//
// A TorchScript model serving several named adapters, safe to use from many threads:
// load_adapter / remove_adapter can run while other threads call forward. A forward for the
// adapter already merged runs concurrently with others (shared lock); one that needs another
// adapter swaps the weights and runs under an exclusive lock, so calls for alternating adapters
// serialise rather than see half-swapped weights. "__base__" (or "") runs the base model.
class TORCHLORA_API LoraScriptModel {
 public:
  explicit LoraScriptModel(torch::jit::Module module);

  // Reads a PEFT adapter folder and registers it under `name` (replacing one of that name).
  // PiSSA / OLoRA adapters saved unconverted are converted with the model's original weights
  // (see ScriptModuleMerger::for_original_weights), so they serve what PEFT computes; those
  // whose initialisation cannot be recomputed ("pissa_niter_<K>") are rejected.
  void load_adapter(const std::string& name, const std::string& dir);
  void add_adapter(const std::string& name, io::PeftAdapter adapter);
  bool remove_adapter(const std::string& name);
  std::vector<std::string> adapter_names() const { return registry_.names(); }

  // Runs the model's forward with `adapter` merged.
  c10::IValue forward(std::vector<c10::IValue> inputs, const std::string& adapter = peft::kBaseAdapterName);
  // Name of the adapter merged now ("__base__" for none).
  std::string active_adapter() const;

 private:
  void switch_to(const std::string& name, const AdapterRegistry::AdapterPtr& adapter);

  AdapterRegistry registry_;
  mutable std::shared_mutex state_mutex_;
  ScriptModuleMerger merger_;
  std::string active_name_ = peft::kBaseAdapterName;
  AdapterRegistry::AdapterPtr active_;  // what is merged now (kept alive while merged)
};

}  // namespace torchlora::apply
