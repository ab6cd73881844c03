// CUDA kernel of lora_conv2d's forward: the A convolution stays with cuDNN (at::conv2d, after
// dropout_apply when dropout is on); the grouped 1x1 expand, lora_bias, scaling and the
// accumulation into base_out are one kernel. Backward stays on the ATen path (cuDNN).
// float64, channels-last base outputs, mixed dtypes and empty shapes take the ATen path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../detail/aten_math.h"
#include "../detail/checks.h"
#include "../detail/op_handles.h"
#include "lora_kernels_common.cuh"

namespace torchlora::cuda {
namespace {

constexpr const char* kForwardOp = "torchlora._lora_conv2d_forward";
constexpr int kConvThreads = 256;     // one output pixel per thread
constexpr int kConvChannelTile = 16;  // output channels per block: h stays in L1 across them

// out[n, co, p] = base[n, co, p] + alpha * (sum_j h[n, g * rpg + j, p] * B[co, j] + bias[co]),
// g = co / out_per_group. NCHW contiguous; out may alias base (same thread reads, then writes).
template <typename scalar_t>
__global__ void __launch_bounds__(kConvThreads)
    conv_expand_kernel(scalar_t* out, const scalar_t* base,
                       const float* __restrict__ h,        // [N, R, P] float32
                       const scalar_t* __restrict__ B,     // [Cout, rpg]
                       const scalar_t* __restrict__ bias,  // [Cout] or null
                       int64_t P, int64_t pixel_blocks, int64_t Cout, int64_t R, int64_t rank_per_group,
                       int64_t out_per_group, float alpha) {
  const int64_t n = blockIdx.x / pixel_blocks;
  const int64_t p = (blockIdx.x % pixel_blocks) * kConvThreads + threadIdx.x;
  if (p >= P) return;  // no barriers in this kernel
  const int64_t co_begin = static_cast<int64_t>(blockIdx.y) * kConvChannelTile;
  const int64_t co_end = min64(Cout, co_begin + kConvChannelTile);
  const float* h_pixel = h + n * R * P + p;
  // all reads (base included) before the first store: out may alias base
  float v[kConvChannelTile];
#pragma unroll
  for (int i = 0; i < kConvChannelTile; ++i) {
    const int64_t co = co_begin + i;
    v[i] = 0.f;
    if (co >= co_end) continue;
    const float* h_group = h_pixel + (co / out_per_group) * rank_per_group * P;
    const scalar_t* b = B + co * rank_per_group;
    float acc = bias != nullptr ? static_cast<float>(bias[co]) : 0.f;
    for (int64_t j = 0; j < rank_per_group; ++j) acc += h_group[j * P] * static_cast<float>(b[j]);
    v[i] = static_cast<float>(base[(n * Cout + co) * P + p]) + alpha * acc;
  }
#pragma unroll
  for (int i = 0; i < kConvChannelTile; ++i) {
    const int64_t co = co_begin + i;
    if (co < co_end) out[(n * Cout + co) * P + p] = static_cast<scalar_t>(v[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> lora_conv2d_forward_cuda(
    const at::Tensor& x,         // [N, Cin, H, W]
    const at::Tensor& base_out,  // [N, Cout, H', W']
    const at::Tensor& lora_A,    // [r, Cin, kh, kw]
    const at::Tensor& lora_B,    // [Cout, r / groups, 1, 1]
    const std::optional<at::Tensor>& lora_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto d = detail::check_lora_conv2d(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation,
                                           groups, scaling, dropout_p, seed);
  if (!has_kernel_dtype(x.scalar_type()) || base_out.scalar_type() != x.scalar_type() || x.numel() == 0 ||
      base_out.numel() == 0 || base_out.suggest_memory_format() != at::MemoryFormat::Contiguous) {
    return detail::lora_conv2d_forward_aten(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation,
                                            groups, scaling, dropout_p, seed);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_in = dropout_p > 0.0 ? detail::dropout_apply_op().call(x, dropout_p, *seed) : x;
  const at::Tensor shrunk = at::conv2d(x_in, lora_A, {}, stride, padding, dilation, 1).to(at::kFloat);
  const at::Tensor h = shrunk.contiguous();
  const at::Tensor base = base_out.contiguous();
  const at::Tensor B = lora_B.contiguous();
  const bool has_lora_bias = lora_bias.has_value() && lora_bias->defined();
  const at::Tensor bias = has_lora_bias ? lora_bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty(base.sizes(), base.options());

  const int64_t N = d.batch.expect_int(), R = d.rank.expect_int(), Cout = d.out_channels.expect_int();
  const int64_t P = d.out_h.expect_int() * d.out_w.expect_int();
  const int64_t pixel_blocks = ceil_div(P, kConvThreads);
  const dim3 grid(grid_dim(N * pixel_blocks, kGridXLimit, kForwardOp, "the expand over pixels"),
                  grid_dim(ceil_div(Cout, kConvChannelTile), kGridYZLimit, kForwardOp, "the expand over channels"));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  dispatch_kernel_dtype(x.scalar_type(), kForwardOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    conv_expand_kernel<scalar_t><<<grid, kConvThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), base.const_data_ptr<scalar_t>(), h.const_data_ptr<float>(),
        B.const_data_ptr<scalar_t>(), has_lora_bias ? bias.const_data_ptr<scalar_t>() : nullptr, P, pixel_blocks, Cout,
        R, R / groups, Cout / groups, static_cast<float>(scaling));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, shrunk};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("_lora_conv2d_forward", &lora_conv2d_forward_cuda);
  m.impl("_lora_conv2d_backward", &torchlora::detail::lora_conv2d_backward_aten);
}

}  // namespace torchlora::cuda
