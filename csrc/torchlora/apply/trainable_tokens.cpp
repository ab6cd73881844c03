// Trainable token rows on C++ module trees (see trainable_tokens.h).
#include <torchlora/apply/trainable_tokens.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <vector>

#include <torchlora/nn/lora_embedding.h>
#include <torchlora/nn/lora_linear.h>

namespace torchlora::apply {
namespace {

at::Tensor row_weight(const std::shared_ptr<torch::nn::Module>& m, const std::string& path) {
  if (auto e = std::dynamic_pointer_cast<torch::nn::EmbeddingImpl>(m)) return e->weight;
  if (auto e = std::dynamic_pointer_cast<nn::LoraEmbeddingImpl>(m)) return e->base_layer->weight;
  if (auto l = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) return l->weight;
  if (auto l = std::dynamic_pointer_cast<nn::LoraLinearImpl>(m)) return l->base_layer->weight;
  TORCH_CHECK_VALUE(false, "torchlora: trainable_token_indices: module '", path, "' is a ", m->name(),
                    "; trainable tokens replace rows of an Embedding (or of a tied Linear output layer)");
}

}  // namespace

void write_trainable_tokens(torch::nn::Module& root, const std::map<std::string, io::TrainableTokenRows>& rows) {
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) modules.emplace(item.key(), item.value());
  std::vector<std::pair<at::Tensor, at::Tensor>> writes;  // (weight, new value): all checked first
  for (const auto& [path, r] : rows) {
    const auto it = modules.find(path);
    TORCH_CHECK_VALUE(it != modules.end(), "torchlora: trainable_token_indices: the adapter has rows for module '",
                      path, "', which the model does not have");
    const auto weight = row_weight(it->second, path);
    writes.emplace_back(weight, io::with_trainable_tokens(weight, r, "module '" + path + "'"));
  }
  at::NoGradGuard no_grad;
  for (auto& [weight, value] : writes) weight.copy_(value);
}

}  // namespace torchlora::apply
