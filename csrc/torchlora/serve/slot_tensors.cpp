#include "slot_tensors.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <torchlora/ops.h>

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
    s.dora_factor = at::ones({S, out_features}, opts.dtype(dora_factor_dtype(o.dtype)));
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
    s.dora_factor.select(0, slot).fill_(1.0);
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
    if (w.magnitude.defined()) s.dora_factor.select(0, slot).copy_(w.magnitude, /*non_blocking=*/true);
    // The module's scaling as the core computed it when the adapter was read (io::LoraModuleWeights).
    s.scale.select(0, slot).fill_(w.scaling);
  }
}

void clear_slot(std::vector<SlotStacks>& stacks, int64_t slot) {
  for (auto& s : stacks) {
    s.scale.select(0, slot).fill_(0.0);
    s.dora_factor.select(0, slot).fill_(1.0);
  }
}

at::ScalarType dora_factor_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

namespace {

// g = magnitude / ||W + s B A|| of one module, [out] in `dtype` on the CPU.
at::Tensor dora_factor(const io::LoraModuleWeights& w, const TargetLayer& layer, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  const auto& weight = layer.base_weight;
  const auto cast = [&](const at::Tensor& t) { return t.detach().to(weight.device(), weight.scalar_type()); };
  const bool fan_in_fan_out = layer.kind == io::LoraKind::Embedding;  // the [num, dim] table's columns
  const auto norm = torchlora::dora_weight_norm(weight.detach(), cast(w.lora_A), cast(w.lora_B), w.scaling,
                                                fan_in_fan_out);
  const auto ones = at::ones({1, norm.numel()}, norm.options().dtype(dtype));
  return torchlora::dora_scale(ones, cast(w.magnitude), norm).reshape({-1}).to(at::kCPU);
}

}  // namespace

io::PeftAdapter host_copy(io::PeftAdapter adapter, const PoolOptions& o, const std::vector<TargetLayer>& layers,
                          const std::map<std::string, size_t>& layer_index) {
  const bool pin = o.device.is_cuda();
  auto convert = [&](at::Tensor& t) {
    if (!t.defined()) return;
    // a copy: the pool's tensors never alias the caller's
    t = t.to(at::TensorOptions().device(at::kCPU).dtype(o.dtype), /*non_blocking=*/false, /*copy=*/true).contiguous();
    if (pin) t = t.pin_memory();
  };
  for (auto& [path, w] : adapter.modules) {
    if (w.magnitude.defined()) {  // from the adapter's own factors, before they take the pool's dtype
      w.magnitude = dora_factor(w, layers.at(layer_index.at(path)), dora_factor_dtype(o.dtype)).contiguous();
      if (pin) w.magnitude = w.magnitude.pin_memory();
    }
    convert(w.lora_A);
    convert(w.lora_B);
    convert(w.lora_bias);
  }
  return adapter;
}

}  // namespace torchlora::serve::detail
