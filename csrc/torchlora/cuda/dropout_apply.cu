// CUDA kernel of dropout_apply: the same mask as the CPU kernel (detail/philox_dropout.h).
// The seed is read on the device when it lives there, so launches stay CUDA-graph safe.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../detail/dropout_checks.h"
#include "../detail/philox_dropout.h"

namespace torchlora::cuda {
namespace {

template <typename scalar_t>
__global__ void dropout_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n,
                                     const int64_t* __restrict__ seed_on_device, uint64_t seed_on_host,
                                     uint64_t threshold, float scale) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const uint64_t key = seed_on_device ? static_cast<uint64_t>(*seed_on_device) : seed_on_host;
  const int64_t quads = (n + 3) / 4;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < quads;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t bits = detail::keep_bits4(key, static_cast<uint64_t>(q), threshold);
    const int64_t first = 4 * q;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = first + j;
      if (i < n) {
        out[i] = ((bits >> j) & 1u) ? static_cast<scalar_t>(static_cast<acc_t>(x[i]) * scale)
                                    : static_cast<scalar_t>(0);
      }
    }
  }
}

at::Tensor dropout_apply_cuda(const at::Tensor& x, double p, const at::Tensor& seed) {
  detail::check_dropout_apply(x, p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const int64_t* seed_ptr = seed.is_cuda() ? seed.const_data_ptr<int64_t>() : nullptr;
  const uint64_t seed_value = seed.is_cuda() ? 0 : static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t threshold = detail::dropout_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  constexpr int threads = 256;
  const int64_t quads = (n + 3) / 4;
  const int blocks = static_cast<int>(std::min<int64_t>((quads + threads - 1) / threads, 65535));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torchlora_dropout_apply_cuda", [&] {
    dropout_apply_kernel<scalar_t><<<blocks, threads, 0, stream>>>(xc.const_data_ptr<scalar_t>(),
                                                                   out.mutable_data_ptr<scalar_t>(), n, seed_ptr,
                                                                   seed_value, threshold, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("dropout_apply", &dropout_apply_cuda);
}

}  // namespace torchlora::cuda
