// Serving a C++ module tree (torchlora::nn LoRA layers, e.g. after apply::inject_adapter) from an
// AdapterPool: the same slots, leases and checks as an exported model.
#pragma once

#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/nn/lora_layer.h>
#include <torchlora/serve/adapter_pool.h>

namespace torchlora::serve {

// The LoRA layers under `root` as the pool's target layers (module paths, kinds, base shapes).
TORCHLORA_API std::vector<TargetLayer> target_layers(torch::nn::Module& root);

// While alive, every LoRA layer under `root` computes forward(x) as its base layer plus each
// sample's pool slot (lease.sample_slots(): one per sample of x), scaled by the slot's scaling
// times the lease's request scale. One binding per root at a time (c10::Error otherwise); the
// destructor restores the layers' own adapters.
class TORCHLORA_API PoolBinding {
 public:
  PoolBinding(torch::nn::Module& root, const AdapterPool& pool, const BatchLease& lease);
  ~PoolBinding();
  PoolBinding(const PoolBinding&) = delete;
  PoolBinding& operator=(const PoolBinding&) = delete;

 private:
  std::vector<std::shared_ptr<nn::LoraLayer>> layers_;
};

}  // namespace torchlora::serve
