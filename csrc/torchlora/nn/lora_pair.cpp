#include "lora_pair.h"

#include <ATen/ATen.h>
#include <torch/nn/init.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <utility>

namespace torchlora::nn::detail {

void init_lora_pair(const at::Tensor& a_weight, const at::Tensor& b_weight, const at::Tensor& b_bias,
                    const AdapterOptions& options) {
  torch::NoGradGuard no_grad;
  switch (options.init()) {
    case LoraInit::Random:  // the modules' own initialisation for both
      return;
    case LoraInit::Default:
      torch::nn::init::kaiming_uniform_(a_weight, std::sqrt(5.0));
      break;
    case LoraInit::Gaussian:
      a_weight.normal_(0.0, 1.0 / static_cast<double>(options.r()));
      break;
  }
  b_weight.zero_();
  if (b_bias.defined()) b_bias.zero_();
}

void install_lora_pair(torch::nn::ModuleDict& lora_A, torch::nn::ModuleDict& lora_B, const std::string& name,
                       std::shared_ptr<torch::nn::Module> a, std::shared_ptr<torch::nn::Module> b) {
  remove_lora_pair(lora_A, lora_B, name);
  using Item = std::pair<std::string, std::shared_ptr<torch::nn::Module>>;
  lora_A->update(std::vector<Item>{{name, std::move(a)}});
  lora_B->update(std::vector<Item>{{name, std::move(b)}});
}

std::vector<at::Tensor> lora_pair_parameters(const torch::nn::ModuleDict& lora_A, const torch::nn::ModuleDict& lora_B,
                                             const std::string& name) {
  std::vector<at::Tensor> out;
  for (const auto* dict : {&lora_A, &lora_B}) {
    if ((*dict)->contains(name)) {
      for (const auto& p : (**dict)[name]->parameters()) out.push_back(p);
    }
  }
  return out;
}

void remove_lora_pair(torch::nn::ModuleDict& lora_A, torch::nn::ModuleDict& lora_B, const std::string& name) {
  for (auto* dict : {&lora_A, &lora_B}) {
    if ((*dict)->contains(name)) {
      (*dict)->pop(name);
      (*dict)->unregister_module(name);
    }
  }
}

}  // namespace torchlora::nn::detail
