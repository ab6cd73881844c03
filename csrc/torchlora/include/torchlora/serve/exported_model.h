// A model exported from Python with torchlora.export (torch.export + AOTInductor, a `.pt2`
// package) whose LoRA layers read an AdapterPool's slots: one forward serves a batch whose rows
// use different adapters, and swapping adapters only rewrites slot tensors (nothing recompiles).
//
// The exported forward takes, flattened in this order:
//   the model's own inputs (num_model_inputs tensors, batch first),
//   sample_slots [B] int64, request_scale [S] float32 (BatchLease),
//   then for every LoRA layer in metadata order: lora_A, lora_B, [lora_bias,] scale (SlotStacks).
// The package's metadata key "torchlora" holds a JSON document describing this (format 1):
//   {"format": 1, "num_model_inputs": N, "max_loras": S, "max_lora_rank": R, "lora_bias": false,
//    "dtype": "float32", "device": "cpu",
//    "layers": [{"name": "...", "kind": "linear"|"embedding"|"conv2d", "weight_shape": [...], "groups": 1}]}
//
// The operators must be registered before AOTIModelPackageLoader is constructed: linking
// libtorchlora and constructing this class guarantees it (the constructor references the
// library, so a linker's --as-needed cannot drop it).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/serve/adapter_pool.h>

namespace torchlora::serve {

struct ExportedModelInfo {
  int64_t format = 1;
  int64_t num_model_inputs = 1;
  std::vector<TargetLayer> layers;
  PoolOptions pool;  // max_loras, max_lora_rank, lora_bias, dtype, device of the export
};

class TORCHLORA_API ExportedModel {
 public:
  // Loads `package_path` (c10::Error naming the file if it is not a torchlora export, or was
  // built for another format / device). device_index: the CUDA device for CUDA packages.
  explicit ExportedModel(const std::string& package_path, const std::string& model_name = "model",
                         c10::DeviceIndex device_index = -1);
  ~ExportedModel();

  const ExportedModelInfo& info() const;
  // A pool that fits this model (its layers and options; max_cpu_loras as given).
  std::shared_ptr<AdapterPool> make_pool(int64_t max_cpu_loras = 0) const;

  // Runs the model's inputs (batch first, lease.sample_slots() has one slot per sample) with
  // the pool's slots. Thread-safe; checks that the pool was made for this model.
  std::vector<at::Tensor> forward(const std::vector<at::Tensor>& inputs, const AdapterPool& pool,
                                  const BatchLease& lease) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace torchlora::serve
