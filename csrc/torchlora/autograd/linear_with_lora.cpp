// Autograd of linear_with_lora in C++. Saved: x and weight (which the frozen nn.Linear keeps
// anyway), the float32 [T, r] shrink, the dropout mask as bits, the factors and the seed. Without anything to differentiate the forward keeps nothing.
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

bool requires_grad(const std::optional<at::Tensor>& t) {
  return defined(t) && t->requires_grad();
}

class LinearWithLoraFunction : public torch::autograd::Function<LinearWithLoraFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, double scaling,
                            double dropout_p, const std::optional<at::Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, shrunk, dropped_bits] = detail::linear_with_lora_forward_op().call(x, weight, bias, lora_A, lora_B, lora_bias,
                                                                    scaling, dropout_p, seed, /*keep_shrunk=*/true);
    ctx->save_for_backward({x, weight, shrunk, lora_A, lora_B, seed.value_or(at::Tensor()), dropped_bits});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["bias_given"] = defined(bias);
    ctx->saved_data["lora_bias_given"] = defined(lora_bias);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts only the tensors given: an absent bias shifts the later ones.
    const bool bias_given = ctx->saved_data["bias_given"].toBool();
    const bool lora_bias_given = ctx->saved_data["lora_bias_given"].toBool();
    const size_t edge_A = bias_given ? 3 : 2, edge_B = edge_A + 1;
    const bool needs_bias_grad = bias_given && ctx->needs_input_grad(2);
    const bool needs_lora_bias_grad = lora_bias_given && ctx->needs_input_grad(edge_B + 1);
    const std::optional<at::Tensor> seed = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(edge_A),
                                   ctx->needs_input_grad(edge_B)};
    variable_list out(9);
    if (!(mask[0] || mask[1] || mask[2] || mask[3] || needs_bias_grad || needs_lora_bias_grad)) return out;
    auto [grad_x, grad_w, grad_A, grad_B, grad_bias, grad_lora_bias] = detail::linear_with_lora_backward_op().call(
        grads[0], saved[0], saved[1], saved[2], saved[6], saved[3], saved[4], needs_bias_grad, needs_lora_bias_grad,
        ctx->saved_data["scaling"].toDouble(), ctx->saved_data["dropout_p"].toDouble(), seed, mask);
    if (mask[0]) out[0] = grad_x;
    if (mask[1]) out[1] = grad_w;
    if (needs_bias_grad) out[2] = grad_bias;
    if (mask[2]) out[3] = grad_A;
    if (mask[3]) out[4] = grad_B;
    if (needs_lora_bias_grad) out[5] = grad_lora_bias;
    return out;
  }
};

at::Tensor linear_with_lora_autograd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                     double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  const bool differentiable = at::GradMode::is_enabled() &&
                              (x.requires_grad() || weight.requires_grad() || requires_grad(bias) ||
                               lora_A.requires_grad() || lora_B.requires_grad() || requires_grad(lora_bias));
  if (!differentiable) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return std::get<0>(detail::linear_with_lora_forward_op().call(x, weight, bias, lora_A, lora_B, lora_bias, scaling,
                                                                  dropout_p, seed, /*keep_shrunk=*/false));
  }
  return LinearWithLoraFunction::apply(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) {
  m.impl("linear_with_lora", &linear_with_lora_autograd);
}

}  // namespace torchlora::autograd
