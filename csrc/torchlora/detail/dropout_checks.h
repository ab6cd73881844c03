#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace torchlora::detail {

// Validation shared by every backend's dropout_apply.
inline void check_dropout_apply(const at::Tensor& x, double p, const at::Tensor& seed) {
  constexpr const char* op = "torchlora.dropout_apply";
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.sym_numel() == 1, op,
              ": seed must be an int64 tensor with one element, got ", seed.scalar_type(), " with ",
              seed.sym_numel(), " elements");
  TORCH_CHECK(seed.device().is_cpu() || seed.device() == x.device() || x.device().is_meta(), op, ": seed is on ",
              seed.device(), " but x is on ", x.device());
}

}  // namespace torchlora::detail
