// Input validation and output shapes of the multi-adapter operators (many adapters in one
// batch, each row choosing a slot of a stacked adapter): one source for the CPU, CUDA and Meta
// kernels. Sizes are SymInts so the Meta kernels serve torch.compile with dynamic shapes.
//
// The stacked operands (S slots, every adapter zero-padded to the stack's rank r):
//   lora_A [S, r, in]   lora_B [S, out, r]   lora_bias [S, out]   scale [S]
//   slot_index [T] int32 or int64, one slot per row of x; -1 means the row takes no adapter.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

namespace torchlora::detail {

struct MultiShrinkDims {
  c10::SymInt tokens, in_features, rank, slots;
};

// x [T, in], lora_A [S, r, in] in x's dtype, slot_index [T]; all on one device.
MultiShrinkDims check_multi_lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& slot_index,
                                        const char* op = "torchlora.multi_lora_shrink");

// grad_h [T, r] in the intermediate dtype of x, and the operands of check_multi_lora_shrink.
MultiShrinkDims check_multi_lora_shrink_backward(const at::Tensor& grad_h, const at::Tensor& x,
                                                 const at::Tensor& lora_A, const at::Tensor& slot_index);

struct MultiExpandDims {
  c10::SymInt tokens, rank, out_features, slots;
};

// base_out [T, out] (any float dtype), h [T, r] (float32, float64 for float64 adapters),
// lora_B [S, out, r], lora_bias [S, out] in lora_B's dtype, scale [S] (float), slot_index [T].
MultiExpandDims check_multi_lora_expand(const at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                        const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                        const at::Tensor& slot_index,
                                        const char* op = "torchlora.multi_lora_expand");

// The slot indices themselves, when they live on the CPU (reading them is free there): every
// value in [-1, slots). CUDA kernels check on the device instead (a device-side assert), so that
// no launch waits for the host.
void check_slot_values(const at::Tensor& slot_index, int64_t slots, const char* op);

// The dtype of the stacked adapters' intermediate [T, r]: float32, float64 for float64.
inline at::ScalarType multi_intermediate_dtype(at::ScalarType adapter_dtype) {
  return adapter_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace torchlora::detail
