// PEFT adapter folders: adapter_config.json + adapter_model.safetensors.
#include <torchlora/io/peft_adapter.h>
#include <torchlora/io/safetensors.h>
#include <torchlora/io/weight_conversion.h>

#include <c10/util/Exception.h>

#include <filesystem>

namespace torchlora::io {

PeftAdapter load_peft_adapter(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  TORCH_CHECK(fs::is_directory(dir, ec), "torchlora: adapter folder '", dir, "' does not exist");
  const auto config_path = (fs::path(dir) / "adapter_config.json").string();
  const auto weights_path = (fs::path(dir) / "adapter_model.safetensors").string();
  TORCH_CHECK(fs::exists(weights_path, ec), "torchlora: ", dir,
              ": no adapter_model.safetensors (older adapter_model.bin pickles are not read from C++; "
              "convert them with torchlora or safetensors in Python)");
  auto config = load_adapter_config(config_path);
  // An adapter whose rewritten base weights cannot be recomputed applies to no model we have.
  applies_to_rewritten_base_weights(config, dir);
  auto contents = load_safetensors(weights_path);
  return adapter_from_state_dict(std::move(config), contents.tensors, weights_path);
}

void save_peft_adapter(const std::string& dir, const PeftAdapter& adapter) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  TORCH_CHECK(!ec, "torchlora: cannot create the adapter folder '", dir, "': ", ec.message());
  save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), adapter_state_dict(adapter));
  save_adapter_config((fs::path(dir) / "adapter_config.json").string(), adapter.config);
}

}  // namespace torchlora::io
