// Tensors in the layout of the masked low-rank kernels (masked_lowrank.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include "masked_lowrank.h"

namespace torchlora::cpu {

// A [rank, in] factor as float32, zero-padded to [round16(rank), padded_stride(in)].
inline at::Tensor pad_factor(const at::Tensor& factor) {
  const int64_t rank = factor.size(0), in = factor.size(1);
  at::Tensor padded = at::zeros({masked::round16(rank), masked::padded_stride(in)}, factor.options().dtype(at::kFloat));
  padded.narrow(0, 0, rank).narrow(1, 0, in).copy_(factor);
  return padded;
}

inline masked::Factor factor_view(const at::Tensor& padded, int64_t rank, int64_t in) {
  return masked::Factor{padded.const_data_ptr<float>(), rank, in, padded.size(0), masked::round16(in), padded.size(1)};
}

// A [rank, in] factor as bfloat16, zero-padded to [round16(rank), pair_stride(in)] (shrink_bf16_pairs).
inline at::Tensor pad_factor_bf16(const at::Tensor& factor) {
  const int64_t rank = factor.size(0), in = factor.size(1);
  at::Tensor padded =
      at::zeros({masked::round16(rank), masked::pair_stride(in)}, factor.options().dtype(at::kBFloat16));
  padded.narrow(0, 0, rank).narrow(1, 0, in).copy_(factor);
  return padded;
}

// A [rank, in] factor as bfloat16 pairs of ranks (masked::RankPairFactor): 32-bit words
// [ceil(rank / 2), rank_pair_stride(in)], zero-padded.
inline at::Tensor pack_rank_pairs(const at::Tensor& factor) {
  const int64_t rank = factor.size(0), in = factor.size(1), pairs = (rank + 1) / 2;
  at::Tensor even = at::zeros({2 * pairs, in}, factor.options().dtype(at::kBFloat16));
  even.narrow(0, 0, rank).copy_(factor);
  const at::Tensor words = even.view({pairs, 2, in}).transpose(1, 2).contiguous().view({pairs, 2 * in}).view(at::kInt);
  at::Tensor padded = at::zeros({pairs, masked::rank_pair_stride(in)}, factor.options().dtype(at::kInt));
  padded.narrow(1, 0, in).copy_(words);
  return padded;
}

inline masked::Mask no_mask() {
  return masked::Mask{nullptr, 0};
}

}  // namespace torchlora::cpu
