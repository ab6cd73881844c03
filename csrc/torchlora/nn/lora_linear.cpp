#include <torchlora/nn/lora_linear.h>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <algorithm>

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
  init_dora(name);
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
  return add_lora(name, x, result, /*in_place=*/false);
}

at::Tensor LoraLinearImpl::add_lora(const std::string& name, const at::Tensor& x, at::Tensor result, bool in_place) {
  const auto& A = lora_A->at<torch::nn::LinearImpl>(name).weight;
  const auto& b = lora_B->at<torch::nn::LinearImpl>(name);
  const double p = dropout_p(name);
  const auto seed = p > 0.0 ? std::optional<at::Tensor>(make_seed(x.device())) : std::nullopt;
  const auto bias = b.bias.defined() ? std::optional<at::Tensor>(b.bias) : std::nullopt;
  const auto x_cast = x.to(A.scalar_type());
  if (in_place) {
    return torchlora::lora_linear_(result, x_cast, A, b.weight, bias, scaling(name), p, seed);
  }
  return torchlora::lora_linear(x_cast, result, A, b.weight, bias, scaling(name), p, seed);
}

AdapterFactors LoraLinearImpl::stack_factors(const std::string& name) const {
  const auto& b = lora_B->at<torch::nn::LinearImpl>(name);
  return {lora_A->at<torch::nn::LinearImpl>(name).weight, b.weight, b.bias};
}

namespace {
std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
}  // namespace

at::Tensor LoraLinearImpl::forward_with_slots(const AdapterStack& stack, const at::Tensor& sample_slots,
                                              const at::Tensor& x) {
  if (x.dim() == 0) return LoraLayer::forward_with_slots(stack, sample_slots, x);
  const auto x2 = x.reshape({-1, x.size(-1)});
  const auto slots = row_slots(sample_slots, x2.size(0));
  const auto dropped = per_row_dropout(x2, slots, stack.dropout, is_training());
  const auto& weight = base_layer->weight;
  const auto bias = optional_tensor(base_layer->bias);
  const auto lora_bias = optional_tensor(stack.lora_bias);
  at::Tensor out;
  if (dropped.is_same(x2) && x2.scalar_type() == weight.scalar_type() &&
      weight.scalar_type() == stack.lora_A.scalar_type()) {
    out = torchlora::linear_with_multi_lora(x2, weight, bias, stack.lora_A, stack.lora_B, lora_bias, stack.scale, slots);
  } else {
    out = base_layer->forward(x2);
    torchlora::multi_lora_linear_(out, dropped.to(stack.lora_A.scalar_type()), stack.lora_A, stack.lora_B, lora_bias,
                                  stack.scale, slots);
  }
  auto shape = x.sizes().vec();
  shape.back() = out.size(-1);
  return out.view(shape);
}

at::Tensor LoraLinearImpl::multi_lora_update(const AdapterStack& stack, const at::Tensor& sample_slots,
                                             const at::Tensor& x, const at::Tensor& result) {
  const auto x2 = x.reshape({-1, x.size(-1)}).to(stack.lora_A.scalar_type());
  const auto slots = row_slots(sample_slots, x2.size(0));
  const auto out = torchlora::multi_lora_linear(per_row_dropout(x2, slots, stack.dropout, is_training()),
                                                result.reshape({-1, result.size(-1)}), stack.lora_A, stack.lora_B,
                                                optional_tensor(stack.lora_bias), stack.scale, slots);
  return out.view(result.sizes());
}

at::Tensor LoraLinearImpl::forward(const at::Tensor& x) {
  if (slots_bound()) return LoraLayer::forward(x);
  std::vector<std::string> names;
  for (const auto& name : active_adapters()) {
    if (has_adapter(name)) names.push_back(name);
  }
  const bool dora = std::any_of(names.begin(), names.end(), [&](const std::string& n) { return uses_dora(n); });
  if (disabled_ || merged() || names.empty() || x.dim() == 0 || dora) {  // DoRA: LoraLayer's path
    return LoraLayer::forward(x);
  }
  // On the flattened [T, in] input, so that no extra [T, out] tensor is made.
  const auto x2 = x.reshape({-1, x.size(-1)});
  const auto& weight = base_layer->weight;
  const auto bias = base_layer->bias.defined() ? std::optional<at::Tensor>(base_layer->bias) : std::nullopt;
  const auto& first_A = lora_A->at<torch::nn::LinearImpl>(names.front()).weight;
  at::Tensor result;
  auto rest = names.begin();
  if (x2.scalar_type() == weight.scalar_type() && weight.scalar_type() == first_A.scalar_type()) {
    // The base layer and the first adapter in one op: they share their passes over memory.
    const auto& b = lora_B->at<torch::nn::LinearImpl>(names.front());
    const double p = dropout_p(names.front());
    const auto seed = p > 0.0 ? std::optional<at::Tensor>(make_seed(x.device())) : std::nullopt;
    const auto lora_bias = b.bias.defined() ? std::optional<at::Tensor>(b.bias) : std::nullopt;
    result = torchlora::linear_with_lora(x2, weight, bias, first_A, b.weight, lora_bias, scaling(names.front()), p,
                                         seed);
    ++rest;
  } else {
    result = base_layer->forward(x2);
  }
  const auto dtype = result.scalar_type();
  for (; rest != names.end(); ++rest) {
    // A leaf that requires grad, or a view, cannot take the update in place.
    const bool in_place = !(result.requires_grad() && result.is_leaf()) && !result.is_view();
    result = add_lora(*rest, x2, result, in_place);
  }
  auto shape = x.sizes().vec();
  shape.back() = result.size(-1);
  return result.to(dtype).view(shape);
}

}  // namespace torchlora::nn
