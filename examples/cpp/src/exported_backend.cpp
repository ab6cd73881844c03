#include "exported_backend.h"

#include "http_error.h"

namespace lora_server {
namespace {

namespace serve = torchlora::serve;

}  // namespace

ExportedBackend::ExportedBackend(const std::string& package_path, int64_t max_cpu_loras, BatchOptions batching,
                                 Metrics& metrics)
    : model_(package_path) {
  TORCH_CHECK(model_.info().num_model_inputs == 1, "lora_server feeds one input tensor per request, but ",
              package_path, " was exported with ", model_.info().num_model_inputs, " model inputs");
  pool_ = model_.make_pool(max_cpu_loras);
  queue_ = std::make_unique<BatchQueue>(model_, *pool_, metrics, batching);
}

ExportedBackend::~ExportedBackend() { queue_->stop(); }

c10::IValue ExportedBackend::forward(ForwardRequest request) {
  if (request.input.dim() < 1) throw HttpError(400, "input: needs a batch dimension (a list of samples)");
  if (!(request.scale >= 0.0)) throw HttpError(400, "scale must be a number >= 0");
  return queue_->submit(std::move(request)).get();
}

void ExportedBackend::load_adapter(const std::string& name, const std::string& folder) {
  if (name.empty() || name == "__base__") throw HttpError(400, "name: '" + name + "' is reserved for the base model");
  try {
    pool_->load(name, folder);
  } catch (const serve::PoolExhausted& e) {
    throw HttpError(503, e.what_without_backtrace());
  } catch (const c10::Error& e) {  // AdapterRejected and unreadable files
    throw HttpError(400, e.what_without_backtrace());
  }
}

bool ExportedBackend::unload_adapter(const std::string& name) { return pool_->unload(name); }

void ExportedBackend::compose_adapter(const std::string& name, const std::vector<std::pair<std::string, double>>& parts,
                                      const torchlora::peft::WeightedAdapterOptions& options) {
  if (name.empty() || name == "__base__") throw HttpError(400, "name: '" + name + "' is reserved for the base model");
  try {
    pool_->compose(name, parts, options);
  } catch (const serve::AdapterNotFound& e) {
    throw HttpError(404, e.what_without_backtrace());
  } catch (const serve::PoolExhausted& e) {
    throw HttpError(503, e.what_without_backtrace());
  } catch (const c10::Error& e) {  // AdapterRejected and the options add_weighted_adapter rejects
    throw HttpError(400, e.what_without_backtrace());
  }
}

nlohmann::json ExportedBackend::adapters() const {
  auto list = nlohmann::json::array();
  for (const auto& s : pool_->status()) {
    list.push_back({{"name", s.name}, {"rank", s.rank}, {"folder", s.folder}, {"slot", s.slot},
                    {"on_host", s.on_host}, {"in_use", s.in_use}});
  }
  const auto& options = pool_->options();
  return {{"backend", kind()},
          {"max_loras", options.max_loras},
          {"max_lora_rank", options.max_lora_rank},
          {"max_cpu_loras", options.max_cpu_loras},
          {"adapters", list}};
}

std::vector<ExternalMetric> ExportedBackend::metrics() const {
  const auto s = pool_->stats();
  const auto counter = [](const std::string& name, const std::string& help, int64_t v) {
    return ExternalMetric{"lora_server_pool_" + name + "_total", "counter", help, static_cast<double>(v)};
  };
  return {counter("slot_hits", "Adapters a batch found in a device slot already.", s.slot_hits),
          counter("slot_loads", "Adapters copied into a device slot.", s.slot_loads),
          counter("slot_evictions", "Device slots given to another adapter.", s.slot_evictions),
          counter("host_evictions", "Adapters dropped from the host tier.", s.host_evictions),
          counter("host_reloads", "Adapters read again from their folder.", s.host_reloads),
          ExternalMetric{"lora_server_pool_adapters", "gauge", "Adapters registered in the pool.",
                         static_cast<double>(pool_->adapter_names().size())}};
}

}  // namespace lora_server
