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

// An empty slot: scale 0 in every layer, so that it adds nothing.
void clear_slot(std::vector<SlotStacks>& stacks, int64_t slot);

// The adapter's tensors in the host tier: the pool's dtype, pinned for a CUDA pool.
io::PeftAdapter host_copy(io::PeftAdapter adapter, const PoolOptions& options);

}  // namespace torchlora::serve::detail
