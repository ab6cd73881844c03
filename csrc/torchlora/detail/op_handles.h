// Typed dispatcher handles of the torchlora operators, looked up once. Kernels and the
// autograd wrappers call each other through these, so every call re-enters the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchlora::detail {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

#define TORCHLORA_OP_HANDLE(fn, name, sig)                                                  \
  inline const c10::TypedOperatorHandle<sig>& fn() {                                        \
    static const auto handle =                                                              \
        c10::Dispatcher::singleton().findSchemaOrThrow("torchlora::" name, "").typed<sig>(); \
    return handle;                                                                          \
  }

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, double, double, const OptTensor&);
using LinearForwardFn = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, double, double, const OptTensor&);
using LinearBackwardFn = TensorQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, bool, double, double,
                                    const OptTensor&, std::array<bool, 3>);
using LinearInplaceFn = at::Tensor&(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const OptTensor&, double, double, const OptTensor&);
using LinearForwardInplaceFn = at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const OptTensor&, double, double, const OptTensor&);
TORCHLORA_OP_HANDLE(lora_linear_op, "lora_linear", LinearFn)
TORCHLORA_OP_HANDLE(lora_linear_inplace_op, "lora_linear_", LinearInplaceFn)
TORCHLORA_OP_HANDLE(lora_linear_forward_inplace_op, "_lora_linear_forward_", LinearForwardInplaceFn)
TORCHLORA_OP_HANDLE(lora_linear_forward_op, "_lora_linear_forward", LinearForwardFn)
TORCHLORA_OP_HANDLE(lora_linear_backward_op, "_lora_linear_backward", LinearBackwardFn)

using LinearWithLoraFn = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                    const at::Tensor&, const OptTensor&, double, double, const OptTensor&);
using LinearWithLoraForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                           const at::Tensor&, const at::Tensor&, const OptTensor&, double, double,
                                           const OptTensor&, bool);
using LinearWithLoraBackwardFn =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, bool, bool, double, double, const OptTensor&, std::array<bool, 4>);
TORCHLORA_OP_HANDLE(linear_with_lora_op, "linear_with_lora", LinearWithLoraFn)
TORCHLORA_OP_HANDLE(linear_with_lora_forward_op, "_linear_with_lora_forward", LinearWithLoraForwardFn)
TORCHLORA_OP_HANDLE(linear_with_lora_backward_op, "_linear_with_lora_backward", LinearWithLoraBackwardFn)

using EmbeddingFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               double, int64_t, bool);
using EmbeddingForwardFn = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, double);
using EmbeddingBackwardFn = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, double, int64_t, bool,
                                       std::array<bool, 2>);
TORCHLORA_OP_HANDLE(lora_embedding_op, "lora_embedding", EmbeddingFn)
TORCHLORA_OP_HANDLE(lora_embedding_forward_op, "_lora_embedding_forward", EmbeddingForwardFn)
TORCHLORA_OP_HANDLE(lora_embedding_backward_op, "_lora_embedding_backward", EmbeddingBackwardFn)

using Conv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                            int64_t, double, double, const OptTensor&);
using Conv2dForwardFn = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, c10::IntArrayRef,
                                   c10::IntArrayRef, c10::IntArrayRef, int64_t, double, double,
                                   const OptTensor&);
using Conv2dBackwardFn = TensorQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, bool, c10::IntArrayRef,
                                    c10::IntArrayRef, c10::IntArrayRef, int64_t, double, double,
                                    const OptTensor&, std::array<bool, 3>);
TORCHLORA_OP_HANDLE(lora_conv2d_op, "lora_conv2d", Conv2dFn)
TORCHLORA_OP_HANDLE(lora_conv2d_forward_op, "_lora_conv2d_forward", Conv2dForwardFn)
TORCHLORA_OP_HANDLE(lora_conv2d_backward_op, "_lora_conv2d_backward", Conv2dBackwardFn)

using DropoutApplyFn = at::Tensor(const at::Tensor&, double, const at::Tensor&);
TORCHLORA_OP_HANDLE(dropout_apply_op, "dropout_apply", DropoutApplyFn)

using DeltaWeightFn = at::Tensor(const at::Tensor&, const at::Tensor&, double, bool, std::optional<at::ScalarType>);
TORCHLORA_OP_HANDLE(lora_delta_weight_op, "lora_delta_weight", DeltaWeightFn)

#undef TORCHLORA_OP_HANDLE

}  // namespace torchlora::detail
