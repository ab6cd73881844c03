// One dropout draw on the CPU: the Philox key (the seed's value), the drop threshold and the
// inverted-dropout scale 1 / (1 - p), rounded to float32 as on every device so that all
// kernels agree on the numbers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "../detail/philox_dropout.h"

namespace torchlora::cpu {

struct DropoutDraw {
  uint64_t key;
  uint32_t threshold;  // < 2^32 since p < 1
  float scale;
};

inline DropoutDraw dropout_draw(double p, const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.device().is_cpu(), op, ": the seed for a CPU input must be on the CPU");
  return DropoutDraw{static_cast<uint64_t>(seed.item<int64_t>()), static_cast<uint32_t>(detail::dropout_threshold(p)),
                     static_cast<float>(1.0 / (1.0 - p))};
}

}  // namespace torchlora::cpu
