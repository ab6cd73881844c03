#include "lowrank_factor.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <cstring>

namespace torchlora::cpu {
namespace {

// fn(i, j) -> float for the [rows, cols] elements of a 2-D floating tensor of any strides.
template <typename Fn>
void with_elements(const at::Tensor& src, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "torchlora_lowrank_factor", [&] {
    const scalar_t* p = src.const_data_ptr<scalar_t>();
    const int64_t s0 = src.stride(0), s1 = src.stride(1);
    fn([p, s0, s1](int64_t i, int64_t j) { return static_cast<float>(p[i * s0 + j * s1]); });
  });
}

}  // namespace

at::Tensor zeroed(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  std::memset(t.mutable_data_ptr(), 0, t.nbytes());
  return t;
}

at::Tensor padded_floats(const at::Tensor& src, int64_t rows_pad, int64_t stride) {
  const int64_t rows = src.size(0), cols = src.size(1);
  at::Tensor out = zeroed({rows_pad, stride}, src.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  with_elements(src, [&](auto at) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) o[i * stride + j] = at(i, j);
    }
  });
  return out;
}

at::Tensor pad_factor_bf16(const at::Tensor& factor) {
  const int64_t rank = factor.size(0), in = factor.size(1), stride = masked::pair_stride(in);
  const int64_t rows_pad = masked::round16(rank);
  at::Tensor out = zeroed({rows_pad, stride}, factor.options().dtype(at::kBFloat16));
  auto* o = out.mutable_data_ptr<c10::BFloat16>();
  with_elements(factor, [&](auto at) {
    for (int64_t i = 0; i < rank; ++i) {
      for (int64_t j = 0; j < in; ++j) o[i * stride + j] = c10::BFloat16(at(i, j));
    }
  });
  return out;
}

at::Tensor pack_rank_pairs(const at::Tensor& factor) {
  const int64_t rank = factor.size(0), in = factor.size(1), pairs = (rank + 1) / 2;
  const int64_t stride = masked::rank_pair_stride(in);
  at::Tensor out = zeroed({pairs, stride}, factor.options().dtype(at::kInt));
  auto* o = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  with_elements(factor, [&](auto at) {
    for (int64_t kp = 0; kp < pairs; ++kp) {
      const bool second = 2 * kp + 1 < rank;
      for (int64_t j = 0; j < in; ++j) {
        const uint32_t lo = c10::BFloat16(at(2 * kp, j)).x;
        const uint32_t hi = second ? c10::BFloat16(at(2 * kp + 1, j)).x : 0u;
        o[kp * stride + j] = lo | (hi << 16);
      }
    }
  });
  return out;
}

}  // namespace torchlora::cpu
