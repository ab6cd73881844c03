// multi_lora_conv2d: lora_conv2d with one adapter slot per sample. The shrink is one grouped
// convolution (the batch as groups, each sample against its slot's lora_A; im2col + bmm when the
// batch is symbolic) and the expand one
// batched matmul against the samples' lora_B, so the cost does not grow with the number of
// adapters. CompositeImplicitAutograd: gradients come from ATen's convolution and matmul.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/matmul.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../detail/checks.h"

namespace torchlora::composite {
namespace {

// The shrink for a symbolic batch (torch.export, torch.compile with dynamic shapes): a
// convolution with the batch as groups would fix the batch size in compiled code, so the same
// product is taken as im2col + one batched matmul. x [N, in, H, W], A [N, r, in, kh, kw] -> [N, r, H', W'].
at::Tensor shrink_unfolded(const at::Tensor& x, const at::Tensor& A, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  const c10::SymInt N = x.sym_size(0), r = A.sym_size(1), in = A.sym_size(2);
  const int64_t kh = A.sym_size(3).guard_int(__FILE__, __LINE__), kw = A.sym_size(4).guard_int(__FILE__, __LINE__);
  const c10::SymInt Ho = (x.sym_size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const c10::SymInt Wo = (x.sym_size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  const at::Tensor cols = at::im2col(x, {kh, kw}, dilation, padding, stride);  // [N, in * kh * kw, H'W']
  return at::bmm(A.reshape_symint({N, r, in * kh * kw}), cols).reshape_symint({N, r, Ho, Wo});
}

at::Tensor multi_lora_conv2d_composite(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                       const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                       const at::Tensor& scale, const at::Tensor& slot_index, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "torchlora.multi_lora_conv2d";
  detail::check_float(x, op, "x");
  detail::check_float(base_out, op, "base_out");
  detail::check_float(scale, op, "scale");
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, in, H, W], got shape ", x.sym_sizes());
  TORCH_CHECK(base_out.dim() == 4 && base_out.sym_size(0) == x.sym_size(0), op,
              ": base_out must be [N, out, H', W'] with x's N, got ", base_out.sym_sizes());
  TORCH_CHECK(lora_A.dim() == 5, op, ": lora_A must be [slots, r, in, kh, kw], got shape ", lora_A.sym_sizes());
  TORCH_CHECK(lora_B.dim() == 5, op, ": lora_B must be [slots, out, r / groups, 1, 1], got shape ", lora_B.sym_sizes());
  detail::check_same_dtype(x, lora_A, op, "x", "lora_A");
  detail::check_same_dtype(x, lora_B, op, "x", "lora_B");
  detail::check_same_device(x, lora_A, op, "x", "lora_A");
  detail::check_same_device(x, lora_B, op, "x", "lora_B");
  detail::check_same_device(x, base_out, op, "x", "base_out");
  detail::check_same_device(x, scale, op, "x", "scale");
  detail::check_same_device(x, slot_index, op, "x", "slot_index");
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const c10::SymInt S = lora_A.sym_size(0), r = lora_A.sym_size(1), in = x.sym_size(1), out = base_out.sym_size(1);
  TORCH_CHECK(S > 0 && r > 0, op, ": lora_A must hold at least one slot of rank >= 1");
  TORCH_CHECK(lora_A.sym_size(2) == in, op, ": lora_A is ", lora_A.sym_sizes(), " but x has ", in, " channels");
  TORCH_CHECK(r % groups == 0 && out % groups == 0, op, ": the rank ", r, " and out channels ", out,
              " must be divisible by groups=", groups);
  TORCH_CHECK(lora_B.sym_size(0) == S && lora_B.sym_size(1) == out && lora_B.sym_size(2) * groups == r &&
                  lora_B.sym_size(3) == 1 && lora_B.sym_size(4) == 1,
              op, ": lora_B must be [", S, ", ", out, ", ", r, " / ", groups, ", 1, 1], got ", lora_B.sym_sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.sym_size(0) == S, op, ": scale must be [", S, "], got ", scale.sym_sizes());
  TORCH_CHECK(slot_index.dim() == 1 && slot_index.sym_size(0) == x.sym_size(0) &&
                  (slot_index.scalar_type() == at::kLong || slot_index.scalar_type() == at::kInt),
              op, ": slot_index must be an int32/int64 tensor [N] with one slot per sample, got ",
              slot_index.scalar_type(), " ", slot_index.sym_sizes());
  const bool has_bias = lora_bias.has_value() && lora_bias->defined();
  if (has_bias) {
    detail::check_same_dtype(x, *lora_bias, op, "x", "lora_bias");
    TORCH_CHECK(lora_bias->dim() == 2 && lora_bias->sym_size(0) == S && lora_bias->sym_size(1) == out, op,
                ": lora_bias must be [", S, ", ", out, "], got ", lora_bias->sym_sizes());
  }
  if (slot_index.device().is_cpu() && slot_index.has_storage() && !slot_index.is_meta() &&
      !slot_index.key_set().has(c10::DispatchKey::Python)) {
    // real CPU indices are free to check (never a fake tensor under torch.compile)
    const at::Tensor bad = slot_index.lt(-1).logical_or(slot_index.ge(S));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), op, ": slot_index has values out of [-1, ", S, ")");
  }
  const c10::SymInt N = x.sym_size(0);
  if (N == 0) return base_out.clone();
  const at::Tensor used = slot_index.ge(0);
  const at::Tensor rows = slot_index.clamp(0, S - 1);
  const at::Tensor A = lora_A.index_select(0, rows);  // [N, r, in, kh, kw]
  const at::Tensor h = N.is_symbolic() ? shrink_unfolded(x, A, stride, padding, dilation)
                                       : at::conv2d_symint(x.reshape_symint({1, N * in, x.sym_size(2), x.sym_size(3)}),
                                                           A.reshape_symint({N * r, in, lora_A.sym_size(3),
                                                                             lora_A.sym_size(4)}),
                                                           std::nullopt, c10::fromIntArrayRefSlow(stride),
                                                           c10::fromIntArrayRefSlow(padding),
                                                           c10::fromIntArrayRefSlow(dilation), N);
  const c10::SymInt Ho = h.sym_size(2), Wo = h.sym_size(3);
  TORCH_CHECK(base_out.sym_size(2) == Ho && base_out.sym_size(3) == Wo, op, ": base_out is ", base_out.sym_sizes(),
              " but the adapter's convolution gives [", N, ", ", out, ", ", Ho, ", ", Wo, "]");
  // grouped 1x1 expand: [N, g, out/g, r/g] @ [N, g, r/g, H'W']
  const at::Tensor B = lora_B.index_select(0, rows).reshape_symint({N, groups, out / groups, r / groups});
  at::Tensor delta = at::matmul(B, h.reshape_symint({N, groups, r / groups, Ho * Wo}))
                         .reshape_symint({N, out, Ho, Wo});
  if (has_bias) delta = delta.add(lora_bias->index_select(0, rows).reshape_symint({N, out, 1, 1}));
  const at::Tensor coef = scale.index_select(0, rows).mul(used).reshape_symint({N, 1, 1, 1});
  return base_out.add(coef.mul(delta).to(base_out.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("multi_lora_conv2d", &multi_lora_conv2d_composite);
}

}  // namespace torchlora::composite
