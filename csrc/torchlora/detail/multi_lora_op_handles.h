// Typed dispatcher handles of the multi-adapter operators, looked up once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchlora::detail {

#define TORCHLORA_MULTI_OP_HANDLE(fn, name, sig)                                            \
  inline const c10::TypedOperatorHandle<sig>& fn() {                                        \
    static const auto handle =                                                              \
        c10::Dispatcher::singleton().findSchemaOrThrow("torchlora::" name, "").typed<sig>(); \
    return handle;                                                                          \
  }

using MultiOpt = std::optional<at::Tensor>;
using TensorRef = const at::Tensor&;

using MultiShrinkFn = at::Tensor(TensorRef, TensorRef, TensorRef);
using MultiShrinkBackwardFn = std::tuple<at::Tensor, at::Tensor>(TensorRef, TensorRef, TensorRef, TensorRef, std::array<bool, 2>);
using MultiExpandFn = at::Tensor(TensorRef, TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef);
using MultiExpandInplaceFn = at::Tensor&(at::Tensor&, TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef);
using MultiExpandBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    TensorRef, TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef, std::array<bool, 4>);
TORCHLORA_MULTI_OP_HANDLE(multi_lora_shrink_op, "multi_lora_shrink", MultiShrinkFn)
TORCHLORA_MULTI_OP_HANDLE(multi_lora_shrink_backward_op, "_multi_lora_shrink_backward", MultiShrinkBackwardFn)
TORCHLORA_MULTI_OP_HANDLE(multi_lora_expand_op, "multi_lora_expand", MultiExpandFn)
TORCHLORA_MULTI_OP_HANDLE(multi_lora_expand_inplace_op, "multi_lora_expand_", MultiExpandInplaceFn)
TORCHLORA_MULTI_OP_HANDLE(multi_lora_expand_backward_op, "_multi_lora_expand_backward", MultiExpandBackwardFn)

using MultiLinearFn = at::Tensor(TensorRef, TensorRef, TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef);
using MultiLinearInplaceFn = at::Tensor&(at::Tensor&, TensorRef, TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef);
using LinearWithMultiFn = at::Tensor(TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef);
using MultiEmbeddingFn = at::Tensor(TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, TensorRef, int64_t);
using MultiConv2dFn = at::Tensor(TensorRef, TensorRef, TensorRef, TensorRef, const MultiOpt&, TensorRef, TensorRef, c10::IntArrayRef, c10::IntArrayRef,
                                 c10::IntArrayRef, int64_t);
TORCHLORA_MULTI_OP_HANDLE(multi_lora_linear_op, "multi_lora_linear", MultiLinearFn)
TORCHLORA_MULTI_OP_HANDLE(multi_lora_linear_inplace_op, "multi_lora_linear_", MultiLinearInplaceFn)
TORCHLORA_MULTI_OP_HANDLE(linear_with_multi_lora_op, "linear_with_multi_lora", LinearWithMultiFn)
TORCHLORA_MULTI_OP_HANDLE(linear_with_multi_lora_forward_op, "_linear_with_multi_lora_forward", LinearWithMultiFn)
TORCHLORA_MULTI_OP_HANDLE(multi_lora_embedding_op, "multi_lora_embedding", MultiEmbeddingFn)
TORCHLORA_MULTI_OP_HANDLE(multi_lora_conv2d_op, "multi_lora_conv2d", MultiConv2dFn)
using MultiDoraScaleFn = at::Tensor(TensorRef, TensorRef, const MultiOpt&, TensorRef, int64_t);
TORCHLORA_MULTI_OP_HANDLE(multi_dora_scale_op, "multi_dora_scale", MultiDoraScaleFn)

#undef TORCHLORA_MULTI_OP_HANDLE

}  // namespace torchlora::detail
