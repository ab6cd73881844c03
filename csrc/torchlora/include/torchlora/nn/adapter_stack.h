// A layer's adapters stacked in slots for the multi-adapter operators (torchlora::multi_lora_*):
// the one stacking rule, used by the C++ modules and (through torchlora._C) by the Python layers.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include <torchlora/export.h>

namespace torchlora::nn {

// One adapter's factors as its layer holds them; lora_bias may be undefined.
struct AdapterFactors {
  at::Tensor lora_A, lora_B, lora_bias;
};

struct TORCHLORA_API AdapterStack {
  std::vector<std::string> names;  // slot i holds names[i]
  at::Tensor lora_A, lora_B;       // [S, r, ...] and [S, out, r / groups, ...]: ranks zero-padded to the largest
  at::Tensor lora_bias;            // [S, out], zeros for adapters without one; undefined when none has one
  at::Tensor scale;                // [S] float32
  std::vector<double> dropout;     // each slot's dropout probability
  // DoRA: [S, out] factors magnitude / ||W + s B A|| (1 for plain-LoRA and empty slots) that
  // rescale each row's output (torchlora::multi_dora_scale); undefined when no slot uses DoRA.
  at::Tensor dora_factor;

  // The slot of `name`, -1 when the stack does not hold it.
  int64_t slot_of(const std::string& name) const;
  // One slot per sample (int32 on `device`): -1 for "__base__" and names the stack does not hold.
  at::Tensor sample_slots(const std::vector<std::string>& adapter_names, const c10::Device& device) const;
};

// Stacks the factors in slot order: each lora_A has its rank along a_rank_dim, each lora_B along
// b_rank_dim; ranks are zero-padded to the largest (rounded up to a multiple of `groups`; with
// groups > 1 lora_A's rank dimension is that many equal blocks, padded block by block, as a
// grouped conv's channels), all cast to the promoted dtype. Made of ATen ops, so with autograd
// the gradients reach the factors.
TORCHLORA_API AdapterStack stack_adapters(const std::vector<std::string>& names,
                                          const std::vector<AdapterFactors>& factors,
                                          const std::vector<double>& scaling, const std::vector<double>& dropout,
                                          int64_t a_rank_dim, int64_t b_rank_dim, int64_t groups = 1);

// Per-row slots for `rows` rows made of sample_slots.size(0) equal consecutive blocks.
TORCHLORA_API at::Tensor row_slots(const at::Tensor& sample_slots, int64_t rows);

// Inverted dropout of x's rows (dim 0) with each row's slot's probability; x itself when not
// training or no slot has dropout.
TORCHLORA_API at::Tensor per_row_dropout(const at::Tensor& x, const at::Tensor& slots,
                                         const std::vector<double>& dropout, bool training);

}  // namespace torchlora::nn
