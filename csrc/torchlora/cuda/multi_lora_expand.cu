// CUDA kernels of multi_lora_expand, multi_lora_expand_ and their backward (kernels:
// multi_lora_kernels.cuh).
//   forward   out[t] = base_out[t] + scale[s] (lora_B[s] @ h[t] + lora_bias[s]), s = slot[t]
//             expand-shaped, accumulated in float32, added to base_out and rounded once
//   backward  u[t] = lora_B[s]^T grad_out[t]                    shrink-shaped with B^T, [T, r] float32
//             grad_h[t] = scale[s] u[t];  grad_scale[s] += u[t] . h[t]        one pass over the rows
//             grad_B[s] = scale[s] sum_{t in s} grad_out[t] h[t]^T,  and the column sums
//             gsum[s] = sum_{t in s} grad_out[t]                     segmented outer product (atomicAdd)
//             grad_lora_bias[s] = scale[s] gsum[s];  grad_scale[s] += gsum[s] . lora_bias[s]
// Slot indices never leave the device (CUDA-graph safe); out-of-range values trip a device-side
// assert. base_out may have any floating dtype; float64 adapters accumulate in float64.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <optional>
#include <tuple>

#include "../detail/multi_lora_checks.h"
#include "multi_lora_kernels.cuh"

namespace torchlora::cuda::multi {
namespace {

constexpr const char* kExpandOp = "torchlora.multi_lora_expand";
constexpr const char* kExpandInplaceOp = "torchlora.multi_lora_expand_";
constexpr const char* kExpandBackwardOp = "torchlora._multi_lora_expand_backward";

struct ExpandSizes {
  int64_t tokens, rank, out_features, slots;
};

ExpandSizes expand_sizes(const detail::MultiExpandDims& d, const char* op) {
  const ExpandSizes e{d.tokens.expect_int(), d.rank.expect_int(), d.out_features.expect_int(), d.slots.expect_int()};
  TORCH_CHECK(e.slots <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 slots, got ", e.slots);
  return e;
}

bool has_tensor(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// out[t, c] = base[t, c] + scale[s] (B[s] h[t] + bias[s])[c], rows `out_stride` / `base_stride`
// apart with contiguous columns; out may be base itself (in_place). T, C > 0.
void run_expand(const at::Tensor& out, int64_t out_stride, const at::Tensor& base, int64_t base_stride, bool in_place,
                const at::Tensor& h, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                const at::Tensor& scale, const at::Tensor& slot_index, const ExpandSizes& e, const char* op) {
  const int64_t R = e.rank, C = e.out_features;
  const at::ScalarType acc = detail::multi_intermediate_dtype(lora_B.scalar_type());
  const at::Tensor H = h.contiguous(), B = lora_B.contiguous(), idx = slot_index.contiguous();
  const at::Tensor bias = has_tensor(lora_bias) ? lora_bias->contiguous() : at::Tensor();
  const at::Tensor sc = scale.to(acc).contiguous();  // [S], read on the device
  dispatch_kernel_dtype</*with_double=*/true>(lora_B.scalar_type(), op, [&](auto wtag) {
    using w_t = typename decltype(wtag)::type;
    using acc_t = acc_for<w_t>;
    // W[s][c, r] = B[s, c, r]
    const SlotWeights<w_t> W{B.const_data_ptr<w_t>(), C * R, R, 1};
    const w_t* bias_ptr = bias.defined() ? bias.const_data_ptr<w_t>() : nullptr;
    dispatch_kernel_dtype</*with_double=*/true>(out.scalar_type(), op, [&](auto otag) {
      using out_t = typename decltype(otag)::type;
      const ExpandEpilogue<w_t, out_t, acc_t> ep{out.mutable_data_ptr<out_t>(), out_stride,
                                                 base.const_data_ptr<out_t>(),  base_stride,
                                                 sc.const_data_ptr<acc_t>(),    bias_ptr,
                                                 in_place};
      launch_expand_shaped<w_t, out_t, acc_t>(H, W, C, e.slots, idx, ep, op);
    });
  });
}

// Columns contiguous (or a single column): the kernels read and write rows through stride(0).
bool rows_addressable(const at::Tensor& t) {
  return t.stride(1) == 1 || t.size(1) == 1;
}

at::Tensor multi_lora_expand_cuda(const at::Tensor& base_out,  // [T, out], any float dtype
                                  const at::Tensor& h,         // [T, r] float32 (float64)
                                  const at::Tensor& lora_B,    // [S, out, r]
                                  const std::optional<at::Tensor>& lora_bias,  // [S, out]
                                  const at::Tensor& scale,                     // [S]
                                  const at::Tensor& slot_index) {              // [T]
  const auto d = detail::check_multi_lora_expand(base_out, h, lora_B, lora_bias, scale, slot_index);
  const ExpandSizes e = expand_sizes(d, kExpandOp);
  const c10::cuda::CUDAGuard guard(base_out.device());
  at::Tensor out = at::empty({e.tokens, e.out_features}, base_out.options());
  if (e.tokens == 0 || e.out_features == 0) return out;
  const at::Tensor base = rows_addressable(base_out) ? base_out : base_out.contiguous();
  run_expand(out, out.stride(0), base, base.stride(0), false, h, lora_B, lora_bias, scale, slot_index, e, kExpandOp);
  return out;
}

at::Tensor& multi_lora_expand_inplace_cuda(at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                           const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                           const at::Tensor& slot_index) {
  const auto d = detail::check_multi_lora_expand(base_out, h, lora_B, lora_bias, scale, slot_index, kExpandInplaceOp);
  const ExpandSizes e = expand_sizes(d, kExpandInplaceOp);
  const c10::cuda::CUDAGuard guard(base_out.device());
  if (e.tokens == 0 || e.out_features == 0) return base_out;
  at::assert_no_internal_overlap(base_out);
  if (rows_addressable(base_out)) {
    run_expand(base_out, base_out.stride(0), base_out, base_out.stride(0), true, h, lora_B, lora_bias, scale,
               slot_index, e, kExpandInplaceOp);
  } else {  // e.g. a transposed view: the math on a contiguous copy, then written back
    const at::Tensor tmp = base_out.contiguous();
    run_expand(tmp, tmp.stride(0), tmp, tmp.stride(0), true, h, lora_B, lora_bias, scale, slot_index, e,
               kExpandInplaceOp);
    base_out.copy_(tmp);
  }
  return base_out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_expand_backward_cuda(
    const at::Tensor& grad_out,  // [T, out]
    const at::Tensor& h,         // [T, r] float32 (float64)
    const at::Tensor& lora_B,    // [S, out, r]
    const std::optional<at::Tensor>& lora_bias,  // [S, out]
    const at::Tensor& scale,                     // [S]
    const at::Tensor& slot_index,                // [T]
    std::array<bool, 4> output_mask) {           // h, lora_B, lora_bias, scale
  const auto d = detail::check_multi_lora_expand(grad_out, h, lora_B, lora_bias, scale, slot_index, kExpandBackwardOp);
  const ExpandSizes e = expand_sizes(d, kExpandBackwardOp);
  const int64_t T = e.tokens, R = e.rank, C = e.out_features, S = e.slots;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const bool has_bias = has_tensor(lora_bias);
  // A fresh [0] tensor per gradient not asked for: outputs of an op must not alias.
  at::Tensor grad_h = at::empty({0}, h.options()), grad_B = at::empty({0}, lora_B.options());
  at::Tensor grad_bias = at::empty({0}, lora_B.options()), grad_scale = at::empty({0}, scale.options());
  const bool want_bias = output_mask[2] && has_bias;
  if (!(output_mask[0] || output_mask[1] || want_bias || output_mask[3])) {
    return {grad_h, grad_B, grad_bias, grad_scale};
  }
  const at::ScalarType acc = detail::multi_intermediate_dtype(lora_B.scalar_type());
  const at::TensorOptions acc_options = lora_B.options().dtype(acc);
  // grad_out in lora_B's dtype as it comes, else in the accumulator's dtype (no rounding)
  const bool g_native = grad_out.scalar_type() == lora_B.scalar_type();
  const at::Tensor G = (g_native ? grad_out : grad_out.to(acc)).contiguous();
  const at::Tensor H = h.contiguous(), B = lora_B.contiguous(), idx = slot_index.contiguous();
  const at::Tensor sc = scale.to(acc).contiguous();
  at::Tensor scale_acc = output_mask[3] ? at::zeros({S}, acc_options) : at::Tensor();

  dispatch_kernel_dtype</*with_double=*/true>(lora_B.scalar_type(), kExpandBackwardOp, [&](auto wtag) {
    using w_t = typename decltype(wtag)::type;
    using acc_t = acc_for<w_t>;
    auto with_g_type = [&](auto&& fn) {  // fn(TypeTag<g_t>): G's dtype, w_t or acc_t
      if (g_native) {
        fn(TypeTag<w_t>{});
      } else {
        fn(TypeTag<acc_t>{});
      }
    };

    if (output_mask[0] || output_mask[3]) {
      // u[t, r] = sum_c B[s, c, r] grad_out[t, c]: W[s][n = r, k = c] = B[s * C * R + c * R + r]
      const at::Tensor U = at::empty({T, R}, acc_options);
      const SlotWeights<w_t> WT{B.const_data_ptr<w_t>(), C * R, 1, R};
      with_g_type([&](auto gtag) {
        using g_t = typename decltype(gtag)::type;
        launch_shrink_shaped<g_t, w_t>(G, WT, R, S, idx, U, kExpandBackwardOp);
      });
      if (output_mask[0]) grad_h = at::empty({T, R}, h.options());
      launch_expand_backward_rows<acc_t>(U, H, sc, S, idx, output_mask[0] ? grad_h.mutable_data_ptr<acc_t>() : nullptr,
                                         output_mask[3] ? scale_acc.mutable_data_ptr<acc_t>() : nullptr);
    }

    const bool need_gsum = has_bias && (want_bias || output_mask[3]);
    if (output_mask[1] || need_gsum) {
      // float32 accumulators (float64 for float64); slots without rows stay 0
      at::Tensor F = output_mask[1] ? at::zeros({S, C, R}, acc_options) : at::Tensor();
      at::Tensor gsum = need_gsum ? at::zeros({S, C}, acc_options) : at::Tensor();
      // F[s][n = r, k = c] = grad_B[s * C * R + c * R + r], times scale[s]; gsum unscaled
      with_g_type([&](auto gtag) {
        using g_t = typename decltype(gtag)::type;
        launch_segmented_outer<g_t, acc_t>(H, output_mask[1] ? R : 0, G, S, idx,
                                           output_mask[1] ? F.mutable_data_ptr<acc_t>() : nullptr, C * R, 1, R,
                                           sc.const_data_ptr<acc_t>(),
                                           need_gsum ? gsum.mutable_data_ptr<acc_t>() : nullptr, kExpandBackwardOp);
      });
      if (output_mask[1]) grad_B = F.to(lora_B.scalar_type());
      if (want_bias) grad_bias = gsum.mul(sc.unsqueeze(1)).to(lora_B.scalar_type());
      if (output_mask[3] && has_bias) {
        const int64_t feature_dim = 1;
        scale_acc.add_(gsum.mul(lora_bias->to(acc)).sum(at::IntArrayRef(&feature_dim, 1)));
      }
    }
  });
  if (output_mask[3]) grad_scale = scale_acc.to(scale.scalar_type());
  return {grad_h, grad_B, grad_bias, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("multi_lora_expand", &multi_lora_expand_cuda);
  m.impl("multi_lora_expand_", &multi_lora_expand_inplace_cuda);
  m.impl("_multi_lora_expand_backward", &multi_lora_expand_backward_cuda);
}

}  // namespace torchlora::cuda::multi
