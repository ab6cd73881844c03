// Autograd of lora_embedding: dense gradients for lora_A and lora_B; ids get none.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../detail/op_handles.h"

namespace torchlora::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraEmbeddingFunction : public torch::autograd::Function<LoraEmbeddingFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& ids, const at::Tensor& base_out,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                            int64_t padding_idx, bool scale_grad_by_freq) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, gathered] = detail::lora_embedding_forward_op().call(ids, base_out, lora_A, lora_B, scaling);
    ctx->save_for_backward({ids, gathered, lora_A, lora_B});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["padding_idx"] = padding_idx;
    ctx->saved_data["scale_grad_by_freq"] = scale_grad_by_freq;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask{ctx->needs_input_grad(2), ctx->needs_input_grad(3)};
    at::Tensor grad_A, grad_B;
    if (mask[0] || mask[1]) {
      std::tie(grad_A, grad_B) = detail::lora_embedding_backward_op().call(
          grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["scaling"].toDouble(),
          ctx->saved_data["padding_idx"].toInt(), ctx->saved_data["scale_grad_by_freq"].toBool(), mask);
    }
    const at::Tensor undefined;
    return {undefined, ctx->needs_input_grad(1) ? grads[0] : undefined, mask[0] ? grad_A : undefined,
            mask[1] ? grad_B : undefined, undefined, undefined, undefined};
  }
};

at::Tensor lora_embedding_autograd(const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
                                   const at::Tensor& lora_B, double scaling, int64_t padding_idx,
                                   bool scale_grad_by_freq) {
  return LoraEmbeddingFunction::apply(ids, base_out, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Autograd, m) {
  m.impl("lora_embedding", &lora_embedding_autograd);
}

}  // namespace torchlora::autograd
