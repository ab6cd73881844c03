// Helpers shared by torchlora's CUDA kernels: the dtype dispatch over the three floating types
// the kernels serve, the dropout parameters and mask (the same mask as detail/philox_dropout.h,
// read four consecutive elements at a time), grid sizing from the device's SM count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <mutex>
#include <optional>

#include "../detail/philox_dropout.h"

namespace torchlora::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// True for the dtypes with a dedicated kernel; float64 goes to the ATen path.
inline bool has_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calls fn(TypeTag<scalar_t>{}) for float32, float16 or bfloat16, and float64 too with
// with_double (the multi-adapter kernels have float64 instantiations; the others take ATen there).
template <bool with_double = false, typename Fn>
void dispatch_kernel_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(TypeTag<float>{});
      return;
    case at::kHalf:
      fn(TypeTag<c10::Half>{});
      return;
    case at::kBFloat16:
      fn(TypeTag<c10::BFloat16>{});
      return;
    case at::kDouble:
      if constexpr (with_double) {
        fn(TypeTag<double>{});
        return;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": no CUDA kernel for dtype ", dtype);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// A grid dimension, checked against CUDA's limit for that dimension.
inline unsigned grid_dim(int64_t blocks, int64_t limit, const char* op, const char* what) {
  TORCH_CHECK(blocks >= 1 && blocks <= limit, op, ": ", what, " needs ", blocks,
              " thread blocks, more than CUDA allows (", limit, ")");
  return static_cast<unsigned>(blocks);
}
constexpr int64_t kGridXLimit = 2147483647;
constexpr int64_t kGridYZLimit = 65535;

// Streaming multiprocessors of `device`, asked once per device (no stream work, so it is
// safe during CUDA-graph capture).
inline int sm_count(int device) {
  static std::mutex mutex;
  static std::array<int, 64> cache{};
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < 0 || device >= static_cast<int>(cache.size())) return 108;
  if (cache[device] == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device] = std::max(count, 1);
  }
  return cache[device];
}

// How a long dimension is cut into splits (each a whole number of chunks) so that the grid
// has about two blocks per SM; the partial results of the splits are summed afterwards.
struct SplitPlan {
  int64_t splits;
  int64_t per_split;
};

inline SplitPlan plan_split(int64_t blocks_per_split, int64_t length, int64_t chunk, int64_t max_splits,
                            int device) {
  const int64_t chunks = std::max<int64_t>(ceil_div(length, chunk), 1);
  const int64_t wanted = ceil_div(2 * static_cast<int64_t>(sm_count(device)), std::max<int64_t>(blocks_per_split, 1));
  const int64_t splits = std::clamp<int64_t>(wanted, 1, std::min(chunks, max_splits));
  const int64_t per_split = ceil_div(chunks, splits) * chunk;
  return {std::max<int64_t>(ceil_div(length, per_split), 1), per_split};
}

// Dropout as the kernels see it: keep element i when its Philox draw reaches `threshold`.
// The seed is read on the device when it lives there, so launches stay CUDA-graph safe.
struct DropoutParams {
  const int64_t* seed_on_device = nullptr;
  uint64_t seed_on_host = 0;
  uint64_t threshold = 0;
  bool enabled = false;
};

// p == 0 gives disabled parameters: the kernels then do no mask work at all.
inline DropoutParams make_dropout_params(double p, const std::optional<at::Tensor>& seed) {
  DropoutParams d;
  if (p <= 0.0) return d;
  TORCH_CHECK(seed.has_value() && seed->defined(), "torchlora: dropout_p=", p, " needs a seed tensor");
  d.enabled = true;
  d.threshold = detail::dropout_threshold(p);
  if (seed->is_cuda()) {
    d.seed_on_device = seed->const_data_ptr<int64_t>();
  } else {
    d.seed_on_host = static_cast<uint64_t>(seed->item<int64_t>());  // a CPU tensor: no device sync
  }
  return d;
}

inline float dropout_scale(double p) {
  return p > 0.0 ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
}

__device__ __forceinline__ uint64_t dropout_key(const DropoutParams& d) {
  return d.seed_on_device ? static_cast<uint64_t>(*d.seed_on_device) : d.seed_on_host;
}

// Keep bits of the four elements first .. first+3 (bit j = element first + j), for any
// alignment of `first`: one Philox draw when first is a multiple of 4, else two.
__device__ __forceinline__ uint32_t keep_bits_run4(uint64_t key, uint64_t first, uint64_t threshold) {
  const uint64_t quad = first >> 2;
  const uint32_t offset = static_cast<uint32_t>(first & 3u);
  const uint32_t low = detail::keep_bits4(key, quad, threshold);
  if (offset == 0) return low;
  const uint32_t high = detail::keep_bits4(key, quad + 1, threshold);
  return ((low >> offset) | (high << (4u - offset))) & 0xFu;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

}  // namespace torchlora::cuda
