// What the HTTP routes and the JSON-lines loop need from a model: a forward for one request with
// its adapter, loading and unloading adapters, their status, and metrics. Implementations:
// ExportedBackend (a torchlora.export package with an adapter pool and a batching queue) and
// ScriptBackend (a TorchScript model that merges one adapter at a time).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

#include <torchlora/peft/weighted_adapter.h>

#include "http_error.h"
#include "metrics.h"

namespace lora_server {

struct ForwardRequest {
  std::string adapter;  // "" or "__base__": the base model
  double scale = 1.0;   // multiplies the adapter's own scaling
  at::Tensor input;     // batch first
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string kind() const = 0;
  // Blocks until the request's output is ready; failures are HttpError with their status.
  virtual c10::IValue forward(ForwardRequest request) = 0;
  virtual void load_adapter(const std::string& name, const std::string& folder) = 0;
  virtual bool unload_adapter(const std::string& name) = 0;
  // Registers `name` as a weighted composition of loaded adapters (PEFT's add_weighted_adapter).
  virtual void compose_adapter(const std::string& name, const std::vector<std::pair<std::string, double>>& parts,
                               const torchlora::peft::WeightedAdapterOptions& options) {
    throw HttpError(501, "the " + kind() + " backend cannot compose adapters");
  }
  virtual nlohmann::json adapters() const = 0;
  virtual std::vector<ExternalMetric> metrics() const { return {}; }
  // Finishes every request already accepted; later forwards get HttpError(503).
  virtual void drain() {}
};

}  // namespace lora_server
