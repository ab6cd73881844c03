#include <torchlora/nn/lora_conv2d.h>

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <cmath>
#include <variant>

#include <torchlora/ops.h>

#include "lora_pair.h"

namespace torchlora::nn {
namespace {

// Padding of lora_A as two ints: "valid" is 0, "same" works where it is symmetric.
std::vector<int64_t> explicit_padding(const torch::nn::detail::ConvNdOptions<2>& o) {
  const auto& padding = o.padding();
  if (const auto* values = std::get_if<torch::ExpandingArray<2>>(&padding)) {
    return {(**values)[0], (**values)[1]};
  }
  if (std::holds_alternative<torch::enumtype::kValid>(padding)) {
    return {0, 0};
  }
  std::vector<int64_t> pads;
  for (int i = 0; i < 2; ++i) {
    const int64_t total = (*o.dilation())[i] * ((*o.kernel_size())[i] - 1);
    TORCH_CHECK(total % 2 == 0, "torchlora: padding='same' with kernel ", o.kernel_size(),
                " needs asymmetric padding, which LoraConv2d does not support");
    pads.push_back(total / 2);
  }
  return pads;
}

}  // namespace

LoraConv2dImpl::LoraConv2dImpl(torch::nn::Conv2d base) : LoraLayer("torchlora::nn::LoraConv2d") {
  TORCH_CHECK(!base.is_empty(), "torchlora: LoraConv2d needs a base Conv2d, got an empty holder");
  in_channels = base->options.in_channels();
  out_channels = base->options.out_channels();
  base_layer = register_module("base_layer", base);
  lora_A = register_module("lora_A", torch::nn::ModuleDict());
  lora_B = register_module("lora_B", torch::nn::ModuleDict());
  if (base->options.groups() > 1) {
    TORCH_WARN("torchlora: LoRA adapter added to a Conv2d with groups > 1. Merging is not supported.");
  }
}

LoraConv2dImpl::LoraConv2dImpl(torch::nn::Conv2d base, const std::string& adapter_name, const AdapterOptions& options)
    : LoraConv2dImpl(std::move(base)) {
  set_adapter(adapter_name);
  update_layer(adapter_name, options);
}

void LoraConv2dImpl::update_layer(const std::string& name, const AdapterOptions& options) {
  check_adapter_name(name);
  check_options(options);
  const auto& bo = base_layer->options;
  TORCH_CHECK_VALUE(options.r() % bo.groups() == 0, "torchlora: Targeting a Conv2d with groups=", bo.groups(),
                    " and rank ", options.r(), ". Currently, support is limited to conv layers where the rank is "
                    "divisible by groups. Either choose a different rank or do not target this specific layer.");
  auto a = torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels, options.r(), bo.kernel_size())
                                 .stride(bo.stride())
                                 .padding(bo.padding())
                                 .bias(false));
  auto b = torch::nn::Conv2d(
      torch::nn::Conv2dOptions(options.r(), out_channels, 1).groups(bo.groups()).bias(options.lora_bias()));
  detail::init_lora_pair(a->weight, b->weight, b->bias, options);
  detail::install_lora_pair(lora_A, lora_B, name, a.ptr(), b.ptr());
  register_adapter(name, options);
  move_adapter_to_base(name);
  init_dora(name);
  set_adapter(active_adapters());
}

std::vector<at::Tensor> LoraConv2dImpl::adapter_parameters(const std::string& name) const {
  return detail::lora_pair_parameters(lora_A, lora_B, name);
}

void LoraConv2dImpl::remove_adapter_parameters(const std::string& name) {
  detail::remove_lora_pair(lora_A, lora_B, name);
}

void LoraConv2dImpl::check_dora(const AdapterOptions&) const {
  TORCH_CHECK_NOT_IMPLEMENTED(base_layer->options.groups() == 1, "torchlora: DoRA is not supported for Conv2d layers "
                              "with groups > 1 (this one has groups=", base_layer->options.groups(), ")");
}

void LoraConv2dImpl::check_mergeable(const std::string& name) const {
  TORCH_CHECK_NOT_IMPLEMENTED(base_layer->options.groups() == 1,
                              "torchlora: Merging is not supported for Conv2d layers with groups > 1!");
}

at::Tensor LoraConv2dImpl::get_delta_weight(const std::string& name) const {
  adapter_options(name);  // raises for unknown names
  return torchlora::lora_delta_weight(lora_A->at<torch::nn::Conv2dImpl>(name).weight,
                                      lora_B->at<torch::nn::Conv2dImpl>(name).weight, scaling(name));
}

at::Tensor LoraConv2dImpl::delta_bias(const std::string& name) const {
  if (!adapter_options(name).lora_bias()) return {};
  return lora_B->at<torch::nn::Conv2dImpl>(name).bias * scaling(name);
}

AdapterFactors LoraConv2dImpl::stack_factors(const std::string& name) const {
  const auto& b = lora_B->at<torch::nn::Conv2dImpl>(name);
  return {lora_A->at<torch::nn::Conv2dImpl>(name).weight, b.weight, b.bias};
}

int64_t LoraConv2dImpl::stack_groups() const { return base_layer->options.groups(); }

at::Tensor LoraConv2dImpl::multi_lora_update(const AdapterStack& stack, const at::Tensor& sample_slots,
                                             const at::Tensor& x, const at::Tensor& result) {
  if (x.dim() == 3) {  // unbatched [C, H, W]
    return multi_lora_update(stack, sample_slots, x.unsqueeze(0), result.unsqueeze(0)).squeeze(0);
  }
  // Every lora_A has the geometry update_layer gives it: the base layer's kernel, stride and
  // padding, dilation 1 (also for slots bound from outside, which have no lora_A module here).
  auto a_options = base_layer->options;
  a_options.dilation(1);
  const std::vector<int64_t> stride(a_options.stride()->begin(), a_options.stride()->end());
  const std::vector<int64_t> dilation(a_options.dilation()->begin(), a_options.dilation()->end());
  const auto xs = per_row_dropout(x.to(stack.lora_A.scalar_type()), sample_slots, stack.dropout, is_training());
  const auto bias = stack.lora_bias.defined() ? std::optional<at::Tensor>(stack.lora_bias) : std::nullopt;
  return torchlora::multi_lora_conv2d(xs, result, stack.lora_A, stack.lora_B, bias, stack.scale, sample_slots, stride,
                                      explicit_padding(a_options), dilation, stack_groups());
}

at::Tensor LoraConv2dImpl::lora_update(const std::string& name, const at::Tensor& x, const at::Tensor& result) {
  if (x.dim() == 3) {  // unbatched [C, H, W], as Conv2d accepts
    return lora_update(name, x.unsqueeze(0), result.unsqueeze(0)).squeeze(0);
  }
  const auto& a = lora_A->at<torch::nn::Conv2dImpl>(name);
  const auto& b = lora_B->at<torch::nn::Conv2dImpl>(name);
  const double p = dropout_p(name);
  const std::optional<at::Tensor> seed = p > 0.0 ? std::optional<at::Tensor>(make_seed(x.device())) : std::nullopt;
  const std::optional<at::Tensor> bias = b.bias.defined() ? std::optional<at::Tensor>(b.bias) : std::nullopt;
  const std::vector<int64_t> stride(a.options.stride()->begin(), a.options.stride()->end());
  const std::vector<int64_t> dilation(a.options.dilation()->begin(), a.options.dilation()->end());
  return torchlora::lora_conv2d(x.to(a.weight.scalar_type()), result, a.weight, b.weight, bias, stride,
                                explicit_padding(a.options), dilation, b.options.groups(), scaling(name), p, seed);
}

}  // namespace torchlora::nn
