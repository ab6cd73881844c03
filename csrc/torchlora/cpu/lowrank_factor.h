// Tensors in the layout of the masked low-rank kernels (masked_lowrank.h), made by plain loops:
// the factors are small, and ATen's zeros + narrow + copy_ cost tens of microseconds each per
// call, a few percent of a layer's step.
#pragma once

#include <ATen/core/Tensor.h>

#include "masked_lowrank.h"

namespace torchlora::cpu {

// A tensor of zeros (at::empty + memset: at::zeros costs more than these small tensors' fill).
at::Tensor zeroed(at::IntArrayRef sizes, const at::TensorOptions& options);

// A 2-D tensor of any floating dtype and strides as float32 [rows_pad, stride], zero-padded.
at::Tensor padded_floats(const at::Tensor& src, int64_t rows_pad, int64_t stride);

// A [rank, in] factor as float32, zero-padded to [round16(rank), padded_stride(in)].
inline at::Tensor pad_factor(const at::Tensor& factor) {
  return padded_floats(factor, masked::round16(factor.size(0)), masked::padded_stride(factor.size(1)));
}

inline masked::Factor factor_view(const at::Tensor& padded, int64_t rank, int64_t in) {
  return masked::Factor{padded.const_data_ptr<float>(), rank, in, padded.size(0), masked::round16(in), padded.size(1)};
}

// A [rank, in] factor as bfloat16, zero-padded to [round16(rank), pair_stride(in)] (shrink_bf16_pairs).
at::Tensor pad_factor_bf16(const at::Tensor& factor);

// A [rank, in] factor as bfloat16 pairs of ranks (masked::RankPairFactor): 32-bit words
// [ceil(rank / 2), rank_pair_stride(in)], zero-padded.
at::Tensor pack_rank_pairs(const at::Tensor& factor);

inline masked::Mask no_mask() {
  return masked::Mask{nullptr, 0};
}

}  // namespace torchlora::cpu
