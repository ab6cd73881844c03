// PEFT's initialisations that rewrite the base weight (PiSSA, OLoRA), the one definition for C++
// and Python (torchlora._C.peft): the initial factors A0, B0 of a Linear, the residual weight
// W - scaling * B0 @ A0 they leave in the base model, and PEFT's conversion of a trained adapter
// to one for the original weights (save_pretrained(path_initial_model_for_weight_conversion=...)).
//
// Weights are in [out, in] layout (transpose transformers Conv1D weights first); factors are
// float32, computed with the LibTorch linear algebra torch.linalg uses, so C++ and Python agree.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torchlora/export.h>

namespace torchlora::peft {

// What an init_lora_weights value ("true", "false", "gaussian", "pissa", ...) does to the base
// weights of the Linear layers it initialises.
enum class BaseWeightInit {
  Unchanged,       // true, false, "gaussian", "eva", "orthogonal"
  Pissa,           // "pissa": exact SVD, reproducible from the original weight
  Olora,           // "olora" (any case): QR, reproducible from the original weight
  Unreproducible,  // "pissa_niter_<K>" (randomised SVD), "corda", "lora_ga" (need data), "loftq"
};

// Raises c10::ValueError for a value PEFT does not know.
TORCHLORA_API BaseWeightInit base_weight_init(const std::string& init_lora_weights);

// Raises c10::ValueError, saying how to convert the adapter, unless an adapter saved with this
// init_lora_weights can be applied from its file and the original base weights (that is, unless
// base_weight_init is Unchanged, Pissa or Olora). `source` names the adapter in the message.
TORCHLORA_API void check_base_weights_reproducible(const std::string& init_lora_weights, const std::string& source);

struct LoraFactors {
  at::Tensor lora_A;  // [r, in]
  at::Tensor lora_B;  // [out, r]
};

// PiSSA's factors from the top-r singular triplets U [out, r], S [r], Vh [r, in] of a weight:
// with s = sqrt(S / scaling), A = diag(s) @ Vh and B = U @ diag(s).
TORCHLORA_API LoraFactors pissa_factors_from_svd(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh,
                                                 double scaling);
// "pissa": the exact SVD (linalg_svd) of `weight` [out, in] in float32. Needs r <= min(out, in).
TORCHLORA_API LoraFactors pissa_factors(const at::Tensor& weight, int64_t r, double scaling);
// "olora": Q, R = linalg_qr(weight in float32); A = R[:r], B = Q[:, :r]. Needs r <= min(out, in).
TORCHLORA_API LoraFactors olora_factors(const at::Tensor& weight, int64_t r);
// The factors `init_lora_weights` (Pissa or Olora) gives a Linear with base weight `weight`.
TORCHLORA_API LoraFactors initial_factors(const std::string& init_lora_weights, const at::Tensor& weight, int64_t r,
                                          double scaling);

// What the init leaves as base weight: weight - (scaling * B0) @ A0, in float32.
TORCHLORA_API at::Tensor residual_weight(const at::Tensor& weight, const LoraFactors& initial, double scaling);

// PEFT's conversion: W_res + s*B@A = W + s*(B@A - B0@A0) = W + s*B'@A' with A' = cat(A, A0)
// (rows) and B' = cat(B, -B0) (columns); rank 2r, the same scaling. Works for any factor
// shapes PEFT saves (linear, embedding, conv); a module whose base weight the init did not
// rewrite converts with zero initial factors.
TORCHLORA_API LoraFactors factors_for_original_weights(const LoraFactors& trained, const LoraFactors& initial);

// The rank and alpha settings of an adapter converted this way: every rank doubles and alpha
// changes so that each module's scaling stays what it was (alpha * 2, or * sqrt(2) with rsLoRA;
// alpha_pattern values likewise, rank_pattern values * 2).
struct RankAlphaSettings {
  int64_t r = 8;
  double lora_alpha = 8.0;
  bool use_rslora = false;
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
};
TORCHLORA_API RankAlphaSettings settings_for_original_weights(RankAlphaSettings settings);

}  // namespace torchlora::peft
