// CUDA kernels of dora_weight_norm: the GEMMs through ATen/cuBLAS (detail/dora_math.cpp), then
// one thread per output row combines them into the norm. Backward is the ATen statement of the
// gradient (GEMMs and elementwise ops).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../detail/dora_math.h"

namespace torchlora::cuda {
namespace {

template <typename acc_t>
__global__ void dora_combine_rows_kernel(const acc_t* __restrict__ wa, const acc_t* __restrict__ bg,
                                         const acc_t* __restrict__ b, const acc_t* __restrict__ sq,
                                         acc_t* __restrict__ out, int64_t rows, int64_t rank, acc_t s) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  acc_t cross = 0, lowrank = 0;
  const int64_t o = i * rank;
  for (int64_t j = 0; j < rank; ++j) {
    cross += wa[o + j] * b[o + j];
    lowrank += bg[o + j] * b[o + j];
  }
  const acc_t v = sq[i] + 2 * s * cross + s * s * lowrank;
  out[i] = sqrt(v > acc_t(0) ? v : acc_t(0));  // rounding can take an all but zero row below 0
}

at::Tensor dora_weight_norm_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 double scaling, bool fan_in_fan_out,
                                 const std::optional<at::Tensor>& weight_sq_norm) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto terms = detail::dora_norm_terms(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm,
                                             "torchlora.dora_weight_norm");
  const int64_t rows = terms.lora_b.size(0), rank = terms.lora_b.size(1);
  at::Tensor norm = at::empty({rows}, terms.lora_b.options());
  if (rows > 0) {
    constexpr int threads = 256;
    const auto blocks = static_cast<unsigned>((rows + threads - 1) / threads);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
    if (norm.scalar_type() == at::kDouble) {
      dora_combine_rows_kernel<double><<<blocks, threads, 0, stream>>>(
          terms.weight_a.const_data_ptr<double>(), terms.b_gram.const_data_ptr<double>(),
          terms.lora_b.const_data_ptr<double>(), terms.sq_norm.const_data_ptr<double>(),
          norm.mutable_data_ptr<double>(), rows, rank, scaling);
    } else {
      dora_combine_rows_kernel<float><<<blocks, threads, 0, stream>>>(
          terms.weight_a.const_data_ptr<float>(), terms.b_gram.const_data_ptr<float>(),
          terms.lora_b.const_data_ptr<float>(), terms.sq_norm.const_data_ptr<float>(), norm.mutable_data_ptr<float>(),
          rows, rank, static_cast<float>(scaling));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return norm.to(lora_A.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_weight_norm_backward_cuda(
    const at::Tensor& grad_norm, const at::Tensor& norm, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, bool fan_in_fan_out, bool has_sq_norm,
    std::array<bool, 4> output_mask) {
  const c10::cuda::CUDAGuard guard(weight.device());
  return detail::dora_weight_norm_backward_aten(grad_norm, norm, weight, lora_A, lora_B, scaling, fan_in_fan_out,
                                                has_sq_norm, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("dora_weight_norm", &dora_weight_norm_cuda);
  m.impl("_dora_weight_norm_backward", &dora_weight_norm_backward_cuda);
}

}  // namespace torchlora::cuda
