// Whether an adapter fits the served model and the pool (internal to serve/).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torchlora/io/peft_adapter.h>
#include <torchlora/serve/adapter_pool.h>

namespace torchlora::serve::detail {

// Raises AdapterRejected(name, ...) saying what does not fit: a module that is not a target
// layer, a kind or factor shape that is not the base layer's, a rank above max_lora_rank,
// lora_bias in a pool that does not stack it, modules_to_save tensors, DoRA on layers without
// their base weight (or conv layers with groups > 1), and PiSSA / OLoRA
// files still relative to rewritten base weights. Returns the adapter's largest rank.
int64_t check_adapter(const std::string& name, const io::PeftAdapter& adapter, const std::vector<TargetLayer>& layers,
                      const std::map<std::string, size_t>& layer_index, const PoolOptions& options);

// Checks the pool's own layers and options (c10::ValueError naming the field).
void check_pool_layout(const std::vector<TargetLayer>& layers, const PoolOptions& options);

std::string kind_name(io::LoraKind kind);

}  // namespace torchlora::serve::detail
