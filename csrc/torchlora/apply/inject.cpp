#include <torchlora/apply/inject.h>

#include <ATen/ATen.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <torchlora/apply/target_match.h>
#include <torchlora/apply/trainable_tokens.h>
#include <torchlora/io/parameter_adapters.h>
#include <torchlora/peft/config_schema.h>
#include <torchlora/io/weight_conversion.h>
#include <torchlora/nn/lora_conv2d.h>
#include <torchlora/nn/lora_embedding.h>
#include <torchlora/nn/lora_linear.h>

#include <map>

namespace torchlora::apply {
namespace {

using ModulePtr = std::shared_ptr<torch::nn::Module>;

bool inside(const std::string& name, const std::vector<std::string>& lora_paths) {
  for (const auto& p : lora_paths) {
    if (p.empty() || name.starts_with(p + ".")) return true;
  }
  return false;
}

nn::AdapterOptions options_for(const io::LoraConfig& config, const std::string& name, nn::LoraInit init) {
  return nn::AdapterOptions()
      .r(config.rank_for(name))
      .lora_alpha(config.alpha_for(name))
      .lora_dropout(config.lora_dropout)
      .use_rslora(config.use_rslora)
      .lora_bias(config.lora_bias)
      .use_dora(config.use_dora)
      .init(init);
}

std::shared_ptr<nn::LoraLayer> wrap(const ModulePtr& module, const std::string& name, const std::string& adapter,
                                    const nn::AdapterOptions& options) {
  if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(module)) {
    return std::make_shared<nn::LoraLinearImpl>(torch::nn::Linear(linear), adapter, options);
  }
  if (auto embedding = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(module)) {
    return std::make_shared<nn::LoraEmbeddingImpl>(torch::nn::Embedding(embedding), adapter, options);
  }
  if (auto conv = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(module)) {
    return std::make_shared<nn::LoraConv2dImpl>(torch::nn::Conv2d(conv), adapter, options);
  }
  TORCH_CHECK(false, "torchlora: Target module '", name, "' is a ", module->name(),
              ", which is not supported. Currently, only Linear, Embedding and Conv2d are supported.");
}

void copy_into(at::Tensor& param, const at::Tensor& value, const std::string& what) {
  TORCH_CHECK(param.sizes() == value.sizes(), "torchlora: ", what, " has shape ", param.sizes(),
              " in the model but ", value.sizes(), " in the adapter");
  at::NoGradGuard no_grad;
  param.copy_(value);
}

// The weight of the Linear at `path` of `modules` without any merged adapter.
at::Tensor original_linear_weight(const std::map<std::string, ModulePtr>& modules, const std::string& path) {
  auto it = modules.find(path);
  TORCH_CHECK(it != modules.end(), "torchlora: the adapter targets module '", path,
              "', which the model does not have (or which is not an exact path)");
  if (auto lora = std::dynamic_pointer_cast<nn::LoraLinearImpl>(it->second)) {
    TORCH_CHECK(!lora->merged(), "torchlora: module '", path,
                "' has merged adapters; unmerge them before loading a PiSSA / OLoRA adapter, whose initial factors "
                "are recomputed from the original weight");
    return lora->base_layer->weight;
  }
  if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(it->second)) {
    return linear->weight;
  }
  TORCH_CHECK(false, "torchlora: module '", path, "' is a ", it->second->name(), " but the adapter's factors are a Linear's");
}

}  // namespace

std::vector<InjectedLayer> inject_adapter(torch::nn::Module& root, const io::LoraConfig& config,
                                          const std::string& adapter_name, nn::LoraInit init) {
  config.validate();
  TORCH_CHECK(config.target_modules.is_set(),
              "torchlora: target_modules must be set to inject an adapter into a C++ module tree");
  std::map<std::string, ModulePtr> modules;
  std::vector<std::string> lora_paths;
  std::vector<std::string> targets;
  const bool all_linear = config.target_modules.kind == io::ModuleSelector::Kind::Regex &&
                          peft::is_all_linear(config.target_modules.regex);
  for (const auto& item : root.named_modules("", /*include_self=*/true)) {
    modules.emplace(item.key(), item.value());
    if (inside(item.key(), lora_paths)) continue;  // the insides of a LoRA layer are not targets
    if (std::dynamic_pointer_cast<nn::LoraLayer>(item.value())) lora_paths.push_back(item.key());
    if (item.key().empty()) continue;
    // A torch::nn::Module tree has no output head to leave out (PEFT only leaves out that of a
    // transformers model), so "all-linear" is every Linear, as in Python for a plain nn.Module.
    const bool linear = item.value()->as<torch::nn::Linear>() != nullptr ||
                        std::dynamic_pointer_cast<nn::LoraLinearImpl>(item.value()) != nullptr;
    const bool target = all_linear ? linear : is_target_module(config, item.key());
    if (target && match_target_module(config, item.key()) != TargetMatch::Excluded) targets.push_back(item.key());
  }
  TORCH_CHECK(!targets.empty(), "torchlora: Target modules ",
              config.target_modules.kind == io::ModuleSelector::Kind::Regex ? config.target_modules.regex : "(list)",
              " not found in the base model. Please check the target modules and try again.");

  std::vector<InjectedLayer> injected;
  for (const auto& name : targets) {
    const auto module = modules.at(name);
    const auto options = options_for(config, name, init);
    if (auto lora = std::dynamic_pointer_cast<nn::LoraLayer>(module)) {
      lora->update_layer(adapter_name, options);
      injected.push_back({name, lora, false});
      continue;
    }
    auto lora = wrap(module, name, adapter_name, options);
    const auto dot = name.rfind('.');
    const auto parent_name = dot == std::string::npos ? std::string() : name.substr(0, dot);
    const auto child_name = dot == std::string::npos ? name : name.substr(dot + 1);
    modules.at(parent_name)->replace_module(child_name, lora);
    injected.push_back({name, lora, true});
  }
  return injected;
}

std::vector<std::pair<std::string, std::shared_ptr<nn::LoraLayer>>> lora_layers(torch::nn::Module& root) {
  std::vector<std::pair<std::string, std::shared_ptr<nn::LoraLayer>>> out;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) {
    if (auto lora = std::dynamic_pointer_cast<nn::LoraLayer>(item.value())) {
      out.emplace_back(item.key(), lora);
    }
  }
  return out;
}

std::vector<InjectedLayer> load_adapter(torch::nn::Module& root, const io::PeftAdapter& given,
                                        const std::string& adapter_name) {
  // PiSSA / OLoRA: the equivalent adapter for the original weights, so that the base layers stay
  // untouched and shared with the other adapters (PEFT would rewrite them).
  std::map<std::string, ModulePtr> modules;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) modules.emplace(item.key(), item.value());
  const io::PeftAdapter adapter = io::adapter_for_original_weights(
      given, [&modules](const std::string& path) { return original_linear_weight(modules, path); });
  TORCH_CHECK_NOT_IMPLEMENTED(io::target_parameters(adapter.config).empty(), "torchlora: the adapter uses "
                              "target_parameters (LoRA on nn.Parameters such as MoE expert weights), for which C++ "
                              "module trees have no layer; merge it with io::merge_parameter_adapters");
  // Trainable token rows are written into their embeddings once the LoRA layers are in place.
  const auto token_rows = io::trainable_token_rows(adapter, "adapter '" + adapter_name + "'");
  std::map<std::string, at::Tensor> others = adapter.other_tensors;
  std::erase_if(others, [](const auto& item) { return io::is_trainable_tokens_key(item.first); });
  TORCH_CHECK_NOT_IMPLEMENTED(others.empty(), "torchlora: the adapter holds ",
                              others.size(), " non-LoRA tensors (modules_to_save, e.g. '",
                              others.empty() ? "" : others.begin()->first,
                              "'), which C++ module trees do not support; serve it through LoraScriptModel");
  // Target exactly the modules the file holds (the config may name more than the model has).
  io::LoraConfig config = adapter.config;
  std::vector<std::string> paths;
  for (const auto& [path, _] : adapter.modules) paths.push_back(path);
  config.target_modules = io::ModuleSelector::from_names(paths);
  config.exclude_modules = {};
  config.layers_to_transform.reset();
  config.layers_pattern.clear();
  config.modules_to_save.clear();

  std::map<std::string, std::shared_ptr<nn::LoraLayer>> before;
  for (auto& [name, layer] : lora_layers(root)) before.emplace(name, layer);
  auto injected = inject_adapter(root, config, adapter_name);
  std::map<std::string, std::shared_ptr<nn::LoraLayer>> by_name;
  for (const auto& item : injected) by_name.emplace(item.name, item.layer);
  for (const auto& [path, w] : adapter.modules) {
    auto it = by_name.find(path);
    TORCH_CHECK(it != by_name.end(), "torchlora: the adapter targets module '", path,
                "', which the model does not have (or which is not an exact path)");
    const auto& layer = it->second;
    const std::string where = "module '" + path + "'";
    if (auto lin = std::dynamic_pointer_cast<nn::LoraLinearImpl>(layer)) {
      TORCH_CHECK(w.kind == io::LoraKind::Linear, "torchlora: ", where, " is a Linear but the adapter's factors are not");
      copy_into(lin->lora_A->at<torch::nn::LinearImpl>(adapter_name).weight, w.lora_A, where + " lora_A");
      auto& b = lin->lora_B->at<torch::nn::LinearImpl>(adapter_name);
      copy_into(b.weight, w.lora_B, where + " lora_B");
      if (w.lora_bias.defined()) copy_into(b.bias, w.lora_bias, where + " lora_B.bias");
    } else if (auto emb = std::dynamic_pointer_cast<nn::LoraEmbeddingImpl>(layer)) {
      TORCH_CHECK(w.kind == io::LoraKind::Embedding, "torchlora: ", where, " is an Embedding but the adapter's factors are not");
      copy_into(emb->lora_embedding_A->get(adapter_name), w.lora_A, where + " lora_embedding_A");
      copy_into(emb->lora_embedding_B->get(adapter_name), w.lora_B, where + " lora_embedding_B");
    } else if (auto conv = std::dynamic_pointer_cast<nn::LoraConv2dImpl>(layer)) {
      TORCH_CHECK(w.kind == io::LoraKind::Conv2d, "torchlora: ", where, " is a Conv2d but the adapter's factors are not");
      copy_into(conv->lora_A->at<torch::nn::Conv2dImpl>(adapter_name).weight, w.lora_A, where + " lora_A");
      auto& b = conv->lora_B->at<torch::nn::Conv2dImpl>(adapter_name);
      copy_into(b.weight, w.lora_B, where + " lora_B");
      if (w.lora_bias.defined()) copy_into(b.bias, w.lora_bias, where + " lora_B.bias");
    } else {
      TORCH_CHECK(false, "torchlora: ", where, " is not a torchlora LoRA layer");
    }
    if (w.magnitude.defined()) {
      auto m = layer->magnitude(adapter_name);
      copy_into(m, w.magnitude, where + " lora_magnitude_vector");
    }
    // Like PEFT's load_adapter: loaded, not activated. A freshly wrapped layer made it active.
    auto active = layer->active_adapters();
    if (!before.count(path)) {
      active.clear();
    }
    layer->set_adapter(active, /*inference_mode=*/true);
  }
  write_trainable_tokens(root, token_rows);
  return injected;
}

void set_adapter(torch::nn::Module& root, const std::vector<std::string>& adapter_names) {
  for (auto& [name, layer] : lora_layers(root)) {
    std::vector<std::string> held;
    for (const auto& a : adapter_names) {
      if (layer->has_adapter(a)) held.push_back(a);
    }
    layer->set_adapter(held);
  }
}

void enable_adapters(torch::nn::Module& root, bool enabled) {
  for (auto& [name, layer] : lora_layers(root)) layer->enable_adapters(enabled);
}

void merge_adapter(torch::nn::Module& root, const std::vector<std::string>& adapter_names) {
  for (auto& [name, layer] : lora_layers(root)) {
    std::vector<std::string> held;
    for (const auto& a : adapter_names.empty() ? layer->active_adapters() : adapter_names) {
      if (layer->has_adapter(a)) held.push_back(a);
    }
    if (!held.empty()) layer->merge(false, held);
  }
}

void unmerge_adapter(torch::nn::Module& root) {
  for (auto& [name, layer] : lora_layers(root)) {
    if (layer->merged()) layer->unmerge();
  }
}

void delete_adapter(torch::nn::Module& root, const std::string& adapter_name) {
  bool found = false;
  for (auto& [name, layer] : lora_layers(root)) {
    if (layer->has_adapter(adapter_name)) {
      layer->delete_adapter(adapter_name);
      found = true;
    }
  }
  TORCH_CHECK(found, "torchlora: no layer holds the adapter '", adapter_name, "'");
}

at::Tensor forward_child(torch::nn::Module& parent, const std::string& name, const at::Tensor& x) {
  const auto children = parent.named_children();
  const auto* child = children.find(name);
  TORCH_CHECK(child != nullptr, "torchlora: ", parent.name(), " has no child module '", name, "'");
  const auto& m = *child;
  if (auto l = std::dynamic_pointer_cast<nn::LoraLinearImpl>(m)) return l->forward(x);
  if (auto l = std::dynamic_pointer_cast<nn::LoraEmbeddingImpl>(m)) return l->forward(x);
  if (auto l = std::dynamic_pointer_cast<nn::LoraConv2dImpl>(m)) return l->forward(x);
  if (auto l = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) return l->forward(x);
  if (auto l = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(m)) return l->forward(x);
  if (auto l = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m)) return l->forward(x);
  TORCH_CHECK(false, "torchlora: child '", name, "' is a ", m->name(),
              "; forward_child runs Linear, Embedding, Conv2d and their LoRA layers");
}

}  // namespace torchlora::apply
