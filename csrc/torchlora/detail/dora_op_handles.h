// Typed dispatcher handles of the DoRA operators, looked up once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchlora::detail {

#define TORCHLORA_DORA_OP_HANDLE(fn, name, sig)                                             \
  inline const c10::TypedOperatorHandle<sig>& fn() {                                        \
    static const auto handle =                                                              \
        c10::Dispatcher::singleton().findSchemaOrThrow("torchlora::" name, "").typed<sig>(); \
    return handle;                                                                          \
  }

using DoraOpt = std::optional<at::Tensor>;
using DoraQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using DoraWeightNormFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool,
                                    const DoraOpt&);
// grad_norm, norm, weight, lora_A, lora_B, scaling, fan_in_fan_out, has_sq_norm, output_mask
using DoraWeightNormBackwardFn = DoraQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, double, bool, bool, std::array<bool, 4>);
using DoraWeightSqNormFn = at::Tensor(const at::Tensor&, bool);
using DoraScaleFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const DoraOpt&, int64_t);
// grad_out, z, magnitude, weight_norm, bias, dim, output_mask
using DoraScaleBackwardFn = DoraQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const DoraOpt&, int64_t, std::array<bool, 4>);

TORCHLORA_DORA_OP_HANDLE(dora_weight_norm_op, "dora_weight_norm", DoraWeightNormFn)
TORCHLORA_DORA_OP_HANDLE(dora_weight_norm_backward_op, "_dora_weight_norm_backward", DoraWeightNormBackwardFn)
TORCHLORA_DORA_OP_HANDLE(dora_weight_sq_norm_op, "dora_weight_sq_norm", DoraWeightSqNormFn)
TORCHLORA_DORA_OP_HANDLE(dora_scale_op, "dora_scale", DoraScaleFn)
TORCHLORA_DORA_OP_HANDLE(dora_scale_backward_op, "_dora_scale_backward", DoraScaleBackwardFn)

#undef TORCHLORA_DORA_OP_HANDLE

}  // namespace torchlora::detail
