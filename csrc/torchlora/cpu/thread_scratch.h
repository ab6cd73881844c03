// Per-thread tensors reused from call to call for temporaries that live only inside one op.
//
// A fresh tensor of a few MiB costs page faults on every call here: the allocator hands large
// blocks back to the system and takes them again (about 3% of a d = 1024 linear layer's forward,
// and up to 8% of a bfloat16 one that casts its input). Each Slot is one buffer per thread, reused
// while nobody else holds it (a nested call, or a caller that kept the result, gets a fresh one).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/accumulate.h>

#include <cstdint>

namespace torchlora::cpu {

// Buffers above this many elements are allocated per call: kept, they would pin too much memory.
inline constexpr int64_t kMaxScratchElements = int64_t{4} << 20;

// An uninitialised [sizes] tensor of `options`, the thread's buffer for Slot when it fits.
template <typename Slot>
at::Tensor thread_scratch(at::IntArrayRef sizes, const at::TensorOptions& options) {
  // created outside inference mode, so that it can be written in or out of it
  const c10::InferenceMode normal_tensors(false);
  if (c10::multiply_integers(sizes) > kMaxScratchElements) return at::empty(sizes, options);
  static thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.sizes() != sizes || buffer.dtype() != options.dtype() ||
      buffer.use_count() != 1) {
    buffer = at::empty(sizes, options);
  }
  return buffer;
}

}  // namespace torchlora::cpu
