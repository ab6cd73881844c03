#include <torchlora/peft/adapter_combination.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>

#include <torchlora/ops.h>

namespace torchlora::peft {
namespace {

constexpr const char* kWhere = "torchlora: add_weighted_adapter";

struct TypeName {
  CombinationType type;
  const char* name;
};
constexpr std::array<TypeName, 11> kTypeNames{{
    {CombinationType::Svd, "svd"},
    {CombinationType::Linear, "linear"},
    {CombinationType::Cat, "cat"},
    {CombinationType::Ties, "ties"},
    {CombinationType::TiesSvd, "ties_svd"},
    {CombinationType::DareTies, "dare_ties"},
    {CombinationType::DareLinear, "dare_linear"},
    {CombinationType::DareTiesSvd, "dare_ties_svd"},
    {CombinationType::DareLinearSvd, "dare_linear_svd"},
    {CombinationType::MagnitudePrune, "magnitude_prune"},
    {CombinationType::MagnitudePruneSvd, "magnitude_prune_svd"},
}};

// The merge a combination kind applies (to factors, or to delta weights for the svd kinds).
enum class Merge { TaskArithmetic, Ties, DareLinear, DareTies, MagnitudePrune };

Merge merge_of(CombinationType type) {
  switch (type) {
    case CombinationType::Svd:
    case CombinationType::Linear:
    case CombinationType::Cat: return Merge::TaskArithmetic;
    case CombinationType::Ties:
    case CombinationType::TiesSvd: return Merge::Ties;
    case CombinationType::DareLinear:
    case CombinationType::DareLinearSvd: return Merge::DareLinear;
    case CombinationType::DareTies:
    case CombinationType::DareTiesSvd: return Merge::DareTies;
    case CombinationType::MagnitudePrune:
    case CombinationType::MagnitudePruneSvd: return Merge::MagnitudePrune;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown combination type");
}

// Keeps a `density` fraction of the values: the largest magnitudes, or a random draw (rescaled
// by 1 / density for DARE, so the expected value is unchanged).
at::Tensor prune(const at::Tensor& tensor, double density, bool random, bool rescale) {
  if (density >= 1) {
    TORCH_WARN("The density ", density, " is greater than or equal to 1, no pruning will be performed.");
    return tensor;
  }
  TORCH_CHECK_VALUE(density >= 0, "Density should be >= 0, got ", density);
  if (random) {
    const at::Tensor pruned = tensor * at::bernoulli(at::full_like(tensor, density));
    return rescale ? pruned / density : pruned;
  }
  at::Tensor mask = at::zeros_like(tensor).reshape(-1);
  const auto k = static_cast<int64_t>(density * static_cast<double>(tensor.numel()));
  const auto top = at::topk(tensor.abs().reshape(-1), k, /*dim=*/-1, /*largest=*/true);
  mask.index_fill_(0, std::get<1>(top), 1);
  return tensor * mask.reshape(tensor.sizes());
}

std::vector<at::Tensor> pruned_all(const std::vector<at::Tensor>& tensors, double density, bool random) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(prune(t, density, random, /*rescale=*/random));
  return out;
}

// weights [n] broadcast over the stacked task tensors [n, ...].
at::Tensor weighted(const at::Tensor& stacked, const at::Tensor& weights) {
  std::vector<int64_t> shape(static_cast<size_t>(stacked.dim()), 1);
  shape[0] = weights.size(0);
  return stacked * weights.view(shape);
}

// Where each value agrees with the sign that wins over the tasks (by total mass or by count).
at::Tensor majority_sign_mask(const at::Tensor& stacked, MajoritySignMethod method) {
  const at::Tensor sign = stacked.sign();
  const at::Tensor magnitude = method == MajoritySignMethod::Total ? stacked.sum(0) : sign.sum(0);
  return sign == at::where(magnitude >= 0, at::Scalar(1), at::Scalar(-1));
}

// The mean of the values that agree with the majority sign (0 where none does).
at::Tensor disjoint_merge(const at::Tensor& weighted_tasks, const at::Tensor& mask) {
  const at::Tensor kept = (weighted_tasks * mask).sum(0);
  return kept / at::clamp(mask.sum(0), std::optional<at::Scalar>(1.0), std::optional<at::Scalar>());
}

void check_tasks(const std::vector<at::Tensor>& tensors, const at::Tensor& weights) {
  TORCH_CHECK_VALUE(!tensors.empty(), kWhere, ": no task tensors to merge");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == static_cast<int64_t>(tensors.size()), kWhere,
                    ": ", tensors.size(), " task tensors need ", tensors.size(), " weights, got ", weights.sizes());
}

at::Tensor merge(Merge kind, const std::vector<at::Tensor>& tensors, const at::Tensor& weights,
                 const CombinationOptions& o) {
  switch (kind) {
    case Merge::TaskArithmetic: return task_arithmetic(tensors, weights);
    case Merge::Ties: return ties(tensors, weights, *o.density, o.majority_sign_method);
    case Merge::DareLinear: return dare_linear(tensors, weights, *o.density);
    case Merge::DareTies: return dare_ties(tensors, weights, *o.density, o.majority_sign_method);
    case Merge::MagnitudePrune: return magnitude_prune(tensors, weights, *o.density);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown merge");
}

// A list of Python-style floats as PEFT's torch.tensor(weights): the default dtype, on `device`.
at::Tensor weight_tensor(const std::vector<double>& values, const at::Device& device) {
  const auto dtype = c10::typeMetaToScalarType(at::get_default_dtype());
  return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(dtype).to(device);
}

void check_factors(const std::vector<WeightedFactors>& adapters) {
  TORCH_CHECK_VALUE(!adapters.empty(), kWhere, ": no adapter to combine holds this module");
  for (size_t i = 0; i < adapters.size(); ++i) {
    const auto& f = adapters[i];
    TORCH_CHECK_VALUE(f.lora_A.defined() && f.lora_B.defined(), kWhere, ": adapter ", i, " has no factors");
    TORCH_CHECK_VALUE(f.lora_A.dim() >= 2 && f.lora_B.dim() == f.lora_A.dim() && f.lora_A.size(0) == f.lora_B.size(1),
                      kWhere, ": adapter ", i, " has lora_A ", f.lora_A.sizes(), " and lora_B ", f.lora_B.sizes(),
                      "; expected lora_A [r, in, ...] and lora_B [out, r, ...] (grouped conv factors cannot be combined)");
    TORCH_CHECK_VALUE(std::isfinite(f.scaling) && std::isfinite(f.weight), kWhere, ": adapter ", i, " has scaling ",
                      f.scaling, " and weight ", f.weight, "; both must be finite");
  }
}

std::pair<at::Tensor, at::Tensor> combine_cat(const std::vector<WeightedFactors>& adapters, int64_t rank) {
  std::vector<at::Tensor> as, bs;
  for (const auto& f : adapters) {
    as.push_back(f.lora_A * f.weight * f.scaling);
    bs.push_back(f.lora_B);
  }
  const at::Tensor cat_A = at::cat(as, 0);
  const at::Tensor cat_B = at::cat(bs, 1);
  const int64_t total = cat_A.size(0);
  TORCH_CHECK_VALUE(total <= rank, kWhere, ": combination_type cat needs rank >= ", total,
                    " (the sum of the adapters' ranks in this module), got ", rank);
  auto a_shape = cat_A.sizes().vec();
  auto b_shape = cat_B.sizes().vec();
  a_shape[0] = rank;
  b_shape[1] = rank;
  at::Tensor A = at::zeros(a_shape, cat_A.options());
  at::Tensor B = at::zeros(b_shape, cat_B.options());
  A.narrow(0, 0, total).copy_(cat_A);
  B.narrow(1, 0, total).copy_(cat_B);
  return {A, B};
}

std::pair<at::Tensor, at::Tensor> combine_factors(const std::vector<WeightedFactors>& adapters,
                                                  const CombinationOptions& o) {
  std::vector<at::Tensor> as, bs;
  std::vector<double> weights_A, weights_B;
  for (const auto& f : adapters) {
    TORCH_CHECK_VALUE(f.lora_A.sizes() == adapters[0].lora_A.sizes() && f.lora_B.sizes() == adapters[0].lora_B.sizes(),
                      kWhere, ": combination_type ", combination_type_name(o.type),
                      " merges the factors themselves, so they need one shape, got lora_A ", adapters[0].lora_A.sizes(),
                      " and ", f.lora_A.sizes(), ", lora_B ", adapters[0].lora_B.sizes(), " and ", f.lora_B.sizes(),
                      " (use cat or an svd kind for adapters of different ranks)");
    // sqrt(|w s|) on both factors, the sign on lora_A only, so that B A carries w s once
    const double ws = f.weight * f.scaling;
    const double root = std::sqrt(std::abs(ws));
    weights_A.push_back(ws >= 0 ? root : -root);
    weights_B.push_back(root);
    as.push_back(f.lora_A);
    bs.push_back(f.lora_B);
  }
  const auto kind = merge_of(o.type);
  const auto dtype = adapters[0].lora_A.scalar_type();
  // lora_A of every adapter before lora_B: the order of PEFT's random draws
  at::Tensor A = merge(kind, as, weight_tensor(weights_A, as[0].device()), o);
  at::Tensor B = merge(kind, bs, weight_tensor(weights_B, bs[0].device()), o);
  return {A.to(dtype), B.to(dtype)};
}

std::pair<at::Tensor, at::Tensor> combine_svd(const std::vector<WeightedFactors>& adapters,
                                              const CombinationOptions& o, bool transposed_delta) {
  std::vector<at::Tensor> deltas;
  std::vector<double> weights;
  for (const auto& f : adapters) {
    at::Tensor delta = torchlora::lora_delta_weight(f.lora_A, f.lora_B, f.scaling, false, std::nullopt);
    // PEFT merges the delta in the base weight's layout; the layout decides which random draw
    // and which magnitude tie falls on which value.
    deltas.push_back(transposed_delta ? delta.t() : delta);
    TORCH_CHECK_VALUE(deltas.back().sizes() == deltas[0].sizes(), kWhere, ": the adapters' delta weights differ in shape (",
                      deltas[0].sizes(), " and ", deltas.back().sizes(), ")");
    weights.push_back(f.weight);
  }
  at::Tensor delta = merge(merge_of(o.type), deltas, weight_tensor(weights, deltas[0].device()), o);
  if (transposed_delta) delta = delta.t();
  delta = delta.flatten(1);  // conv: [out, in * kh * kw]
  auto [U, S, Vh] = at::linalg_svd(delta, o.svd_full_matrices,
                                   o.svd_driver ? std::optional<c10::string_view>(*o.svd_driver) : std::nullopt);
  const int64_t rank = o.rank;
  TORCH_CHECK_VALUE(S.size(0) >= rank, kWhere, ": svd_rank ", rank, " is above the rank a delta weight of shape ",
                    delta.sizes(), " can have (", S.size(0), "); pass a smaller svd_rank");
  U = at::matmul(U.narrow(1, 0, rank), at::diag(S.narrow(0, 0, rank)));
  Vh = Vh.narrow(0, 0, rank);
  if (o.svd_clamp) {
    const at::Tensor dist = at::cat({U.flatten(), Vh.flatten()});
    const at::Tensor hi = at::quantile(dist, *o.svd_clamp);
    const at::Tensor lo = -hi;
    U = U.clamp(std::optional<at::Tensor>(lo), std::optional<at::Tensor>(hi));
    Vh = Vh.clamp(std::optional<at::Tensor>(lo), std::optional<at::Tensor>(hi));
  }
  auto a_shape = adapters[0].lora_A.sizes().vec();
  auto b_shape = adapters[0].lora_B.sizes().vec();
  a_shape[0] = rank;
  b_shape[1] = rank;
  return {Vh.reshape(a_shape), U.reshape(b_shape)};
}

}  // namespace

CombinationType parse_combination_type(const std::string& name) {
  std::string valid;
  for (const auto& t : kTypeNames) {
    if (name == t.name) return t.type;
    valid += std::string(valid.empty() ? "" : ", ") + t.name;
  }
  TORCH_CHECK_VALUE(false, "Invalid combination_type: ", name, " (expected one of ", valid, ")");
}

std::string combination_type_name(CombinationType type) {
  for (const auto& t : kTypeNames) {
    if (t.type == type) return t.name;
  }
  TORCH_INTERNAL_ASSERT(false, "unknown combination type");
}

MajoritySignMethod parse_majority_sign_method(const std::string& name) {
  if (name == "total") return MajoritySignMethod::Total;
  if (name == "frequency") return MajoritySignMethod::Frequency;
  TORCH_CHECK_VALUE(false, "majority_sign_method must be \"total\" or \"frequency\", got \"", name, "\"");
}

bool is_svd_combination(CombinationType type) {
  return type == CombinationType::Svd || type == CombinationType::TiesSvd || type == CombinationType::DareLinearSvd ||
         type == CombinationType::DareTiesSvd || type == CombinationType::MagnitudePruneSvd;
}

bool uses_density(CombinationType type) { return merge_of(type) != Merge::TaskArithmetic; }

void check_combination_options(const CombinationOptions& o) {
  const auto name = combination_type_name(o.type);
  if (uses_density(o.type)) {
    TORCH_CHECK_TYPE(o.density.has_value(), "combination_type ", name,
                     " needs density (the fraction of values kept, in [0, 1]), got None");
    TORCH_CHECK_VALUE(*o.density >= 0 && !std::isnan(*o.density), "Density should be >= 0, got ", *o.density);
  }
  if (o.svd_clamp) {
    TORCH_CHECK_VALUE(*o.svd_clamp >= 0 && *o.svd_clamp <= 1, "svd_clamp is a quantile and must be in [0, 1], got ",
                      *o.svd_clamp);
  }
  if (o.type == CombinationType::Cat || is_svd_combination(o.type)) {
    TORCH_CHECK_VALUE(o.rank >= 1, kWhere, ": combination_type ", name, " needs a rank >= 1, got ", o.rank);
  }
}

std::pair<at::Tensor, at::Tensor> combine_lora_factors(const std::vector<WeightedFactors>& adapters,
                                                       const CombinationOptions& options, bool transposed_delta) {
  const c10::AutoGradMode no_grad(false);  // the result is new adapter data, not a function of the inputs
  check_combination_options(options);
  check_factors(adapters);
  if (options.type == CombinationType::Cat) return combine_cat(adapters, options.rank);
  if (is_svd_combination(options.type)) return combine_svd(adapters, options, transposed_delta);
  return combine_factors(adapters, options);
}

at::Tensor task_arithmetic(const std::vector<at::Tensor>& tensors, const at::Tensor& weights) {
  check_tasks(tensors, weights);
  return weighted(at::stack(tensors, 0), weights).sum(0);
}

at::Tensor magnitude_prune(const std::vector<at::Tensor>& tensors, const at::Tensor& weights, double density) {
  check_tasks(tensors, weights);
  return weighted(at::stack(pruned_all(tensors, density, /*random=*/false), 0), weights).sum(0);
}

at::Tensor ties(const std::vector<at::Tensor>& tensors, const at::Tensor& weights, double density,
                MajoritySignMethod method) {
  check_tasks(tensors, weights);
  const at::Tensor stacked = at::stack(pruned_all(tensors, density, /*random=*/false), 0);
  const at::Tensor mask = majority_sign_mask(stacked, method);
  return disjoint_merge(weighted(stacked, weights), mask);
}

at::Tensor dare_linear(const std::vector<at::Tensor>& tensors, const at::Tensor& weights, double density) {
  check_tasks(tensors, weights);
  return weighted(at::stack(pruned_all(tensors, density, /*random=*/true), 0), weights).sum(0);
}

at::Tensor dare_ties(const std::vector<at::Tensor>& tensors, const at::Tensor& weights, double density,
                     MajoritySignMethod method) {
  check_tasks(tensors, weights);
  const at::Tensor stacked = at::stack(pruned_all(tensors, density, /*random=*/true), 0);
  const at::Tensor mask = majority_sign_mask(stacked, method);
  return disjoint_merge(weighted(stacked, weights), mask);
}

}  // namespace torchlora::peft
