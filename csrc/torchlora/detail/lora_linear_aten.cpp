#include "aten_math.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include "checks.h"
#include "op_handles.h"

namespace torchlora::detail {

at::Tensor accumulate_into_base(const at::Tensor& base_out, const at::Tensor& delta, double alpha) {
  return base_out.add(delta.to(base_out.scalar_type()), alpha);
}

TensorPair lora_linear_forward_aten(const at::Tensor& x, const at::Tensor& base_out,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    const std::optional<at::Tensor>& lora_bias, double scaling,
                                    double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto dims = check_lora_linear(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  const int64_t tokens = dims.tokens.expect_int(), in = dims.in_features.expect_int();
  const int64_t out_features = dims.out_features.expect_int();
  const auto cd = compute_dtype(x);

  at::Tensor x2 = x.reshape({tokens, in});
  if (dropout_p > 0.0) x2 = dropout_apply_op().call(x2, dropout_p, *seed);
  const at::Tensor shrunk = at::mm(x2.to(cd), lora_A.to(cd).t());  // [T, r]

  at::Tensor base2 = base_out.reshape({tokens, out_features});
  at::Tensor out2;
  if (base_out.scalar_type() == cd) {
    // scaling and accumulation folded into the expand GEMM
    if (lora_bias.has_value() && lora_bias->defined()) base2 = base2.add(*lora_bias, scaling);
    out2 = at::addmm(base2, shrunk, lora_B.to(cd).t(), 1.0, scaling);
  } else {
    at::Tensor delta = at::mm(shrunk, lora_B.to(cd).t());
    if (lora_bias.has_value() && lora_bias->defined()) delta.add_(lora_bias->to(cd));
    out2 = accumulate_into_base(base2, delta, scaling);
  }
  return {out2.view(base_out.sizes()), shrunk.to(intermediate_dtype(x))};
}

void expand_into_base_(at::Tensor& base_out, const at::Tensor& shrunk, const at::Tensor& lora_B,
                       const std::optional<at::Tensor>& lora_bias, double scaling) {
  const int64_t tokens = shrunk.size(0), out_features = lora_B.size(0);
  const bool has_lora_bias = lora_bias.has_value() && lora_bias->defined();
  if (base_out.scalar_type() == shrunk.scalar_type() && base_out.is_contiguous()) {
    at::Tensor base2 = base_out.view({tokens, out_features});
    if (has_lora_bias) base2.add_(lora_bias->to(shrunk.scalar_type()), scaling);
    base2.addmm_(shrunk, lora_B.t(), 1.0, scaling);
    return;
  }
  at::Tensor delta = at::mm(shrunk, lora_B.t());
  if (has_lora_bias) delta.add_(lora_bias->to(shrunk.scalar_type()));
  base_out.add_(delta.view(base_out.sizes()), scaling);
}

at::Tensor lora_linear_forward_inplace_aten(at::Tensor& base_out, const at::Tensor& x,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            const std::optional<at::Tensor>& lora_bias, double scaling,
                                            double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto dims = check_lora_linear(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  const int64_t tokens = dims.tokens.expect_int(), in = dims.in_features.expect_int();
  const auto cd = compute_dtype(x);
  at::Tensor x2 = x.reshape({tokens, in});
  if (dropout_p > 0.0) x2 = dropout_apply_op().call(x2, dropout_p, *seed);
  const at::Tensor shrunk = at::mm(x2.to(cd), lora_A.to(cd).t());  // [T, r], before base_out changes
  expand_into_base_(base_out, shrunk, lora_B.to(cd), lora_bias, scaling);
  return shrunk.to(intermediate_dtype(x));
}

TensorQuad lora_linear_backward_aten(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& shrunk, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, bool needs_lora_bias_grad, double scaling,
                                     double dropout_p, const std::optional<at::Tensor>& seed,
                                     std::array<bool, 3> output_mask) {
  const auto dims = check_lora_linear_backward(grad_out, x, shrunk, lora_A, lora_B, scaling, dropout_p, seed);
  const int64_t tokens = dims.tokens, in = dims.in_features, out_features = dims.out_features;
  const auto cd = compute_dtype(x);
  const at::Tensor g2 = grad_out.reshape({tokens, out_features}).to(cd);
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = none(), grad_A = none(), grad_B = none(), grad_lora_bias = none();

  if (output_mask[2]) grad_B = at::mm(g2.t(), shrunk.to(cd)).mul_(scaling).to(lora_B.scalar_type());
  if (needs_lora_bias_grad) grad_lora_bias = at::sum(g2, {0}).mul_(scaling).to(lora_B.scalar_type());
  if (output_mask[0] || output_mask[1]) {
    const at::Tensor grad_s = at::mm(g2, lora_B.to(cd)).mul_(scaling);  // [T, r]
    if (output_mask[1]) {
      at::Tensor x2 = x.reshape({tokens, in});
      if (dropout_p > 0.0) x2 = dropout_apply_op().call(x2, dropout_p, *seed);  // regenerated mask
      grad_A = at::mm(grad_s.t(), x2.to(cd)).to(lora_A.scalar_type());
    }
    if (output_mask[0]) {
      at::Tensor gx = at::mm(grad_s, lora_A.to(cd));
      if (dropout_p > 0.0) gx = dropout_apply_op().call(gx, dropout_p, *seed);
      grad_x = gx.to(x.scalar_type()).view(x.sizes());
    }
  }
  return {grad_x, grad_A, grad_B, grad_lora_bias};
}

}  // namespace torchlora::detail
