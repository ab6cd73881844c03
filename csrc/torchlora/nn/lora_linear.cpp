#include <torchlora/nn/lora_linear.h>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <cmath>

#include <torchlora/ops.h>

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
  {
    torch::NoGradGuard no_grad;
    switch (options.init()) {
      case LoraInit::Random:  // nn.Linear's own initialisation for both
        break;
      case LoraInit::Default:
        torch::nn::init::kaiming_uniform_(a->weight, std::sqrt(5.0));
        break;
      case LoraInit::Gaussian:
        a->weight.normal_(0.0, 1.0 / static_cast<double>(options.r()));
        break;
    }
    if (options.init() != LoraInit::Random) {
      b->weight.zero_();
      if (options.lora_bias()) b->bias.zero_();
    }
  }
  if (lora_A->contains(name)) {
    remove_adapter_parameters(name);
  }
  using Item = std::pair<std::string, std::shared_ptr<torch::nn::Module>>;
  lora_A->update(std::vector<Item>{{name, a.ptr()}});
  lora_B->update(std::vector<Item>{{name, b.ptr()}});
  register_adapter(name, options);
  move_adapter_to_base(name);
  set_adapter(active_adapters());
}

std::vector<at::Tensor> LoraLinearImpl::adapter_parameters(const std::string& name) const {
  std::vector<at::Tensor> out;
  for (const auto* dict : {&lora_A, &lora_B}) {
    if ((*dict)->contains(name)) {
      for (const auto& p : (**dict)[name]->parameters()) out.push_back(p);
    }
  }
  return out;
}

void LoraLinearImpl::remove_adapter_parameters(const std::string& name) {
  for (auto* dict : {&lora_A, &lora_B}) {
    if ((*dict)->contains(name)) {
      (*dict)->pop(name);
      (*dict)->unregister_module(name);
    }
  }
}

at::Tensor LoraLinearImpl::get_delta_weight(const std::string& name) const {
  adapter_options(name);
  auto A = lora_A->at<torch::nn::LinearImpl>(name).weight;
  auto B = lora_B->at<torch::nn::LinearImpl>(name).weight;
  const auto dtype = A.scalar_type();
  const bool cast = B.device().is_cpu() && (dtype == at::kHalf || dtype == at::kBFloat16);
  if (cast) {
    A = A.to(at::kFloat);
    B = B.to(at::kFloat);
  }
  auto delta = at::matmul(B, A) * scaling(name);
  return cast ? delta.to(dtype) : delta;
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
