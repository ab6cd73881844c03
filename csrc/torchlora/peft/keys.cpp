#include <torchlora/peft/keys.h>

namespace torchlora::peft {

std::string remove_adapter_name(const std::string& key, const std::string& adapter_name) {
  const std::string segment = "." + adapter_name;
  const auto dot = key.rfind('.');
  if (dot == std::string::npos) return key;
  if (key.ends_with(segment)) return key.substr(0, key.size() - segment.size());
  std::string head = key.substr(0, dot);
  if (head.ends_with(segment)) head.resize(head.size() - segment.size());
  return head + key.substr(dot);
}

}  // namespace torchlora::peft
