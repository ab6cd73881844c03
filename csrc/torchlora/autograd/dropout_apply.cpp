// Autograd of dropout_apply: the gradient goes through the same (regenerated) mask.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DropoutApplyFunction : public torch::autograd::Function<DropoutApplyFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, const at::Tensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({seed});
    ctx->saved_data["p"] = p;
    return detail::dropout_apply_op().call(x, p, seed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {detail::dropout_apply_op().call(grads[0], ctx->saved_data["p"].toDouble(), saved[0]), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor dropout_apply_autograd(const at::Tensor& x, double p, const at::Tensor& seed) {
  return DropoutApplyFunction::apply(x, p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) {
  m.impl("dropout_apply", &dropout_apply_autograd);
}

}  // namespace torchlora::autograd
