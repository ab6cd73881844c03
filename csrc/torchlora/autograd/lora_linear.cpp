// Autograd of lora_linear in C++, so C++ programs train too. Backward regenerates the
// dropout mask from the seed; what it keeps is x (alive anyway) and the float32 [T, r] shrunk.
// lora_linear_ (in place) shares the backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void save_for_lora_backward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shrunk,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  ctx->save_for_backward({x, shrunk, lora_A, lora_B, seed.value_or(at::Tensor())});
  ctx->saved_data["scaling"] = scaling;
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["lora_bias_given"] = lora_bias.has_value() && lora_bias->defined();
}

// Gradients of (base_out, x, lora_A, lora_B, lora_bias) given where each input sits in the
// op's argument list; base_out's gradient is grad_out itself.
struct ArgIndex {
  size_t base_out, x, lora_A, lora_B, lora_bias, count;
};

variable_list lora_backward(AutogradContext* ctx, const variable_list& grads, ArgIndex at_) {
  const auto saved = ctx->get_saved_variables();
  const bool needs_lora_bias_grad =
      ctx->saved_data["lora_bias_given"].toBool() && ctx->needs_input_grad(at_.lora_bias);
  const std::optional<at::Tensor> seed = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
  const std::array<bool, 3> mask{ctx->needs_input_grad(at_.x), ctx->needs_input_grad(at_.lora_A),
                                 ctx->needs_input_grad(at_.lora_B)};
  at::Tensor grad_x, grad_A, grad_B, grad_lora_bias;
  if (mask[0] || mask[1] || mask[2] || needs_lora_bias_grad) {
    std::tie(grad_x, grad_A, grad_B, grad_lora_bias) = detail::lora_linear_backward_op().call(
        grads[0], saved[0], saved[1], saved[2], saved[3], needs_lora_bias_grad, ctx->saved_data["scaling"].toDouble(),
        ctx->saved_data["dropout_p"].toDouble(), seed, mask);
  }
  variable_list out(at_.count);
  if (mask[0]) out[at_.x] = grad_x;
  if (ctx->needs_input_grad(at_.base_out)) out[at_.base_out] = grads[0];
  if (mask[1]) out[at_.lora_A] = grad_A;
  if (mask[2]) out[at_.lora_B] = grad_B;
  if (needs_lora_bias_grad) out[at_.lora_bias] = grad_lora_bias;
  return out;
}

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& base_out,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, shrunk] =
        detail::lora_linear_forward_op().call(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
    save_for_lora_backward(ctx, x, shrunk, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return lora_backward(ctx, grads, ArgIndex{1, 0, 2, 3, 4, 8});
  }
};

// lora_linear_: base_out is modified in place (mark_dirty bumps its version, so anything that
// saved it for backward fails loudly instead of computing with the updated values).
class LoraLinearInplaceFunction : public torch::autograd::Function<LoraLinearInplaceFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::Tensor base_out, const at::Tensor& x,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
    at::Tensor shrunk;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      shrunk = detail::lora_linear_forward_inplace_op().call(base_out, x, lora_A, lora_B, lora_bias, scaling,
                                                             dropout_p, seed);
    }
    ctx->mark_dirty({base_out});
    save_for_lora_backward(ctx, x, shrunk, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
    return base_out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return lora_backward(ctx, grads, ArgIndex{0, 1, 2, 3, 4, 8});
  }
};

at::Tensor lora_linear_autograd(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  return LoraLinearFunction::apply(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
}

}  // namespace

at::Tensor& lora_linear_inplace_autograd(at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A,
                                         const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                         double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  LoraLinearInplaceFunction::apply(base_out, x, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  return base_out;
}

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("lora_linear_", &lora_linear_inplace_autograd);
}

}  // namespace torchlora::autograd
