// dora_weight_sq_norm as one CompositeImplicitAutograd kernel: a reduction that upcasts as it
// reads (no float copy of a half/bfloat16 weight), differentiable and shaped by its ATen ops on
// every backend.
#include <ATen/core/Tensor.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <torch/library.h>

#include "../detail/dora_checks.h"

namespace torchlora::composite {
namespace {

at::Tensor dora_weight_sq_norm_composite(const at::Tensor& weight, bool fan_in_fan_out) {
  detail::check_dora_weight(weight, fan_in_fan_out, "torchlora.dora_weight_sq_norm");
  const auto acc = detail::dora_accumulate_dtype(weight.scalar_type());
  // Rows are dimension 0 of [out, in] and of a conv kernel, dimension 1 of a fan_in_fan_out weight.
  const at::Tensor rows = weight.dim() == 2 ? weight : weight.flatten(1);
  const int64_t reduce[1] = {weight.dim() == 2 && fan_in_fan_out ? 0 : 1};
  return at::linalg_vector_norm(rows, 2, at::IntArrayRef(reduce), false, acc).square();
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("dora_weight_sq_norm", &dora_weight_sq_norm_composite);
}

}  // namespace torchlora::composite
