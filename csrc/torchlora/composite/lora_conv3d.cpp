// lora_conv3d as one CompositeImplicitAutograd kernel over ATen's conv3d.
//
// Why a composition and not per-backend kernels like lora_conv2d: a 3-D LoRA layer's cost is
// its two convolutions, which ATen already runs with the best backend of each device (oneDNN,
// cuDNN); a hand-written kernel would win nothing there. Composed of differentiable ATen ops and
// the dropout_apply operator, the op gets its gradients, its Meta/fake-tensor shapes
// (torch.compile, torch.export) and its CUDA path from them, with nothing to keep in step. The
// cost: autograd keeps the dropped input and the [N, r, D', H', W'] intermediate for backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv3d.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "../detail/checks.h"
#include "../detail/op_handles.h"

namespace torchlora::composite {
namespace {

constexpr const char* kOp = "torchlora.lora_conv3d";

void check_triple(at::IntArrayRef values, const char* name, int64_t min) {
  TORCH_CHECK_VALUE(values.size() == 3, kOp, ": ", name, " must have three values, got ", values);
  for (const int64_t v : values) {
    TORCH_CHECK_VALUE(v >= min, kOp, ": ", name, " must be ", min > 0 ? "positive" : "non-negative", ", got ",
                      values);
  }
}

void check_operands(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double scaling,
                    double dropout_p, const std::optional<at::Tensor>& seed) {
  detail::check_float(x, kOp, "x");
  detail::check_float(base_out, kOp, "base_out");
  detail::check_float(lora_A, kOp, "lora_A");
  detail::check_float(lora_B, kOp, "lora_B");
  TORCH_CHECK_VALUE(x.dim() == 5, kOp, ": x must be 5-D [N, C, D, H, W], got shape ", x.sym_sizes());
  TORCH_CHECK_VALUE(base_out.dim() == 5, kOp, ": base_out must be 5-D [N, C_out, D', H', W'], got shape ",
                    base_out.sym_sizes());
  TORCH_CHECK_VALUE(lora_A.dim() == 5, kOp, ": lora_A must be 5-D [r, C_in, kd, kh, kw], got shape ",
                    lora_A.sym_sizes());
  TORCH_CHECK_VALUE(lora_B.dim() == 5 && lora_B.sym_size(2) == 1 && lora_B.sym_size(3) == 1 && lora_B.sym_size(4) == 1,
                    kOp, ": lora_B must be [C_out, r / groups, 1, 1, 1], got shape ", lora_B.sym_sizes());
  check_triple(stride, "stride", 1);
  check_triple(padding, "padding", 0);
  check_triple(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups > 0, kOp, ": groups must be positive, got ", groups);
  const c10::SymInt r = lora_A.sym_size(0), cout = lora_B.sym_size(0);
  TORCH_CHECK_VALUE(r > 0, kOp, ": the rank (lora_A.size(0)) must be positive");
  TORCH_CHECK_VALUE(lora_A.sym_size(1) == x.sym_size(1), kOp, ": lora_A is ", lora_A.sym_sizes(), " but x has ",
                    x.sym_size(1), " channels");
  TORCH_CHECK_VALUE(r % groups == 0, kOp, ": the rank ", r, " must be divisible by groups=", groups);
  TORCH_CHECK_VALUE(cout % groups == 0, kOp, ": the output channels ", cout, " must be divisible by groups=", groups);
  TORCH_CHECK_VALUE(lora_B.sym_size(1) * groups == r, kOp, ": lora_B is ", lora_B.sym_sizes(), " but rank ", r,
                    " with groups=", groups, " needs ", r / groups, " input channels per group");
  std::vector<c10::SymInt> expected{x.sym_size(0), cout};
  for (int64_t i = 0; i < 3; ++i) {
    const c10::SymInt k = lora_A.sym_size(2 + i);
    const c10::SymInt o = (x.sym_size(2 + i) + 2 * padding[i] - dilation[i] * (k - 1) - 1) / stride[i] + 1;
    TORCH_CHECK_VALUE(o > 0, kOp, ": the kernel ", lora_A.sym_sizes().slice(2), " does not fit the padded input ",
                      x.sym_sizes());
    expected.push_back(o);
  }
  TORCH_CHECK_VALUE(base_out.sym_sizes() == c10::SymIntArrayRef(expected), kOp, ": base_out is ",
                    base_out.sym_sizes(), " but the low-rank path gives ", c10::SymIntArrayRef(expected));
  detail::check_same_device(x, base_out, kOp, "x", "base_out");
  detail::check_same_device(x, lora_A, kOp, "x", "lora_A");
  detail::check_same_device(x, lora_B, kOp, "x", "lora_B");
  detail::check_same_dtype(x, lora_A, kOp, "x", "lora_A");
  detail::check_same_dtype(x, lora_B, kOp, "x", "lora_B");
  if (lora_bias.has_value() && lora_bias->defined()) {
    detail::check_float(*lora_bias, kOp, "lora_bias");
    TORCH_CHECK_VALUE(lora_bias->dim() == 1 && lora_bias->sym_size(0) == cout, kOp, ": lora_bias must be [", cout,
                      "], got shape ", lora_bias->sym_sizes());
    detail::check_same_device(x, *lora_bias, kOp, "x", "lora_bias");
    detail::check_same_dtype(x, *lora_bias, kOp, "x", "lora_bias");
  }
  detail::check_scaling(scaling, kOp);
  detail::check_dropout(dropout_p, seed, x.device(), kOp);
}

at::Tensor lora_conv3d_composite(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 int64_t groups, double scaling, double dropout_p,
                                 const std::optional<at::Tensor>& seed) {
  check_operands(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation, groups, scaling, dropout_p, seed);
  // float16/bfloat16 on the CPU run in float32 (as lora_conv2d); the sum is rounded once, into base_out's dtype
  const auto cd = detail::compute_dtype(x);
  const at::Tensor dropped = dropout_p > 0.0 ? detail::dropout_apply_op().call(x, dropout_p, *seed) : x;
  const at::Tensor shrunk = at::conv3d(dropped.to(cd), lora_A.to(cd), {}, stride, padding, dilation, 1);
  std::optional<at::Tensor> bias;
  if (lora_bias.has_value() && lora_bias->defined()) bias = lora_bias->to(cd);
  const at::Tensor delta = at::conv3d(shrunk, lora_B.to(cd), bias, {1, 1, 1}, {0, 0, 0}, {1, 1, 1}, groups);
  return base_out.add(delta.mul(scaling).to(base_out.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("lora_conv3d", &lora_conv3d_composite);
}

}  // namespace torchlora::composite
