// The TorchScript backend: one adapter merged into the model's weights at a time
// (torchlora::apply::LoraScriptModel). Requests for the merged adapter run concurrently; a request
// for another one swaps the weights under an exclusive lock. TorchScript is deprecated upstream
// (torch 2.10+ warns on torch.jit.*); serve torchlora.export packages with ExportedBackend instead.
#pragma once

#include <memory>
#include <string>

#include "backend.h"

namespace torchlora::apply {
class LoraScriptModel;
}

namespace lora_server {

class ScriptBackend : public Backend {
 public:
  ScriptBackend(const std::string& model_path, Metrics& metrics);
  ~ScriptBackend() override;
  std::string kind() const override { return "torchscript"; }
  c10::IValue forward(ForwardRequest request) override;
  void load_adapter(const std::string& name, const std::string& folder) override;
  bool unload_adapter(const std::string& name) override;
  nlohmann::json adapters() const override;

 private:
  bool has_adapter(const std::string& name) const;

  std::unique_ptr<torchlora::apply::LoraScriptModel> model_;
  Metrics& metrics_;
};

}  // namespace lora_server
