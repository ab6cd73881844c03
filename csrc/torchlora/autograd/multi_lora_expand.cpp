// Autograd of multi_lora_expand and multi_lora_expand_ in C++. base_out's gradient is grad_out
// itself; the rest comes from _multi_lora_expand_backward, which keeps h, the stacked lora_B,
// lora_bias, scale and the slot indices (no [T, out] tensor).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/multi_lora_op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Argument order of both ops: base_out, h, lora_B, lora_bias, scale, slot_index.
void save_for_expand_backward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                              const at::Tensor& slot_index) {
  ctx->save_for_backward({h, lora_B, lora_bias.value_or(at::Tensor()), scale, slot_index});
}

variable_list expand_backward(AutogradContext* ctx, const variable_list& grads) {
  const auto saved = ctx->get_saved_variables();
  const bool has_bias = saved[2].defined();
  // needs_input_grad counts the tensors given: without lora_bias, scale is the fourth
  const size_t scale_edge = has_bias ? 4 : 3;
  const std::array<bool, 4> mask{ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                 has_bias && ctx->needs_input_grad(3), ctx->needs_input_grad(scale_edge)};
  variable_list out(6);
  if (ctx->needs_input_grad(0)) out[0] = grads[0];
  if (!(mask[0] || mask[1] || mask[2] || mask[3])) return out;
  const std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
  auto [grad_h, grad_B, grad_bias, grad_scale] = detail::multi_lora_expand_backward_op().call(
      grads[0].contiguous(), saved[0], saved[1], bias, saved[3], saved[4], mask);
  if (mask[0]) out[1] = grad_h;
  if (mask[1]) out[2] = grad_B;
  if (mask[2]) out[3] = grad_bias;
  if (mask[3]) out[4] = grad_scale;
  return out;
}

class MultiLoraExpandFunction : public torch::autograd::Function<MultiLoraExpandFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& base_out, const at::Tensor& h,
                            const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                            const at::Tensor& scale, const at::Tensor& slot_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = detail::multi_lora_expand_op().call(base_out, h, lora_B, lora_bias, scale, slot_index);
    save_for_expand_backward(ctx, h, lora_B, lora_bias, scale, slot_index);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return expand_backward(ctx, grads); }
};

// base_out changes in place: mark_dirty bumps its version, so anything that saved it for
// backward fails loudly instead of computing with the updated values.
class MultiLoraExpandInplaceFunction : public torch::autograd::Function<MultiLoraExpandInplaceFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::Tensor base_out, const at::Tensor& h,
                            const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                            const at::Tensor& scale, const at::Tensor& slot_index) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      detail::multi_lora_expand_inplace_op().call(base_out, h, lora_B, lora_bias, scale, slot_index);
    }
    ctx->mark_dirty({base_out});
    save_for_expand_backward(ctx, h, lora_B, lora_bias, scale, slot_index);
    return base_out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) { return expand_backward(ctx, grads); }
};

at::Tensor multi_lora_expand_autograd(const at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                      const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                      const at::Tensor& slot_index) {
  return MultiLoraExpandFunction::apply(base_out, h, lora_B, lora_bias, scale, slot_index);
}

at::Tensor& multi_lora_expand_inplace_autograd(at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                               const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                               const at::Tensor& slot_index) {
  MultiLoraExpandInplaceFunction::apply(base_out, h, lora_B, lora_bias, scale, slot_index);
  return base_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) {
  m.impl("multi_lora_expand", &multi_lora_expand_autograd);
  m.impl("multi_lora_expand_", &multi_lora_expand_inplace_autograd);
}

}  // namespace torchlora::autograd
