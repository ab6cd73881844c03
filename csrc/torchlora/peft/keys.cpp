#include <torchlora/peft/keys.h>
#include <torchlora/peft/trainable_tokens_keys.h>

namespace torchlora::peft {
namespace {

// "lora_A.weight" with adapter "x" -> "lora_A.x.weight"; "lora_embedding_A" -> "lora_embedding_A.x";
// "lora_magnitude_vector" -> "lora_magnitude_vector.x.weight" (PEFT keeps DoRA's magnitude in a module)
std::string with_adapter(const std::string& local, const std::string& adapter_name) {
  if (local == "lora_magnitude_vector") return local + "." + adapter_name + ".weight";
  if (local == kTrainableTokensDelta) return local + "." + adapter_name;  // a ParameterDict inside token_adapter
  const auto dot = local.find('.');
  if (dot == std::string::npos) return local + "." + adapter_name;
  return local.substr(0, dot) + "." + adapter_name + local.substr(dot);
}

// `key` is `suffix` or ends in "." + suffix
bool ends_with_part(const std::string& key, const std::string& suffix) {
  return key == suffix || (key.size() > suffix.size() && key.ends_with(suffix) &&
                           key[key.size() - suffix.size() - 1] == '.');
}

}  // namespace

std::string to_peft_key(const std::string& module_key, const std::string& adapter_name, bool with_prefix) {
  std::string key = module_key;
  for (const char* local : kLoraTensorNames) {
    const std::string named = with_adapter(local, adapter_name);
    if (ends_with_part(key, named)) {
      key = key.substr(0, key.size() - named.size()) + local;
      break;
    }
  }
  const std::string tokens = with_adapter(kTrainableTokensDelta, adapter_name);
  if (ends_with_part(key, tokens)) key = key.substr(0, key.size() - tokens.size()) + kTrainableTokensDelta;
  return with_prefix ? kPeftKeyPrefix + key : key;
}

std::string from_peft_key(const std::string& peft_key, const std::string& adapter_name) {
  const std::string prefix = kPeftKeyPrefix;
  const std::string key = peft_key.starts_with(prefix) ? peft_key.substr(prefix.size()) : peft_key;
  std::string path;
  const int index = split_lora_key(key, &path);
  if (index < 0 && ends_with_part(key, kTrainableTokensDelta)) return key + "." + adapter_name;
  if (index < 0) return key;
  return key.substr(0, key.size() - std::string(kLoraTensorNames[index]).size()) +
         with_adapter(kLoraTensorNames[index], adapter_name);
}

int split_lora_key(const std::string& key, std::string* module_path) {
  for (size_t i = 0; i < kLoraTensorNames.size(); ++i) {
    const std::string local = kLoraTensorNames[i];
    if (ends_with_part(key, local)) {
      if (module_path != nullptr) {
        *module_path = key.size() > local.size() ? key.substr(0, key.size() - local.size() - 1) : std::string();
      }
      return static_cast<int>(i);
    }
  }
  return -1;
}

}  // namespace torchlora::peft
