// Autograd of dora_weight_norm and dora_scale. Both save their (small or already alive) inputs
// and call a private backward op that computes only the gradients asked for.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/dora_op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DoraWeightNormFunction : public torch::autograd::Function<DoraWeightNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, bool fan_in_fan_out,
                            const std::optional<at::Tensor>& weight_sq_norm) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor norm = detail::dora_weight_norm_op().call(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm);
    ctx->save_for_backward({norm, weight, lora_A, lora_B});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["fan_in_fan_out"] = fan_in_fan_out;
    ctx->saved_data["has_sq_norm"] = weight_sq_norm.has_value() && weight_sq_norm->defined();
    return norm;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_sq = ctx->saved_data["has_sq_norm"].toBool();
    // needs_input_grad counts the tensor arguments (weight, lora_A, lora_B, weight_sq_norm); the
    // gradients returned sit at argument positions (weight_sq_norm is the sixth).
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   has_sq && ctx->needs_input_grad(3)};
    variable_list out(6);
    if (!(mask[0] || mask[1] || mask[2] || mask[3]) || !grads[0].defined()) return out;
    auto [grad_w, grad_a, grad_b, grad_sq] = detail::dora_weight_norm_backward_op().call(
        grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["scaling"].toDouble(),
        ctx->saved_data["fan_in_fan_out"].toBool(), has_sq, mask);
    if (mask[0]) out[0] = grad_w;
    if (mask[1]) out[1] = grad_a;
    if (mask[2]) out[2] = grad_b;
    if (mask[3]) out[5] = grad_sq;
    return out;
  }
};

class DoraScaleFunction : public torch::autograd::Function<DoraScaleFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& magnitude,
                            const at::Tensor& weight_norm, const std::optional<at::Tensor>& bias, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = detail::dora_scale_op().call(z, magnitude, weight_norm, bias, dim);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({z, magnitude, weight_norm, has_bias ? *bias : at::Tensor()});
    ctx->saved_data["dim"] = dim;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = saved[3].defined();
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   has_bias && ctx->needs_input_grad(3)};
    variable_list out(5);
    if (!(mask[0] || mask[1] || mask[2] || mask[3]) || !grads[0].defined()) return out;
    const std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    auto [grad_z, grad_m, grad_n, grad_b] = detail::dora_scale_backward_op().call(
        grads[0], saved[0], saved[1], saved[2], bias, ctx->saved_data["dim"].toInt(), mask);
    if (mask[0]) out[0] = grad_z;
    if (mask[1]) out[1] = grad_m;
    if (mask[2]) out[2] = grad_n;
    if (mask[3]) out[3] = grad_b;
    return out;
  }
};

at::Tensor dora_weight_norm_autograd(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     double scaling, bool fan_in_fan_out,
                                     const std::optional<at::Tensor>& weight_sq_norm) {
  return DoraWeightNormFunction::apply(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm);
}

at::Tensor dora_scale_autograd(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                               const std::optional<at::Tensor>& bias, int64_t dim) {
  return DoraScaleFunction::apply(z, magnitude, weight_norm, bias, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) {
  m.impl("dora_weight_norm", &dora_weight_norm_autograd);
  m.impl("dora_scale", &dora_scale_autograd);
}

}  // namespace torchlora::autograd
