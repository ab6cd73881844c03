#include "script_backend.h"

#include <torch/script.h>

#include <algorithm>
#include <chrono>

#include <torchlora/apply/script_model.h>

#include "http_error.h"

namespace lora_server {
namespace {

bool is_base(const std::string& name) { return name.empty() || name == "__base__"; }

std::string message(const c10::Error& e) { return e.what_without_backtrace(); }

}  // namespace

ScriptBackend::ScriptBackend(const std::string& model_path, Metrics& metrics)
    : model_(std::make_unique<torchlora::apply::LoraScriptModel>(torch::jit::load(model_path))), metrics_(metrics) {}

ScriptBackend::~ScriptBackend() = default;

bool ScriptBackend::has_adapter(const std::string& name) const {
  const auto names = model_->adapter_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

c10::IValue ScriptBackend::forward(ForwardRequest request) {
  if (request.scale != 1.0) {
    throw HttpError(400, "scale: the TorchScript backend merges adapters as saved and supports only scale 1");
  }
  const auto name = is_base(request.adapter) ? std::string("__base__") : request.adapter;
  if (!is_base(name) && !has_adapter(name)) throw HttpError(404, "unknown adapter '" + name + "'");
  const auto start = std::chrono::steady_clock::now();
  try {
    torch::NoGradGuard no_grad;
    auto output = model_->forward({request.input}, name);
    metrics_.observe_batch(1, request.input.dim() > 0 ? request.input.size(0) : 1);
    metrics_.observe_forward_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return output;
  } catch (const c10::Error& e) {
    // unloaded between the check and the forward
    if (!is_base(name) && !has_adapter(name)) throw HttpError(404, message(e));
    throw HttpError(400, "the model rejected the input: " + message(e));
  } catch (const std::runtime_error& e) {  // errors raised inside the TorchScript interpreter
    throw HttpError(400, std::string("the model rejected the input: ") + e.what());
  }
}

void ScriptBackend::load_adapter(const std::string& name, const std::string& folder) {
  try {
    model_->load_adapter(name, folder);
  } catch (const c10::Error& e) {
    throw HttpError(400, message(e));
  }
}

bool ScriptBackend::unload_adapter(const std::string& name) { return model_->remove_adapter(name); }

nlohmann::json ScriptBackend::adapters() const {
  auto list = nlohmann::json::array();
  const auto active = model_->active_adapter();
  for (const auto& name : model_->adapter_names()) list.push_back({{"name", name}, {"merged", name == active}});
  return {{"backend", kind()}, {"active", active}, {"adapters", list}};
}

}  // namespace lora_server
