#include <torchlora/nn/lora_linear.h>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <torchlora/ops.h>

#include "lora_pair.h"

namespace torchlora::nn {

LoraLinearImpl::LoraLinearImpl(torch::nn::Linear base) : LoraLayer("torchlora::nn::LoraLinear") {
  TORCH_CHECK(!base.is_empty(), "torchlora: LoraLinear needs a base Linear, got an empty holder");
  in_features = base->options.in_features();
  out_features = base->options.out_features();
  base_layer = register_module("base_layer", base);
  lora_A = register_module("lora_A", torch::nn::ModuleDict());
  lora_B = register_module("lora_B", torch::nn::ModuleDict());
}

LoraLinearImpl::LoraLinearImpl(torch::nn::Linear base, const std::string& adapter_name, const AdapterOptions& options)
    : LoraLinearImpl(std::move(base)) {
  set_adapter(adapter_name);
  update_layer(adapter_name, options);
}

void LoraLinearImpl::update_layer(const std::string& name, const AdapterOptions& options) {
  check_adapter_name(name);
  check_options(options);
  auto a = torch::nn::Linear(torch::nn::LinearOptions(in_features, options.r()).bias(false));
  auto b = torch::nn::Linear(torch::nn::LinearOptions(options.r(), out_features).bias(options.lora_bias()));
  detail::init_lora_pair(a->weight, b->weight, b->bias, options);
  detail::install_lora_pair(lora_A, lora_B, name, a.ptr(), b.ptr());
  register_adapter(name, options);
  move_adapter_to_base(name);
  set_adapter(active_adapters());
}

std::vector<at::Tensor> LoraLinearImpl::adapter_parameters(const std::string& name) const {
  return detail::lora_pair_parameters(lora_A, lora_B, name);
}

void LoraLinearImpl::remove_adapter_parameters(const std::string& name) {
  detail::remove_lora_pair(lora_A, lora_B, name);
}

at::Tensor LoraLinearImpl::get_delta_weight(const std::string& name) const {
  adapter_options(name);  // raises for unknown names
  return torchlora::lora_delta_weight(lora_A->at<torch::nn::LinearImpl>(name).weight,
                                      lora_B->at<torch::nn::LinearImpl>(name).weight, scaling(name));
}

at::Tensor LoraLinearImpl::delta_bias(const std::string& name) const {
  if (!adapter_options(name).lora_bias()) return {};
  return lora_B->at<torch::nn::LinearImpl>(name).bias * scaling(name);
}

at::Tensor LoraLinearImpl::lora_update(const std::string& name, const at::Tensor& x, const at::Tensor& result) {
  const auto& A = lora_A->at<torch::nn::LinearImpl>(name).weight;
  const auto& b = lora_B->at<torch::nn::LinearImpl>(name);
  const double p = dropout_p(name);
  const std::optional<at::Tensor> seed = p > 0.0 ? std::optional<at::Tensor>(make_seed(x.device())) : std::nullopt;
  const std::optional<at::Tensor> bias = b.bias.defined() ? std::optional<at::Tensor>(b.bias) : std::nullopt;
  return torchlora::lora_linear(x.to(A.scalar_type()), result, A, b.weight, bias, scaling(name), p, seed);
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& x) {
  if (disabled_) {
    if (merged()) unmerge();
    return base_layer->forward(x);
  }
  return forward_adapters(x, base_layer->forward(x));
}

at::Tensor LoraLinearImpl::forward_mixed(const at::Tensor& x, const std::vector<std::string>& adapter_names) {
  if (disabled_) {
    return forward(x);
  }
  return forward_mixed_batch(x, base_layer->forward(x), adapter_names);
}

}  // namespace torchlora::nn
