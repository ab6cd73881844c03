// multi_lora_linear, multi_lora_linear_ and linear_with_multi_lora: a linear layer's mixed batch
// as the shrink and expand primitives (CompositeImplicitAutograd: every backend, autograd and
// torch.compile come from the primitives).
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <vector>
#include <torch/library.h>

#include "../detail/multi_lora_op_handles.h"

namespace torchlora::composite {
namespace {

using detail::MultiOpt;

// x [..., in] and base_out [..., out] with the same leading dimensions.
void check_linear_rows(const at::Tensor& x, const at::Tensor& base_out, const char* op) {
  TORCH_CHECK(x.defined() && base_out.defined(), op, ": x and base_out must be defined");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK(base_out.dim() == x.dim(), op, ": base_out has ", base_out.dim(), " dimensions but x has ", x.dim());
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    TORCH_CHECK(base_out.sym_size(d) == x.sym_size(d), op, ": base_out ", base_out.sym_sizes(),
                " does not match the leading dimensions of x ", x.sym_sizes());
  }
}

at::Tensor as_rows(const at::Tensor& t) { return t.dim() == 2 ? t : t.reshape_symint({-1, t.sym_size(-1)}); }

at::Tensor multi_lora_linear_composite(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                       const at::Tensor& lora_B, const MultiOpt& lora_bias, const at::Tensor& scale,
                                       const at::Tensor& slot_index) {
  check_linear_rows(x, base_out, "torchlora.multi_lora_linear");
  const at::Tensor h = detail::multi_lora_shrink_op().call(as_rows(x), lora_A, slot_index);
  const at::Tensor out = detail::multi_lora_expand_op().call(as_rows(base_out), h, lora_B, lora_bias, scale, slot_index);
  return out.view_symint(base_out.sym_sizes());
}

at::Tensor& multi_lora_linear_inplace_composite(at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const MultiOpt& lora_bias,
                                                const at::Tensor& scale, const at::Tensor& slot_index) {
  check_linear_rows(x, base_out, "torchlora.multi_lora_linear_");
  // before base_out changes: x may alias it
  const at::Tensor h = detail::multi_lora_shrink_op().call(as_rows(x), lora_A, slot_index);
  at::Tensor rows = as_rows(base_out);
  detail::multi_lora_expand_inplace_op().call(rows, h, lora_B, lora_bias, scale, slot_index);
  if (!rows.is_alias_of(base_out)) base_out.copy_(rows.view_symint(base_out.sym_sizes()));  // a reshape that copied
  return base_out;
}

// Inference on the CPU in float32/float64: the fused kernel. With autograd, the composition below.
bool takes_fused_inference_kernel(const at::Tensor& x, const at::Tensor& weight, const MultiOpt& bias,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B, const MultiOpt& lora_bias,
                                  const at::Tensor& scale) {
  if (!x.device().is_cpu() || (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) || x.dim() < 1) {
    return false;
  }
  if (!c10::GradMode::is_enabled()) return true;
  auto grad = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
  return !(grad(x) || grad(weight) || (bias && grad(*bias)) || grad(lora_A) || grad(lora_B) ||
           (lora_bias && grad(*lora_bias)) || grad(scale));
}

at::Tensor linear_with_multi_lora_composite(const at::Tensor& x, const at::Tensor& weight, const MultiOpt& bias,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            const MultiOpt& lora_bias, const at::Tensor& scale,
                                            const at::Tensor& slot_index) {
  if (takes_fused_inference_kernel(x, weight, bias, lora_A, lora_B, lora_bias, scale)) {
    check_linear_rows(x, x, "torchlora.linear_with_multi_lora");
    const at::Tensor out = detail::linear_with_multi_lora_forward_op().call(as_rows(x), weight, bias, lora_A, lora_B,
                                                                            lora_bias, scale, slot_index);
    std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
    sizes.back() = out.sym_size(1);
    return out.view_symint(sizes);
  }
  at::Tensor out = at::linear(x, weight, bias);
  return multi_lora_linear_inplace_composite(out, x, lora_A, lora_B, lora_bias, scale, slot_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("multi_lora_linear", &multi_lora_linear_composite);
  m.impl("multi_lora_linear_", &multi_lora_linear_inplace_composite);
  m.impl("linear_with_multi_lora", &linear_with_multi_lora_composite);
}

}  // namespace torchlora::composite
