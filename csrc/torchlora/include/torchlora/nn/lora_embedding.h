#pragma once

#include <torch/nn/modules/container/parameterdict.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include <torchlora/nn/lora_layer.h>

namespace torchlora::nn {

// LoRA around a torch::nn::Embedding, computed by torchlora::lora_embedding: parameters
// lora_embedding_A.<adapter> [r, num_embeddings] and lora_embedding_B.<adapter> [dim, r]. The
// base layer's padding_idx, max_norm, norm_type and scale_grad_by_freq act on the low-rank
// gather as in PEFT; no dropout is applied.
class TORCHLORA_API LoraEmbeddingImpl : public LoraLayer {
 public:
  explicit LoraEmbeddingImpl(torch::nn::Embedding base);
  LoraEmbeddingImpl(torch::nn::Embedding base, const std::string& adapter_name, const AdapterOptions& options = {});

  void update_layer(const std::string& name, const AdapterOptions& options) override;
  at::Tensor get_delta_weight(const std::string& name) const override;
  void reset() {}

  int64_t num_embeddings = 0;
  int64_t embedding_dim = 0;
  torch::nn::Embedding base_layer{nullptr};
  torch::nn::ParameterDict lora_embedding_A{nullptr};
  torch::nn::ParameterDict lora_embedding_B{nullptr};

 protected:
  std::vector<at::Tensor> adapter_parameters(const std::string& name) const override;
  void remove_adapter_parameters(const std::string& name) override;
  at::Tensor base_forward(const at::Tensor& ids) override { return base_layer->forward(ids); }
  at::Tensor base_weight() const override { return base_layer->weight; }
  at::Tensor base_bias() const override { return {}; }
  at::Tensor lora_update(const std::string& name, const at::Tensor& ids, const at::Tensor& result) override;
  AdapterFactors stack_factors(const std::string& name) const override;
  at::Tensor multi_lora_update(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& x,
                               const at::Tensor& result) override;
  // max_norm renormalises each adapter's looked-up rows, scale_grad_by_freq scales their gradients
  // by the batch's id counts: both stay with the per-adapter loop.
  bool stacks_adapters() const override;
  // DoRA's norm runs over the columns of the [num_embeddings, dim] table.
  bool dora_fan_in_fan_out() const override { return true; }
  int64_t dora_weight_dim() const override { return 1; }
};
TORCH_MODULE(LoraEmbedding);

}  // namespace torchlora::nn
