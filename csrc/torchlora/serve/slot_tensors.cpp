#include "slot_tensors.h"

#include <ATen/ATen.h>

namespace torchlora::serve::detail {

std::vector<SlotStacks> make_slot_stacks(const std::vector<TargetLayer>& layers, const PoolOptions& o) {
  const auto opts = at::TensorOptions().dtype(o.dtype).device(o.device);
  const int64_t S = o.max_loras, R = o.max_lora_rank;
  std::vector<SlotStacks> out;
  out.reserve(layers.size());
  for (const auto& l : layers) {
    const auto& w = l.weight_shape;
    SlotStacks s;
    int64_t out_features = w[0];
    switch (l.kind) {
      case io::LoraKind::Linear:
        s.lora_A = at::zeros({S, R, w[1]}, opts);
        s.lora_B = at::zeros({S, w[0], R}, opts);
        break;
      case io::LoraKind::Embedding:
        s.lora_A = at::zeros({S, R, w[0]}, opts);
        s.lora_B = at::zeros({S, w[1], R}, opts);
        out_features = w[1];
        break;
      case io::LoraKind::Conv2d:
        s.lora_A = at::zeros({S, R, w[1] * l.groups, w[2], w[3]}, opts);
        s.lora_B = at::zeros({S, w[0], R / l.groups, 1, 1}, opts);
        break;
    }
    if (o.lora_bias) s.lora_bias = at::zeros({S, out_features}, opts);
    s.scale = at::zeros({S}, opts.dtype(at::kFloat));
    out.push_back(std::move(s));
  }
  return out;
}

void write_slot(std::vector<SlotStacks>& stacks, const std::vector<TargetLayer>& layers, int64_t slot,
                const io::PeftAdapter& adapter) {
  for (size_t i = 0; i < layers.size(); ++i) {
    auto& s = stacks[i];
    auto A = s.lora_A.select(0, slot);
    auto B = s.lora_B.select(0, slot);
    A.zero_();
    B.zero_();
    if (s.lora_bias.defined()) s.lora_bias.select(0, slot).zero_();
    const auto it = adapter.modules.find(layers[i].name);
    if (it == adapter.modules.end()) {
      s.scale.select(0, slot).fill_(0.0);
      continue;
    }
    const auto& w = it->second;
    const int64_t r = w.rank();
    const int64_t groups = layers[i].groups;
    if (groups > 1) {
      // A's rank dimension is `groups` blocks (a grouped conv's channels), padded block by block.
      const int64_t slot_block = A.size(0) / groups, block = r / groups;
      auto blocks = A.unflatten(0, {groups, slot_block}).narrow(1, 0, block);
      blocks.copy_(w.lora_A.unflatten(0, {groups, block}), /*non_blocking=*/true);
      B.narrow(1, 0, block).copy_(w.lora_B, /*non_blocking=*/true);
    } else {
      A.narrow(0, 0, r).copy_(w.lora_A, /*non_blocking=*/true);
      B.narrow(1, 0, r).copy_(w.lora_B, /*non_blocking=*/true);
    }
    if (w.lora_bias.defined()) s.lora_bias.select(0, slot).copy_(w.lora_bias, /*non_blocking=*/true);
    // The module's scaling as the core computed it when the adapter was read (io::LoraModuleWeights).
    s.scale.select(0, slot).fill_(w.scaling);
  }
}

void clear_slot(std::vector<SlotStacks>& stacks, int64_t slot) {
  for (auto& s : stacks) s.scale.select(0, slot).fill_(0.0);
}

io::PeftAdapter host_copy(io::PeftAdapter adapter, const PoolOptions& o) {
  const bool pin = o.device.is_cuda();
  auto convert = [&](at::Tensor& t) {
    if (!t.defined()) return;
    // a copy: the pool's tensors never alias the caller's
    t = t.to(at::TensorOptions().device(at::kCPU).dtype(o.dtype), /*non_blocking=*/false, /*copy=*/true).contiguous();
    if (pin) t = t.pin_memory();
  };
  for (auto& [path, w] : adapter.modules) {
    convert(w.lora_A);
    convert(w.lora_B);
    convert(w.lora_bias);
  }
  return adapter;
}

}  // namespace torchlora::serve::detail
