#include <torchlora/peft/mutated_init.h>

#include <torchlora/peft/config_schema.h>

#include <ATen/ops/cat.h>
#include <ATen/ops/diag.h>
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>


namespace torchlora::peft {
namespace {

// The weight [out, in] as float32, as PEFT's pissa_init / olora_init take it.
at::Tensor float32_weight(const at::Tensor& weight, int64_t r, const char* method) {
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 2, "torchlora: ", method, " needs a 2-D weight [out, in]");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "torchlora: ", method,
                   " initialisation needs a float32, float16 or bfloat16 base weight, got ", dtype);
  TORCH_CHECK_VALUE(r > 0 && r <= std::min(weight.size(0), weight.size(1)), "torchlora: ", method,
                    " needs 0 < r <= min(out_features, in_features) = ", std::min(weight.size(0), weight.size(1)),
                    ", got r=", r);
  return weight.detach().to(at::kFloat);
}

}  // namespace

BaseWeightInit base_weight_init(const std::string& v) {
  switch (init_lora_weights_method(v)) {  // which values exist is the config schema's rule
    case InitMethod::Standard: return BaseWeightInit::Unchanged;
    case InitMethod::Pissa: return BaseWeightInit::Pissa;
    case InitMethod::Olora: return BaseWeightInit::Olora;
    case InitMethod::PissaNiter: return BaseWeightInit::Unreproducible;
    case InitMethod::Unsupported:
      // of PEFT's methods torchlora lacks, these rewrite the base weight from data or quantisation
      return v == "corda" || v == "lora_ga" || v == "loftq" ? BaseWeightInit::Unreproducible : BaseWeightInit::Unchanged;
    case InitMethod::Unknown: break;
  }
  TORCH_CHECK_VALUE(false, "torchlora: unknown init_lora_weights '", v,
                    "' (expected true, false, \"gaussian\", \"pissa\", \"pissa_niter_<K>\", \"olora\", ...)");
}

void check_base_weights_reproducible(const std::string& v, const std::string& source) {
  if (base_weight_init(v) != BaseWeightInit::Unreproducible) return;
  const char* how = v == "loftq" ? "LoftQ replaced them by quantised residuals"
                    : init_lora_weights_method(v) == InitMethod::PissaNiter ? "with a randomised SVD, which cannot be recomputed"
                                        : "from training data the adapter does not hold";
  const std::string convert =
      v == "loftq" ? "load it with the quantised base model it was made for (LoftQ adapters cannot be converted)"
                   : "convert it to an adapter for the original weights: save it with "
                     "save_pretrained(<folder>, path_initial_model_for_weight_conversion=<folder of this adapter "
                     "saved right after initialisation, before training>) (torchlora or PEFT) and load that";
  TORCH_CHECK_VALUE(false, "torchlora: ", source, ": the adapter was trained with init_lora_weights=\"", v,
                    "\", which rewrote the base weights (", how,
                    "); its factors only apply to those rewritten weights, so it cannot be loaded on the original "
                    "model. To use it, ", convert, ".");
}

LoraFactors pissa_factors_from_svd(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, double scaling) {
  TORCH_CHECK_VALUE(U.dim() == 2 && S.dim() == 1 && Vh.dim() == 2 && U.size(1) == S.size(0) && Vh.size(0) == S.size(0),
                    "torchlora: PiSSA needs U [out, r], S [r] and Vh [r, in], got ", U.sizes(), ", ", S.sizes(), " and ",
                    Vh.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scaling) && scaling > 0, "torchlora: PiSSA needs a positive scaling, got ", scaling);
  const auto sqrt_s = at::diag(at::sqrt(S.div(scaling)));
  return {at::matmul(sqrt_s, Vh).contiguous(), at::matmul(U, sqrt_s).contiguous()};
}

LoraFactors pissa_factors(const at::Tensor& weight, int64_t r, double scaling) {
  const auto w = float32_weight(weight, r, "PiSSA");
  const auto [U, S, Vh] = at::linalg_svd(w, /*full_matrices=*/false);
  return pissa_factors_from_svd(U.slice(1, 0, r), S.slice(0, 0, r), Vh.slice(0, 0, r), scaling);
}

LoraFactors olora_factors(const at::Tensor& weight, int64_t r) {
  const auto w = float32_weight(weight, r, "OLoRA");
  const auto [Q, R] = at::linalg_qr(w);
  return {R.slice(0, 0, r).contiguous(), Q.slice(1, 0, r).contiguous()};
}

LoraFactors initial_factors(const std::string& init_lora_weights, const at::Tensor& weight, int64_t r,
                            double scaling) {
  switch (base_weight_init(init_lora_weights)) {
    case BaseWeightInit::Pissa: return pissa_factors(weight, r, scaling);
    case BaseWeightInit::Olora: return olora_factors(weight, r);
    case BaseWeightInit::Unreproducible: check_base_weights_reproducible(init_lora_weights, "initial_factors"); break;
    case BaseWeightInit::Unchanged: break;
  }
  TORCH_CHECK_VALUE(false, "torchlora: init_lora_weights=\"", init_lora_weights,
                    "\" does not derive the factors from the base weight");
}

at::Tensor residual_weight(const at::Tensor& weight, const LoraFactors& initial, double scaling) {
  const auto w = weight.detach().to(at::kFloat);
  TORCH_CHECK_VALUE(w.dim() == 2 && initial.lora_B.dim() == 2 && initial.lora_A.dim() == 2 &&
                        initial.lora_B.size(0) == w.size(0) && initial.lora_A.size(1) == w.size(1),
                    "torchlora: the initial factors A ", initial.lora_A.sizes(), " and B ", initial.lora_B.sizes(),
                    " do not fit the weight ", w.sizes());
  // PEFT: weight - scaling * lora_B @ lora_A, i.e. (scaling * B) @ A, all float32.
  return w.sub(at::matmul(initial.lora_B.to(at::kFloat).mul(scaling), initial.lora_A.to(at::kFloat)));
}

LoraFactors factors_for_original_weights(const LoraFactors& trained, const LoraFactors& initial) {
  const auto& A = trained.lora_A;
  const auto& B = trained.lora_B;
  TORCH_CHECK_VALUE(A.defined() && B.defined() && A.dim() >= 2 && B.dim() == A.dim(),
                    "torchlora: the trained factors must be defined tensors of matching rank");
  auto A0 = initial.lora_A;
  auto B0 = initial.lora_B;
  if (!A0.defined() && !B0.defined()) {  // the init did not touch this module's base weight
    A0 = at::zeros_like(A);
    B0 = at::zeros_like(B);
  }
  auto other_dims_equal = [](const at::Tensor& x, const at::Tensor& y, int64_t skip) {
    if (x.dim() != y.dim()) return false;
    for (int64_t d = 0; d < x.dim(); ++d) {
      if (d != skip && x.size(d) != y.size(d)) return false;
    }
    return true;
  };
  TORCH_CHECK_VALUE(A0.defined() && B0.defined() && other_dims_equal(A, A0, 0) && other_dims_equal(B, B0, 1) &&
                        A0.size(0) == A.size(0) && B0.size(1) == B.size(1),
                    "torchlora: the initial factors A0 ", A0.defined() ? A0.sizes() : at::IntArrayRef{}, " and B0 ",
                    B0.defined() ? B0.sizes() : at::IntArrayRef{}, " do not match the trained factors A ", A.sizes(),
                    " and B ", B.sizes());
  // at::cat promotes (e.g. bfloat16 file factors with float32 initial ones give float32), as torch.cat.
  return {at::cat({A, A0}, 0).contiguous(), at::cat({B, B0.neg()}, 1).contiguous()};
}

RankAlphaSettings settings_for_original_weights(RankAlphaSettings s) {
  // scaling = alpha / r, or alpha / sqrt(r) with rsLoRA: keep it with r doubled.
  const double alpha_factor = s.use_rslora ? std::sqrt(2.0) : 2.0;
  s.r *= 2;
  s.lora_alpha *= alpha_factor;
  for (auto& [key, r] : s.rank_pattern) r *= 2;
  for (auto& [key, alpha] : s.alpha_pattern) alpha *= alpha_factor;
  return s;
}

}  // namespace torchlora::peft
