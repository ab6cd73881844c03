#pragma once

#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <torchlora/nn/lora_layer.h>

namespace torchlora::nn {

// LoRA around a torch::nn::Linear: y = base_layer(x) + scaling * lora_B(lora_A(dropout(x))).
// As in the Python LoraLinear, the base layer and the first active adapter run as one op
// (torchlora::linear_with_lora) and further adapters add into its output in place
// (torchlora::lora_linear_); merged or disabled adapters and mixed batches take the general
// path of LoraLayer (torchlora::lora_linear). Parameters: base_layer.weight/bias,
// lora_A.<adapter>.weight [r, in], lora_B.<adapter>.weight [out, r] (+ .bias with lora_bias).
class TORCHLORA_API LoraLinearImpl : public LoraLayer {
 public:
  // A wrapper without adapters (it computes `base` until update_layer adds one).
  explicit LoraLinearImpl(torch::nn::Linear base);
  LoraLinearImpl(torch::nn::Linear base, const std::string& adapter_name, const AdapterOptions& options = {});

  void update_layer(const std::string& name, const AdapterOptions& options) override;
  at::Tensor get_delta_weight(const std::string& name) const override;
  void reset() {}

  at::Tensor forward(const at::Tensor& x) override;

  int64_t in_features = 0;
  int64_t out_features = 0;
  torch::nn::Linear base_layer{nullptr};
  torch::nn::ModuleDict lora_A{nullptr};
  torch::nn::ModuleDict lora_B{nullptr};

 protected:
  std::vector<at::Tensor> adapter_parameters(const std::string& name) const override;
  void remove_adapter_parameters(const std::string& name) override;
  at::Tensor base_forward(const at::Tensor& x) override { return base_layer->forward(x); }
  at::Tensor base_weight() const override { return base_layer->weight; }
  at::Tensor base_bias() const override { return base_layer->bias; }
  at::Tensor delta_bias(const std::string& name) const override;
  at::Tensor lora_update(const std::string& name, const at::Tensor& x, const at::Tensor& result) override;
  AdapterFactors stack_factors(const std::string& name) const override;
  // The base GEMM and every row's adapter as one op (torchlora::linear_with_multi_lora).
  at::Tensor forward_with_slots(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& x) override;
  at::Tensor multi_lora_update(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& x,
                               const at::Tensor& result) override;

 private:
  // `result` plus adapter `name`'s term, written into `result` itself when in_place.
  at::Tensor add_lora(const std::string& name, const at::Tensor& x, at::Tensor result, bool in_place);
};
TORCH_MODULE(LoraLinear);

}  // namespace torchlora::nn
