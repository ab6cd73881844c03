#include <torchlora/nn/lora_embedding.h>

#include <ATen/ATen.h>

#include <torchlora/ops.h>

namespace torchlora::nn {

LoraEmbeddingImpl::LoraEmbeddingImpl(torch::nn::Embedding base) : LoraLayer("torchlora::nn::LoraEmbedding") {
  TORCH_CHECK(!base.is_empty(), "torchlora: LoraEmbedding needs a base Embedding, got an empty holder");
  num_embeddings = base->weight.size(0);
  embedding_dim = base->weight.size(1);
  base_layer = register_module("base_layer", base);
  lora_embedding_A = register_module("lora_embedding_A", torch::nn::ParameterDict());
  lora_embedding_B = register_module("lora_embedding_B", torch::nn::ParameterDict());
}

LoraEmbeddingImpl::LoraEmbeddingImpl(torch::nn::Embedding base, const std::string& adapter_name,
                                     const AdapterOptions& options)
    : LoraEmbeddingImpl(std::move(base)) {
  set_adapter(adapter_name);
  update_layer(adapter_name, options);
}

void LoraEmbeddingImpl::update_layer(const std::string& name, const AdapterOptions& options) {
  check_adapter_name(name);
  TORCH_CHECK_VALUE(!options.lora_bias(), "torchlora: lora_bias=true is not supported for LoraEmbedding.");
  check_options(options);
  auto a = at::randn({options.r(), num_embeddings});
  auto b = at::randn({embedding_dim, options.r()});
  if (options.init() != LoraInit::Random) {
    a.zero_();
    b.normal_();
  }
  if (lora_embedding_A->contains(name)) {
    remove_adapter_parameters(name);
  }
  lora_embedding_A->insert(name, a.set_requires_grad(true));
  lora_embedding_B->insert(name, b.set_requires_grad(true));
  register_adapter(name, options);
  move_adapter_to_base(name);
  init_dora(name);
  set_adapter(active_adapters());
}

std::vector<at::Tensor> LoraEmbeddingImpl::adapter_parameters(const std::string& name) const {
  std::vector<at::Tensor> out;
  if (lora_embedding_A->contains(name)) out.push_back(lora_embedding_A->get(name));
  if (lora_embedding_B->contains(name)) out.push_back(lora_embedding_B->get(name));
  return out;
}

void LoraEmbeddingImpl::remove_adapter_parameters(const std::string& name) {
  if (lora_embedding_A->contains(name)) lora_embedding_A->pop(name);
  if (lora_embedding_B->contains(name)) lora_embedding_B->pop(name);
}

at::Tensor LoraEmbeddingImpl::get_delta_weight(const std::string& name) const {
  adapter_options(name);  // raises for unknown names
  // The embedding weight is stored [num_embeddings, embedding_dim], i.e. [in, out].
  return torchlora::lora_delta_weight(lora_embedding_A->get(name), lora_embedding_B->get(name), scaling(name),
                                      /*fan_in_fan_out=*/true);
}

namespace {
// The base layer's padding_idx as the ops take it: non-negative, or -1 for none.
int64_t normalized_padding_idx(const torch::nn::EmbeddingOptions& opts, int64_t num_embeddings) {
  if (!opts.padding_idx().has_value()) return -1;
  return *opts.padding_idx() < 0 ? *opts.padding_idx() + num_embeddings : *opts.padding_idx();
}
}  // namespace

AdapterFactors LoraEmbeddingImpl::stack_factors(const std::string& name) const {
  return {lora_embedding_A->get(name), lora_embedding_B->get(name), at::Tensor()};
}

bool LoraEmbeddingImpl::stacks_adapters() const {
  const auto& opts = base_layer->options;
  return !opts.max_norm().has_value() && !(opts.scale_grad_by_freq() && at::GradMode::is_enabled());
}

at::Tensor LoraEmbeddingImpl::multi_lora_update(const AdapterStack& stack, const at::Tensor& sample_slots,
                                                const at::Tensor& ids, const at::Tensor& result) {
  const auto& opts = base_layer->options;
  const int64_t padding_idx = normalized_padding_idx(opts, num_embeddings);
  return torchlora::multi_lora_embedding(ids, result, stack.lora_A, stack.lora_B, stack.scale,
                                         row_slots(sample_slots, ids.numel()), padding_idx);
}

at::Tensor LoraEmbeddingImpl::lora_update(const std::string& name, const at::Tensor& ids, const at::Tensor& result) {
  const auto& opts = base_layer->options;
  auto A = lora_embedding_A->get(name);
  if (opts.max_norm().has_value()) {
    // F.embedding(ids, A.T, max_norm=...) renormalises the looked-up rows of A.T in place.
    at::NoGradGuard no_grad;
    auto At = A.t();
    at::embedding_renorm_(At, ids, *opts.max_norm(), opts.norm_type());
  }
  const int64_t padding_idx = normalized_padding_idx(opts, num_embeddings);
  return torchlora::lora_embedding(ids, result, A, lora_embedding_B->get(name), scaling(name), padding_idx,
                                   opts.scale_grad_by_freq());
}

}  // namespace torchlora::nn
