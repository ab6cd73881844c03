// The exported-model backend: a torchlora.export package (.pt2, AOTInductor) whose LoRA layers
// read an adapter pool's slots, fed by a batching queue, so requests for different adapters share
// one forward and swapping adapters never recompiles.
#pragma once

#include <memory>
#include <string>

#include <torchlora/serve/adapter_pool.h>
#include <torchlora/serve/exported_model.h>

#include "backend.h"
#include "batch_queue.h"

namespace lora_server {

class ExportedBackend : public Backend {
 public:
  ExportedBackend(const std::string& package_path, int64_t max_cpu_loras, BatchOptions batching, Metrics& metrics);
  ~ExportedBackend() override;
  std::string kind() const override { return "exported"; }
  c10::IValue forward(ForwardRequest request) override;
  void load_adapter(const std::string& name, const std::string& folder) override;
  bool unload_adapter(const std::string& name) override;
  void compose_adapter(const std::string& name, const std::vector<std::pair<std::string, double>>& parts,
                       const torchlora::peft::WeightedAdapterOptions& options) override;
  nlohmann::json adapters() const override;
  std::vector<ExternalMetric> metrics() const override;
  void drain() override { queue_->stop(); }

 private:
  torchlora::serve::ExportedModel model_;
  std::shared_ptr<torchlora::serve::AdapterPool> pool_;
  std::unique_ptr<BatchQueue> queue_;
};

}  // namespace lora_server
