// The slot tensors of an AdapterPool and how an adapter is written into one slot (internal).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torchlora/io/peft_adapter.h>
#include <torchlora/serve/adapter_pool.h>

namespace torchlora::serve::detail {

// Zero-filled stacks of every layer (shapes in adapter_pool.h).
std::vector<SlotStacks> make_slot_stacks(const std::vector<TargetLayer>& layers, const PoolOptions& options);

// Slot `slot` of every layer becomes `adapter`: its factors copied into the rank-padded slot
// (the rest zeroed), scale = the module's scaling; layers it does not adapt get zeros and scale 0.
// Copies run on the current stream of the pool's device.
void write_slot(std::vector<SlotStacks>& stacks, const std::vector<TargetLayer>& layers, int64_t slot,
                const io::PeftAdapter& adapter);

// An empty slot: scale 0 (and DoRA factor 1) in every layer, so that it adds nothing.
void clear_slot(std::vector<SlotStacks>& stacks, int64_t slot);

// The adapter's tensors in the host tier: the pool's dtype, pinned for a CUDA pool. A DoRA
// module's magnitude is replaced by its factor magnitude / ||W + s B A|| [out] (W: the target
// layer's base weight; the served adapter is frozen, so the factor is a constant).
io::PeftAdapter host_copy(io::PeftAdapter adapter, const PoolOptions& options, const std::vector<TargetLayer>& layers,
                          const std::map<std::string, size_t>& layer_index);

// The factor dtype of a pool of `dtype`: float32, float64 for float64.
at::ScalarType dora_factor_dtype(at::ScalarType dtype);

}  // namespace torchlora::serve::detail
