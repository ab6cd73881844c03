// Autograd of multi_lora_shrink in C++ (C++ programs train several adapters in one batch too).
// It keeps x (alive anyway), the stacked lora_A and the slot indices.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/multi_lora_op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MultiLoraShrinkFunction : public torch::autograd::Function<MultiLoraShrinkFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lora_A,
                            const at::Tensor& slot_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor h = detail::multi_lora_shrink_op().call(x, lora_A, slot_index);
    ctx->save_for_backward({x, lora_A, slot_index});
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    variable_list out(3);
    if (!mask[0] && !mask[1]) return out;
    auto [grad_x, grad_A] =
        detail::multi_lora_shrink_backward_op().call(grads[0].contiguous(), saved[0], saved[1], saved[2], mask);
    if (mask[0]) out[0] = grad_x;
    if (mask[1]) out[1] = grad_A;
    return out;
  }
};

at::Tensor multi_lora_shrink_autograd(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& slot_index) {
  return MultiLoraShrinkFunction::apply(x, lora_A, slot_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) { m.impl("multi_lora_shrink", &multi_lora_shrink_autograd); }

}  // namespace torchlora::autograd
