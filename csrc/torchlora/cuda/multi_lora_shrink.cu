// CUDA kernels of multi_lora_shrink and its backward (kernels: multi_lora_kernels.cuh).
//   forward   h[t] = lora_A[slot[t]] @ x[t]                  shrink-shaped, [T, r] float32
//   backward  grad_x[t] = grad_h[t] @ lora_A[slot[t]]        expand-shaped with A^T, no epilogue
//             grad_A[s] = sum_{t in s} grad_h[t] x[t]^T      segmented outer product (atomicAdd)
// Slot indices never leave the device (CUDA-graph safe); out-of-range values trip a device-side
// assert. float64 adapters run the same kernels with float64 accumulation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>

#include "../detail/multi_lora_checks.h"
#include "multi_lora_kernels.cuh"

namespace torchlora::cuda::multi {
namespace {

constexpr const char* kShrinkOp = "torchlora.multi_lora_shrink";
constexpr const char* kShrinkBackwardOp = "torchlora._multi_lora_shrink_backward";

void check_slot_count(int64_t slots, const char* op) {
  TORCH_CHECK(slots <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 slots, got ", slots);
}

at::Tensor multi_lora_shrink_cuda(const at::Tensor& x,           // [T, in]
                                  const at::Tensor& lora_A,      // [S, r, in], x's dtype
                                  const at::Tensor& slot_index) {  // [T] int32/int64
  const auto d = detail::check_multi_lora_shrink(x, lora_A, slot_index);
  const int64_t T = d.tokens.expect_int(), K = d.in_features.expect_int();
  const int64_t R = d.rank.expect_int(), S = d.slots.expect_int();
  check_slot_count(S, kShrinkOp);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = at::empty({T, R}, x.options().dtype(detail::multi_intermediate_dtype(x.scalar_type())));
  if (T == 0) return h;
  const at::Tensor X = x.contiguous(), A = lora_A.contiguous(), idx = slot_index.contiguous();
  dispatch_kernel_dtype</*with_double=*/true>(x.scalar_type(), kShrinkOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    // W[s][n = r, k] = A[s, r, k]
    const SlotWeights<scalar_t> W{A.const_data_ptr<scalar_t>(), R * K, K, 1};
    launch_shrink_shaped<scalar_t, scalar_t>(X, W, R, S, idx, h, kShrinkOp);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> multi_lora_shrink_backward_cuda(const at::Tensor& grad_h,  // [T, r]
                                                                   const at::Tensor& x,       // [T, in]
                                                                   const at::Tensor& lora_A,  // [S, r, in]
                                                                   const at::Tensor& slot_index,
                                                                   std::array<bool, 2> output_mask) {
  const auto d = detail::check_multi_lora_shrink_backward(grad_h, x, lora_A, slot_index);
  const int64_t T = d.tokens.expect_int(), K = d.in_features.expect_int();
  const int64_t R = d.rank.expect_int(), S = d.slots.expect_int();
  check_slot_count(S, kShrinkBackwardOp);
  const c10::cuda::CUDAGuard guard(x.device());
  // A fresh [0] tensor per gradient not asked for: outputs of an op must not alias.
  at::Tensor grad_x = at::empty({0}, x.options()), grad_A = at::empty({0}, lora_A.options());
  if (!output_mask[0] && !output_mask[1]) return {grad_x, grad_A};
  const at::ScalarType acc = detail::multi_intermediate_dtype(x.scalar_type());
  const at::Tensor gh = grad_h.to(acc).contiguous();
  const at::Tensor A = lora_A.contiguous(), idx = slot_index.contiguous();
  dispatch_kernel_dtype</*with_double=*/true>(x.scalar_type(), kShrinkBackwardOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    using acc_t = acc_for<scalar_t>;
    if (output_mask[0]) {
      grad_x = at::empty({T, K}, x.options());
      // W[s][c = k, r] = A[s, r, k]; rows with slot -1 get zeros
      const SlotWeights<scalar_t> W{A.const_data_ptr<scalar_t>(), R * K, 1, K};
      const ExpandEpilogue<scalar_t, scalar_t, acc_t> ep{grad_x.mutable_data_ptr<scalar_t>(), K, nullptr, 0, nullptr,
                                                         nullptr, false};
      launch_expand_shaped<scalar_t, scalar_t, acc_t>(gh, W, K, S, idx, ep, kShrinkBackwardOp);
    }
    if (output_mask[1]) {
      // float32 accumulator (float64 for float64) in grad_A's layout; slots without rows stay 0
      at::Tensor F = at::zeros({S, R, K}, lora_A.options().dtype(acc));
      if (T > 0) {
        const at::Tensor X = x.contiguous();
        // F[s][n = r, k] = F[s * R * K + r * K + k]
        launch_segmented_outer<scalar_t, acc_t>(gh, R, X, S, idx, F.mutable_data_ptr<acc_t>(), R * K, K, 1, nullptr,
                                                nullptr, kShrinkBackwardOp);
      }
      grad_A = F.to(lora_A.scalar_type());
    }
  });
  return {grad_x, grad_A};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_cuda);
  m.impl("_multi_lora_shrink_backward", &multi_lora_shrink_backward_cuda);
}

}  // namespace torchlora::cuda::multi
