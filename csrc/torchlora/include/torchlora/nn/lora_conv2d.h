#pragma once

#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/pimpl.h>

#include <torchlora/nn/lora_layer.h>

namespace torchlora::nn {

// LoRA around a torch::nn::Conv2d, computed by torchlora::lora_conv2d: lora_A.<adapter> is a
// conv with the base layer's kernel size, stride and padding (in -> r), lora_B.<adapter> a 1x1
// conv (r -> out) with the base layer's groups; r must be divisible by groups.
class TORCHLORA_API LoraConv2dImpl : public LoraLayer {
 public:
  explicit LoraConv2dImpl(torch::nn::Conv2d base);
  LoraConv2dImpl(torch::nn::Conv2d base, const std::string& adapter_name, const AdapterOptions& options = {});

  void update_layer(const std::string& name, const AdapterOptions& options) override;
  at::Tensor get_delta_weight(const std::string& name) const override;
  void reset() {}

  int64_t in_channels = 0;
  int64_t out_channels = 0;
  torch::nn::Conv2d base_layer{nullptr};
  torch::nn::ModuleDict lora_A{nullptr};
  torch::nn::ModuleDict lora_B{nullptr};

 protected:
  std::vector<at::Tensor> adapter_parameters(const std::string& name) const override;
  void remove_adapter_parameters(const std::string& name) override;
  // DoRA: per output channel, along dimension 1 of [N, out, H, W] (0 when unbatched); magnitude
  // [1, out, 1, 1]; not with groups > 1.
  int64_t dora_output_dim(const at::Tensor& out) const override { return out.dim() == 3 ? 0 : 1; }
  std::vector<int64_t> magnitude_shape(int64_t features) const override { return {1, features, 1, 1}; }
  void check_dora(const AdapterOptions& options) const override;
  at::Tensor base_forward(const at::Tensor& x) override { return base_layer->forward(x); }
  at::Tensor base_weight() const override { return base_layer->weight; }
  at::Tensor base_bias() const override { return base_layer->bias; }
  at::Tensor delta_bias(const std::string& name) const override;
  void check_mergeable(const std::string& name) const override;
  at::Tensor lora_update(const std::string& name, const at::Tensor& x, const at::Tensor& result) override;
  AdapterFactors stack_factors(const std::string& name) const override;
  at::Tensor multi_lora_update(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& x,
                               const at::Tensor& result) override;
  int64_t stack_groups() const override;
};
TORCH_MODULE(LoraConv2d);

}  // namespace torchlora::nn
