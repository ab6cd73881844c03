#include <torchlora/apply/adapter_registry.h>
#include <torchlora/peft/names.h>

#include <c10/util/Exception.h>

#include <mutex>
#include <sstream>

namespace torchlora::apply {

void AdapterRegistry::add(const std::string& name, AdapterPtr adapter) {
  TORCH_CHECK(!name.empty(), "torchlora: an adapter name must not be empty");
  TORCH_CHECK_VALUE(name != peft::kBaseAdapterName, "torchlora: '", peft::kBaseAdapterName,
                    "' is reserved for the base model without adapters");
  TORCH_CHECK(adapter != nullptr, "torchlora: adapter '", name, "' is null");
  std::unique_lock lock(mutex_);
  adapters_[name] = std::move(adapter);
}

AdapterRegistry::AdapterPtr AdapterRegistry::find(const std::string& name) const {
  std::shared_lock lock(mutex_);
  auto it = adapters_.find(name);
  return it == adapters_.end() ? nullptr : it->second;
}

AdapterRegistry::AdapterPtr AdapterRegistry::get(const std::string& name) const {
  auto adapter = find(name);
  if (adapter == nullptr) {
    std::ostringstream known;
    for (const auto& n : names()) {
      known << (known.tellp() > 0 ? ", " : "") << "'" << n << "'";
    }
    TORCH_CHECK(false, "torchlora: unknown adapter '", name, "' (loaded: ", known.str().empty() ? "none" : known.str(),
                ")");
  }
  return adapter;
}

bool AdapterRegistry::remove(const std::string& name) {
  std::unique_lock lock(mutex_);
  return adapters_.erase(name) > 0;
}

std::vector<std::string> AdapterRegistry::names() const {
  std::shared_lock lock(mutex_);
  std::vector<std::string> out;
  for (const auto& [name, _] : adapters_) {
    out.push_back(name);
  }
  return out;
}

size_t AdapterRegistry::size() const {
  std::shared_lock lock(mutex_);
  return adapters_.size();
}

}  // namespace torchlora::apply
