// Adapters on a C++ module tree (torch::nn::Module): inject LoRA layers by PEFT's target rules,
// load adapter weights into them, switch adapters.
//
// A C++ parent reaches its children through typed holders that cannot be re-pointed from
// outside, so injection works in two ways:
//  - modules that already are torchlora LoRA layers (declare them as torchlora::nn::LoraLinear
//    etc. wrapping the plain layer; without adapters they compute the plain layer) get the new
//    adapter added in place;
//  - plain Linear / Embedding / Conv2d children are wrapped and replaced in their parent's
//    registry (Module::replace_module). A parent sees the wrapper when it calls the child
//    through the registry, e.g. with forward_child(*this, "fc", x).
#pragma once

#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/nn/lora_layer.h>

namespace torchlora::apply {

struct InjectedLayer {
  std::string name;                        // the module path, e.g. "encoder.0.fc"
  std::shared_ptr<nn::LoraLayer> layer;    // the LoRA layer now at that path
  bool replaced = false;                   // true if a plain layer was wrapped and replaced
};

// Adds adapter `adapter_name` to every module of `root` that `config` targets (target_modules,
// exclude_modules, layers_to_transform; rank/alpha from rank_pattern/alpha_pattern). Raises
// c10::Error if nothing matches, if a target is not a Linear, Embedding or Conv2d, or if a
// plain target is the root itself (it has no parent to be replaced in).
TORCHLORA_API std::vector<InjectedLayer> inject_adapter(torch::nn::Module& root, const io::LoraConfig& config,
                                                        const std::string& adapter_name = "default",
                                                        nn::LoraInit init = nn::LoraInit::Default);

// Injects (where needed) and copies the adapter's weights into `root` under `adapter_name`.
// The adapter is not activated (as PEFT's load_adapter); call set_adapter. A PiSSA / OLoRA
// adapter (its factors apply to the residual weights its initialisation left) is loaded as its
// equivalent for the original weights, rank 2r (io::adapter_for_original_weights): the outputs
// are PEFT's and the base layers stay untouched; their adapters must not be merged meanwhile.
TORCHLORA_API std::vector<InjectedLayer> load_adapter(torch::nn::Module& root, const io::PeftAdapter& adapter,
                                                      const std::string& adapter_name = "default");

// Every LoRA layer under `root`, by module path.
TORCHLORA_API std::vector<std::pair<std::string, std::shared_ptr<nn::LoraLayer>>> lora_layers(torch::nn::Module& root);

// Applied to every LoRA layer holding the adapter(s) (others are left alone).
TORCHLORA_API void set_adapter(torch::nn::Module& root, const std::vector<std::string>& adapter_names);
TORCHLORA_API void enable_adapters(torch::nn::Module& root, bool enabled);
TORCHLORA_API void merge_adapter(torch::nn::Module& root, const std::vector<std::string>& adapter_names = {});
TORCHLORA_API void unmerge_adapter(torch::nn::Module& root);
TORCHLORA_API void delete_adapter(torch::nn::Module& root, const std::string& adapter_name);

// Runs the registered child `name` of `parent` (Linear, Embedding, Conv2d or their LoRA
// wrappers) on `x`: forward code written this way picks up injected layers.
TORCHLORA_API at::Tensor forward_child(torch::nn::Module& parent, const std::string& name, const at::Tensor& x);

}  // namespace torchlora::apply
