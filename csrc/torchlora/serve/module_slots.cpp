#include <torchlora/serve/module_slots.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <torchlora/apply/inject.h>
#include <torchlora/nn/lora_conv2d.h>
#include <torchlora/nn/lora_embedding.h>
#include <torchlora/nn/lora_linear.h>

namespace torchlora::serve {

std::vector<TargetLayer> target_layers(torch::nn::Module& root) {
  std::vector<TargetLayer> out;
  for (const auto& [path, layer] : apply::lora_layers(root)) {
    TargetLayer t;
    t.name = path;
    if (auto lin = std::dynamic_pointer_cast<nn::LoraLinearImpl>(layer)) {
      t.kind = io::LoraKind::Linear;
      t.weight_shape = lin->base_layer->weight.sizes().vec();
      t.base_weight = lin->base_layer->weight;
    } else if (auto emb = std::dynamic_pointer_cast<nn::LoraEmbeddingImpl>(layer)) {
      t.kind = io::LoraKind::Embedding;
      t.weight_shape = emb->base_layer->weight.sizes().vec();
      t.base_weight = emb->base_layer->weight;
    } else if (auto conv = std::dynamic_pointer_cast<nn::LoraConv2dImpl>(layer)) {
      t.kind = io::LoraKind::Conv2d;
      t.weight_shape = conv->base_layer->weight.sizes().vec();
      t.groups = conv->base_layer->options.groups();
      t.base_weight = conv->base_layer->weight;
    } else {
      TORCH_CHECK(false, "torchlora: target_layers: LoRA layer '", path, "' is of a kind the adapter pool does not know");
    }
    out.push_back(std::move(t));
  }
  TORCH_CHECK_VALUE(!out.empty(), "torchlora: target_layers: the module tree holds no torchlora LoRA layers");
  return out;
}

PoolBinding::PoolBinding(torch::nn::Module& root, const AdapterPool& pool, const BatchLease& lease) {
  TORCH_CHECK_VALUE(lease.sample_slots().defined(), "torchlora: PoolBinding needs a lease from AdapterPool::acquire "
                    "(this one was released or moved from)");
  TORCH_CHECK_VALUE(lease.slot_scale().size(0) == pool.options().max_loras,
                    "torchlora: PoolBinding: the lease has ", lease.slot_scale().size(0), " slots but the pool ",
                    pool.options().max_loras, "; was it acquired from this pool?");
  const auto found = apply::lora_layers(root);
  TORCH_CHECK_VALUE(!found.empty(), "torchlora: PoolBinding: the module tree holds no torchlora LoRA layers");
  std::vector<std::pair<std::shared_ptr<nn::LoraLayer>, nn::AdapterStack>> plan;
  for (const auto& [path, layer] : found) {
    TORCH_CHECK_VALUE(!layer->slots_bound(), "torchlora: PoolBinding: layer '", path,
                      "' is already bound to a pool; one binding per module tree at a time");
    const SlotStacks* stacks = nullptr;
    for (size_t i = 0; i < pool.layers().size(); ++i) {
      if (pool.layers()[i].name == path) stacks = &pool.all_stacks()[i];
    }
    TORCH_CHECK_VALUE(stacks != nullptr, "torchlora: PoolBinding: LoRA layer '", path,
                      "' is not a target layer of the pool (make the pool from target_layers(root))");
    nn::AdapterStack stack;
    stack.lora_A = stacks->lora_A;
    stack.lora_B = stacks->lora_B;
    stack.lora_bias = stacks->lora_bias;
    // The slot's scaling times the request's scale.
    stack.scale = stacks->scale * lease.slot_scale();
    if (lease.uses_dora()) stack.dora_factor = stacks->dora_factor;
    stack.names.assign(static_cast<size_t>(stack.scale.size(0)), "");
    plan.emplace_back(layer, std::move(stack));
  }
  // All checks passed: bind every layer (bind_slots checks the layer itself; undo on failure).
  try {
    for (auto& [layer, stack] : plan) {
      layer->bind_slots(std::move(stack), lease.sample_slots());
      layers_.push_back(layer);
    }
  } catch (...) {
    for (auto& layer : layers_) layer->unbind_slots();
    throw;
  }
}

PoolBinding::~PoolBinding() {
  for (auto& layer : layers_) layer->unbind_slots();
}

}  // namespace torchlora::serve
