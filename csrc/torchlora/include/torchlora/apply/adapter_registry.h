// Named adapters shared between threads: loaders add and replace adapters while inference
// threads look them up. Lookups hand out shared_ptrs, so a replaced or removed adapter stays
// alive for the requests still using it.
#pragma once

#include <map>
#include <memory>
#include <shared_mutex>
#include <string>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/io/peft_adapter.h>

namespace torchlora::apply {

class TORCHLORA_API AdapterRegistry {
 public:
  using AdapterPtr = std::shared_ptr<const io::PeftAdapter>;

  // Adds `adapter` under `name`, replacing any adapter of that name.
  void add(const std::string& name, AdapterPtr adapter);
  // The adapter called `name`; raises c10::Error listing the known names if there is none.
  AdapterPtr get(const std::string& name) const;
  // The adapter called `name`, or nullptr.
  AdapterPtr find(const std::string& name) const;
  // Removes `name`; returns whether it was there.
  bool remove(const std::string& name);
  std::vector<std::string> names() const;
  size_t size() const;

 private:
  mutable std::shared_mutex mutex_;
  std::map<std::string, AdapterPtr> adapters_;
};

}  // namespace torchlora::apply
