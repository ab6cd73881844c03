// lora_delta_weight as one CompositeImplicitAutograd kernel. The delta is a cast, one GEMM and
// a reshape: written once over differentiable ATen ops, it serves every device, its gradients
// are those of the ops it is made of, Meta/fake tensors (torch.compile, torch.export) get its
// shapes from them, and no backend copy can drift from another.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../detail/checks.h"

namespace torchlora::composite {
namespace {

constexpr const char* kOp = "torchlora.lora_delta_weight";

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_factor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), kOp, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// 2-D: lora_A [r, in], lora_B [out, r]. Conv (3-D, 4-D, 5-D for Conv1d, Conv2d, Conv3d):
// lora_A [r, in, *kernel], lora_B [out, r / groups, 1, ...] with as many 1s as kernel dimensions.
void check_factors(const at::Tensor& lora_A, const at::Tensor& lora_B, bool fan_in_fan_out) {
  check_factor(lora_A, "lora_A");
  check_factor(lora_B, "lora_B");
  TORCH_CHECK_TYPE(lora_A.scalar_type() == lora_B.scalar_type(), kOp, ": lora_A is ", lora_A.scalar_type(),
                   " but lora_B is ", lora_B.scalar_type());
  TORCH_CHECK_VALUE(lora_A.device() == lora_B.device(), kOp, ": lora_A is on ", lora_A.device(),
                    " but lora_B is on ", lora_B.device());
  const bool matrices = lora_A.dim() == 2 && lora_B.dim() == 2;
  const bool conv = lora_A.dim() >= 3 && lora_A.dim() <= 5 && lora_B.dim() == lora_A.dim();
  TORCH_CHECK_VALUE(matrices || conv, kOp,
                    ": the factors must be 2-D (lora_A [r, in], lora_B [out, r]) or conv factors with 1, 2 or 3 "
                    "kernel dimensions (lora_A [r, in, kh, kw], lora_B [out, r, 1, 1] for Conv2d), got ",
                    lora_A.sym_sizes(), " and ", lora_B.sym_sizes());
  const c10::SymInt r = lora_A.sym_size(0);
  TORCH_CHECK_VALUE(r > 0, kOp, ": the rank (lora_A.size(0)) must be positive");
  if (matrices) {
    TORCH_CHECK_VALUE(lora_B.sym_size(1) == r, kOp, ": lora_B is ", lora_B.sym_sizes(), " but lora_A has rank ", r);
    return;
  }
  TORCH_CHECK_VALUE(!fan_in_fan_out, kOp, ": fan_in_fan_out applies to 2-D factors, not to the conv factors ",
                    lora_A.sym_sizes());
  const c10::SymInt r_per_group = lora_B.sym_size(1);
  bool unit_kernel = true;
  for (int64_t d = 2; d < lora_B.dim(); ++d) unit_kernel = unit_kernel && lora_B.sym_size(d) == 1;
  const int64_t kernel_dims = lora_A.dim() - 2;
  const char* a_shape = kernel_dims == 1 ? "[r, in, k]" : kernel_dims == 2 ? "[r, in, kh, kw]" : "[r, in, kd, kh, kw]";
  const char* b_shape = kernel_dims == 1   ? "[out, r / groups, 1]"
                        : kernel_dims == 2 ? "[out, r / groups, 1, 1]"
                                           : "[out, r / groups, 1, 1, 1]";
  TORCH_CHECK_VALUE(unit_kernel && r_per_group > 0 && r % r_per_group == 0, kOp, ": conv factors must be lora_A ",
                    a_shape, " and lora_B ", b_shape, ", got ", lora_A.sym_sizes(), " and ", lora_B.sym_sizes());
  TORCH_CHECK_NOT_IMPLEMENTED(r_per_group == r, kOp, ": a conv adapter with groups=", r / r_per_group,
                              " has no delta in the layout of its grouped base weight (PEFT cannot merge it either)");
}

at::Tensor lora_delta_weight_composite(const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                       bool fan_in_fan_out, std::optional<at::ScalarType> dtype) {
  check_factors(lora_A, lora_B, fan_in_fan_out);
  detail::check_scaling(scaling, kOp);
  const auto out_dtype = dtype.value_or(lora_A.scalar_type());
  TORCH_CHECK_TYPE(is_float_type(out_dtype), kOp, ": dtype must be float32, float64, float16 or bfloat16, got ",
                   out_dtype);
  // float16/bfloat16 factors are multiplied in float32 on every device, so the delta is rounded
  // once, and to the same values wherever it is computed; float64 stays float64.
  const auto compute = detail::intermediate_dtype(lora_A);
  // Conv factors are matrices too: lora_B's 1x1 kernel makes PEFT's conv2d(A^T, B)^T the product
  // of B [out, r] and A [r, in * kh * kw].
  const auto A = lora_A.to(compute).flatten(1);     // [r, K]
  const auto B = lora_B.to(compute).flatten(1);     // [out, r]
  at::Tensor delta = fan_in_fan_out ? at::mm(A.t(), B.t())  // [in, out]
                                    : at::mm(B, A);         // [out, K]
  // Scaled after the product, in PEFT's order, and in place: the product is a fresh tensor that
  // the product's backward does not need.
  delta.mul_(scaling);
  if (lora_A.dim() > 2) {  // back to the base conv's weight layout [out, in, *kernel]
    std::vector<c10::SymInt> shape(lora_A.sym_sizes().begin(), lora_A.sym_sizes().end());
    shape[0] = lora_B.sym_size(0);
    delta = delta.view_symint(shape);
  }
  return delta.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("lora_delta_weight", &lora_delta_weight_composite);
}

}  // namespace torchlora::composite
