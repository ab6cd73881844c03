// Autograd of lora_conv2d; backward regenerates the input dropout mask from the seed.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraConv2dFunction : public torch::autograd::Function<LoraConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& base_out,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_bias, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, double scaling,
                            double dropout_p, const std::optional<at::Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, shrunk] = detail::lora_conv2d_forward_op().call(x, base_out, lora_A, lora_B, lora_bias, stride,
                                                               padding, dilation, groups, scaling, dropout_p, seed);
    ctx->save_for_backward({x, shrunk, lora_A, lora_B, seed.value_or(at::Tensor())});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["lora_bias_given"] = lora_bias.has_value() && lora_bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool needs_lora_bias_grad = ctx->saved_data["lora_bias_given"].toBool() && ctx->needs_input_grad(4);
    const std::optional<at::Tensor> seed = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(2), ctx->needs_input_grad(3)};
    at::Tensor grad_x, grad_A, grad_B, grad_lora_bias;
    if (mask[0] || mask[1] || mask[2] || needs_lora_bias_grad) {
      const auto stride = ctx->saved_data["stride"].toIntVector();
      const auto padding = ctx->saved_data["padding"].toIntVector();
      const auto dilation = ctx->saved_data["dilation"].toIntVector();
      std::tie(grad_x, grad_A, grad_B, grad_lora_bias) = detail::lora_conv2d_backward_op().call(
          grads[0], saved[0], saved[1], saved[2], saved[3], needs_lora_bias_grad, stride, padding, dilation,
          ctx->saved_data["groups"].toInt(), ctx->saved_data["scaling"].toDouble(),
          ctx->saved_data["dropout_p"].toDouble(), seed, mask);
    }
    const at::Tensor undefined;
    return {mask[0] ? grad_x : undefined,
            ctx->needs_input_grad(1) ? grads[0] : undefined,
            mask[1] ? grad_A : undefined,
            mask[2] ? grad_B : undefined,
            needs_lora_bias_grad ? grad_lora_bias : undefined,
            undefined, undefined, undefined, undefined, undefined, undefined, undefined};
  }
};

at::Tensor lora_conv2d_autograd(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                int64_t groups, double scaling, double dropout_p,
                                const std::optional<at::Tensor>& seed) {
  return LoraConv2dFunction::apply(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation, groups,
                                   scaling, dropout_p, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) {
  m.impl("lora_conv2d", &lora_conv2d_autograd);
}

}  // namespace torchlora::autograd
