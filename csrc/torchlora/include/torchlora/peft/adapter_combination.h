// PEFT's add_weighted_adapter math for one adapted module: how the LoRA factors of several
// adapters, each with a weight, become the factors of one new adapter, for every
// combination_type of PEFT 0.21 (peft/utils/merge_utils.py semantics). The one definition for
// C++ (serve::AdapterPool::compose, peft::combine_adapters) and Python
// (torchlora._C.peft.combine_lora_factors, reached by LoraModel.add_weighted_adapter).
//
// Only ATen ops are used, in PEFT's order, so that the random kinds (dare_*) draw the very
// numbers PEFT draws from the default generator under the same seed: one at::bernoulli per
// factor, lora_A of every adapter first, then lora_B (linear kinds), or one per delta weight
// (svd kinds).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torchlora/export.h>

namespace torchlora::peft {

enum class CombinationType {
  Svd, Linear, Cat, Ties, TiesSvd, DareLinear, DareTies, DareLinearSvd, DareTiesSvd, MagnitudePrune,
  MagnitudePruneSvd,
};
enum class MajoritySignMethod { Total, Frequency };

// PEFT's names ("svd", "dare_ties", ...); c10::ValueError listing the valid ones otherwise.
TORCHLORA_API CombinationType parse_combination_type(const std::string& name);
TORCHLORA_API std::string combination_type_name(CombinationType type);
// "total" or "frequency".
TORCHLORA_API MajoritySignMethod parse_majority_sign_method(const std::string& name);

// svd, ties_svd, dare_*_svd, magnitude_prune_svd: the weighted delta weights are combined, then
// factored again by a truncated SVD.
TORCHLORA_API bool is_svd_combination(CombinationType type);
// The kinds that prune (ties, dare_*, magnitude_prune and their _svd forms) need `density`.
TORCHLORA_API bool uses_density(CombinationType type);

struct CombinationOptions {
  CombinationType type = CombinationType::Svd;
  // cat: the new rank (>= the sum of the factors' ranks; extra rows / columns stay zero);
  // svd kinds: the rank the SVD is truncated to; linear kinds: unused (the factors' own rank).
  int64_t rank = 0;
  std::optional<double> density;  // fraction of values kept, needed by uses_density(type)
  MajoritySignMethod majority_sign_method = MajoritySignMethod::Total;
  std::optional<double> svd_clamp;  // quantile in [0, 1] the SVD factors are clamped to
  bool svd_full_matrices = true;
  std::optional<std::string> svd_driver;  // torch.linalg.svd's driver (CUDA only)
};

// Checks what the options mean for `type`: density present for the pruning kinds (TypeError
// when missing) and >= 0 (ValueError); svd_clamp in [0, 1]; rank >= 1 for cat and the svd kinds.
TORCHLORA_API void check_combination_options(const CombinationOptions& options);

// One adapter's factors in one module, PEFT's shapes: lora_A [r, in] (Linear), [r, num]
// (Embedding), [r, in, kh, kw] (Conv2d); lora_B [out, r], [dim, r], [out, r, 1, 1].
struct WeightedFactors {
  at::Tensor lora_A;
  at::Tensor lora_B;
  double scaling = 1.0;  // the adapter's scaling in this module
  double weight = 1.0;   // its weight in the combination (negative subtracts it)
};

// The new adapter's (lora_A, lora_B) in this module, for an adapter whose scaling is then
// 1 (PEFT gives it r = lora_alpha):
//   cat     [w_i * s_i * A_i] stacked by rank, [B_i] side by side, zero-padded to options.rank;
//   linear kinds (linear, ties, dare_linear, dare_ties, magnitude_prune): the A_i and the B_i
//           merged separately, with weights sqrt(|w_i s_i|) (the sign of w_i s_i on A only),
//           in the dtype of the first lora_A; needs equal factor shapes;
//   svd kinds: the delta weights s_i B_i A_i merged with weights w_i, then
//           B = U S, A = V^T truncated to options.rank (and clamped with svd_clamp).
// `transposed_delta`: PEFT's delta weight of the module is [in, out] (Embedding, Linear with
// fan_in_fan_out); the svd kinds merge it in that layout, as PEFT does, since the layout decides
// which random draw or magnitude tie goes with which value. Runs without autograd.
// ValueError when `adapters` is empty or their shapes do not fit the kind.
TORCHLORA_API std::pair<at::Tensor, at::Tensor> combine_lora_factors(const std::vector<WeightedFactors>& adapters,
                                                                     const CombinationOptions& options,
                                                                     bool transposed_delta = false);

// PEFT's task-vector merges (merge_utils), over task tensors of one shape with one weight each.
TORCHLORA_API at::Tensor task_arithmetic(const std::vector<at::Tensor>& tensors, const at::Tensor& weights);
TORCHLORA_API at::Tensor magnitude_prune(const std::vector<at::Tensor>& tensors, const at::Tensor& weights,
                                         double density);
TORCHLORA_API at::Tensor ties(const std::vector<at::Tensor>& tensors, const at::Tensor& weights, double density,
                              MajoritySignMethod method);
TORCHLORA_API at::Tensor dare_linear(const std::vector<at::Tensor>& tensors, const at::Tensor& weights,
                                     double density);
TORCHLORA_API at::Tensor dare_ties(const std::vector<at::Tensor>& tensors, const at::Tensor& weights, double density,
                                   MajoritySignMethod method);

}  // namespace torchlora::peft
