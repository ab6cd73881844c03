// multi_dora_scale: DoRA's output scale for a mixed batch, each row with its slot's factor
// g = magnitude / ||W + s B A|| (constant per served adapter, so the pool computes it once):
//   out[t] = factor[slot[t]] * (z[t] - bias) + bias, rows with slot -1 unchanged.
// CompositeImplicitAutograd: ATen's gather and arithmetic carry every backend and the gradient.
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../detail/checks.h"

namespace torchlora::composite {
namespace {

at::Tensor multi_dora_scale_composite(const at::Tensor& z, const at::Tensor& factor,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& slot_index,
                                      int64_t dim) {
  constexpr const char* op = "torchlora.multi_dora_scale";
  detail::check_float(z, op, "z");
  detail::check_float(factor, op, "factor");
  TORCH_CHECK(z.dim() >= 2, op, ": z must have a row dimension and a feature dimension, got shape ", z.sym_sizes());
  const int64_t d = at::maybe_wrap_dim(dim, z.dim());
  TORCH_CHECK(d != 0, op, ": dim must name the feature dimension, not dimension 0 (the rows)");
  TORCH_CHECK(factor.dim() == 2 && factor.sym_size(1) == z.sym_size(d), op, ": factor must be [slots, ",
              z.sym_size(d), "] (one value per feature along dim ", dim, "), got shape ", factor.sym_sizes());
  TORCH_CHECK(slot_index.defined() && (slot_index.scalar_type() == at::kInt || slot_index.scalar_type() == at::kLong),
              op, ": slot_index must be an int32 or int64 tensor");
  TORCH_CHECK(slot_index.dim() == 1 && slot_index.sym_size(0) == z.sym_size(0), op,
              ": slot_index must be [", z.sym_size(0), "] (one slot per row of z), got shape ", slot_index.sym_sizes());
  detail::check_same_device(z, factor, op, "z", "factor");
  detail::check_same_device(z, slot_index, op, "z", "slot_index");
  if (bias.has_value()) {
    detail::check_float(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == z.sym_size(d), op, ": bias must be [", z.sym_size(d),
                "], got shape ", bias->sym_sizes());
    detail::check_same_device(z, *bias, op, "z", "bias");
  }
  // Computed in float32 (float64 when z or factor is float64), as dora_scale.
  const auto compute = c10::promoteTypes(c10::promoteTypes(z.scalar_type(), factor.scalar_type()), at::kFloat);
  // factor rows broadcast along `d`: [T, 1, .., out, .., 1]; the mask along the rows.
  std::vector<c10::SymInt> row_shape(static_cast<size_t>(z.dim()), c10::SymInt(1));
  row_shape[0] = z.sym_size(0);
  std::vector<c10::SymInt> feature_shape = row_shape;
  feature_shape[static_cast<size_t>(d)] = z.sym_size(d);
  std::vector<c10::SymInt> bias_shape(static_cast<size_t>(z.dim()), c10::SymInt(1));
  bias_shape[static_cast<size_t>(d)] = z.sym_size(d);

  const at::Tensor slots = slot_index.to(at::kLong);
  const at::Tensor none = slots.eq(-1);
  // -1 gathers slot 0 (discarded below); other values out of [0, S) raise in index_select.
  const at::Tensor gathered = factor.index_select(0, at::where(none, at::zeros_like(slots), slots));
  const at::Tensor g = gathered.to(compute).view_symint(feature_shape);
  const at::Tensor zc = z.to(compute);
  at::Tensor scaled;
  if (bias.has_value()) {
    const at::Tensor b = bias->to(compute).view_symint(bias_shape);
    scaled = g * (zc - b) + b;
  } else {
    scaled = g * zc;
  }
  return at::where(none.view_symint(row_shape), zc, scaled).to(z.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("multi_dora_scale", &multi_dora_scale_composite);
}

}  // namespace torchlora::composite
