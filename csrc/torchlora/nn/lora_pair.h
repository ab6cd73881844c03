// What LoraLinear and LoraConv2d share: an adapter is a pair of modules (lora_A, lora_B)
// kept in two ModuleDicts under the adapter's name.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>

#include <memory>
#include <string>
#include <vector>

#include <torchlora/nn/lora_layer.h>

namespace torchlora::nn::detail {

// PEFT's initialisation: Default -> A kaiming-uniform(a=sqrt(5)), B (and its bias) zero;
// Gaussian -> A ~ N(0, 1/r), B zero; Random keeps the modules' own initialisation.
void init_lora_pair(const at::Tensor& a_weight, const at::Tensor& b_weight, const at::Tensor& b_bias,
                    const AdapterOptions& options);

// Puts (a, b) under `name`, replacing an adapter of that name.
void install_lora_pair(torch::nn::ModuleDict& lora_A, torch::nn::ModuleDict& lora_B, const std::string& name,
                       std::shared_ptr<torch::nn::Module> a, std::shared_ptr<torch::nn::Module> b);

std::vector<at::Tensor> lora_pair_parameters(const torch::nn::ModuleDict& lora_A, const torch::nn::ModuleDict& lora_B,
                                             const std::string& name);

void remove_lora_pair(torch::nn::ModuleDict& lora_A, torch::nn::ModuleDict& lora_B, const std::string& name);

}  // namespace torchlora::nn::detail
