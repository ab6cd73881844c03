#include "dora_checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace torchlora::detail {
namespace {

bool is_dora_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_defined_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(is_dora_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                  const char* name) {
  TORCH_CHECK_VALUE(ref.device() == t.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device());
}

}  // namespace

c10::SymInt check_dora_weight(const at::Tensor& weight, bool fan_in_fan_out, const char* op) {
  check_defined_float(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2 || weight.dim() >= 3, op,
                    ": weight must be 2-D [out, in] or a conv kernel [out, in, k...], got ", weight.sym_sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 || !fan_in_fan_out, op,
                    ": fan_in_fan_out applies to a 2-D weight, not to the conv kernel ", weight.sym_sizes());
  return fan_in_fan_out ? weight.sym_size(1) : weight.sym_size(0);
}

DoraNormDims check_dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    double scaling, bool fan_in_fan_out,
                                    const std::optional<at::Tensor>& weight_sq_norm, const char* op) {
  check_defined_float(weight, op, "weight");
  check_defined_float(lora_A, op, "lora_A");
  check_defined_float(lora_B, op, "lora_B");
  TORCH_CHECK_TYPE(lora_A.scalar_type() == lora_B.scalar_type(), op, ": lora_A is ", lora_A.scalar_type(),
                   " but lora_B is ", lora_B.scalar_type());
  check_device(weight, lora_A, op, "weight", "lora_A");
  check_device(weight, lora_B, op, "weight", "lora_B");
  TORCH_CHECK_VALUE(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);

  const bool matrices = lora_A.dim() == 2 && lora_B.dim() == 2;
  const bool kernels = lora_A.dim() >= 3 && lora_B.dim() == lora_A.dim();
  TORCH_CHECK_VALUE(matrices || kernels, op,
                    ": the factors must be 2-D (lora_A [r, in], lora_B [out, r]) or conv kernels (lora_A "
                    "[r, in, kh, kw], lora_B [out, r, 1, 1]), got lora_A ", lora_A.sym_sizes(), " and lora_B ",
                    lora_B.sym_sizes());
  const c10::SymInt r = lora_A.sym_size(0);
  TORCH_CHECK_VALUE(r > 0, op, ": the rank (lora_A.size(0)) must be positive, got lora_A ", lora_A.sym_sizes());
  const c10::SymInt out = lora_B.sym_size(0);
  c10::SymInt in_features = lora_A.sym_size(1);
  if (matrices) {
    TORCH_CHECK_VALUE(lora_B.sym_size(1) == r, op, ": lora_B is ", lora_B.sym_sizes(), " but lora_A ",
                      lora_A.sym_sizes(), " has rank ", r);
    TORCH_CHECK_VALUE(weight.dim() == 2, op, ": 2-D factors need a 2-D weight, got weight ", weight.sym_sizes());
    const c10::SymInt w_out = fan_in_fan_out ? weight.sym_size(1) : weight.sym_size(0);
    const c10::SymInt w_in = fan_in_fan_out ? weight.sym_size(0) : weight.sym_size(1);
    TORCH_CHECK_VALUE(w_in == in_features, op, ": weight ", weight.sym_sizes(), (fan_in_fan_out ? " (fan_in_fan_out)" : ""),
                      " has ", w_in, " input features but lora_A ", lora_A.sym_sizes(), " has ", in_features);
    TORCH_CHECK_VALUE(w_out == out, op, ": weight ", weight.sym_sizes(), (fan_in_fan_out ? " (fan_in_fan_out)" : ""),
                      " has ", w_out, " output features but lora_B ", lora_B.sym_sizes(), " has ", out);
  } else {
    TORCH_CHECK_VALUE(!fan_in_fan_out, op, ": fan_in_fan_out applies to 2-D factors, not to the conv factors ",
                      lora_A.sym_sizes());
    bool one_by_one = true;
    for (int64_t d = 2; d < lora_B.dim(); ++d) one_by_one = one_by_one && lora_B.sym_size(d) == 1;
    TORCH_CHECK_VALUE(one_by_one, op, ": lora_B of a conv must be [out, r, 1, 1], got ", lora_B.sym_sizes());
    TORCH_CHECK_NOT_IMPLEMENTED(lora_B.sym_size(1) == r, op,
                                ": DoRA on a conv with groups > 1 is not supported (lora_B ", lora_B.sym_sizes(),
                                " has ", lora_B.sym_size(1), " input channels but lora_A ", lora_A.sym_sizes(),
                                " has rank ", r, ")");
    TORCH_CHECK_VALUE(weight.dim() == lora_A.dim(), op, ": conv factors need a conv kernel of the same rank, got weight ",
                      weight.sym_sizes(), " and lora_A ", lora_A.sym_sizes());
    TORCH_CHECK_VALUE(weight.sym_size(0) == out, op, ": weight ", weight.sym_sizes(), " has ", weight.sym_size(0),
                      " output channels but lora_B ", lora_B.sym_sizes(), " has ", out);
    for (int64_t d = 1; d < weight.dim(); ++d) {
      TORCH_CHECK_VALUE(weight.sym_size(d) == lora_A.sym_size(d), op, ": weight ", weight.sym_sizes(),
                        " and lora_A ", lora_A.sym_sizes(), " differ in dimension ", d,
                        " (in channels and kernel size must match)");
      if (d > 1) in_features = in_features * weight.sym_size(d);
    }
  }
  if (weight_sq_norm.has_value() && weight_sq_norm->defined()) {
    const at::Tensor& sq = *weight_sq_norm;
    const auto want = dora_accumulate_dtype(lora_A.scalar_type());
    TORCH_CHECK_TYPE(sq.scalar_type() == want, op, ": weight_sq_norm must be ", want, " (from dora_weight_sq_norm for ",
                     lora_A.scalar_type(), " factors), got ", sq.scalar_type());
    TORCH_CHECK_VALUE(sq.dim() == 1 && sq.sym_size(0) == out, op, ": weight_sq_norm must be [", out, "], got ",
                      sq.sym_sizes());
    check_device(weight, sq, op, "weight", "weight_sq_norm");
  }
  return {out, in_features, r};
}

int64_t check_dora_scale(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                         const std::optional<at::Tensor>& bias, int64_t dim, const char* op) {
  check_defined_float(z, op, "z");
  check_defined_float(magnitude, op, "magnitude");
  check_defined_float(weight_norm, op, "weight_norm");
  TORCH_CHECK_VALUE(z.dim() >= 1, op, ": z must have at least one dimension");
  TORCH_CHECK_VALUE(dim >= -z.dim() && dim < z.dim(), op, ": dim ", dim, " is out of range for z ", z.sym_sizes());
  const int64_t d = dim < 0 ? dim + z.dim() : dim;
  const c10::SymInt C = z.sym_size(d);
  TORCH_CHECK_VALUE(magnitude.sym_numel() == C, op, ": magnitude ", magnitude.sym_sizes(), " must have ", C,
                    " elements (z ", z.sym_sizes(), " along dim ", dim, ")");
  TORCH_CHECK_VALUE(weight_norm.sym_numel() == C, op, ": weight_norm ", weight_norm.sym_sizes(), " must have ", C,
                    " elements (z ", z.sym_sizes(), " along dim ", dim, ")");
  check_device(z, magnitude, op, "z", "magnitude");
  check_device(z, weight_norm, op, "z", "weight_norm");
  if (bias.has_value() && bias->defined()) {
    check_defined_float(*bias, op, "bias");
    TORCH_CHECK_VALUE(bias->sym_numel() == C, op, ": bias ", bias->sym_sizes(), " must have ", C,
                      " elements (z ", z.sym_sizes(), " along dim ", dim, ")");
    check_device(z, *bias, op, "z", "bias");
  }
  return d;
}

}  // namespace torchlora::detail
