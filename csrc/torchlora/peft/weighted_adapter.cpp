#include <torchlora/peft/weighted_adapter.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <set>

namespace torchlora::peft {
namespace {

using Json = nlohmann::ordered_json;

// The rank PEFT allocates for an adapter: r, or the largest rank_pattern value above it.
int64_t allocated_rank(const io::LoraConfig& config) {
  int64_t rank = config.r;
  for (const auto& [key, r] : config.rank_pattern) rank = std::max(rank, r);
  return rank;
}

bool targets_parameters(const io::LoraConfig& config) {
  const Json obj = Json::parse(config.original_json);
  const auto it = obj.find("target_parameters");
  return it != obj.end() && !it->is_null() && !(it->is_array() && it->empty());
}

const char* selector_kind(const io::ModuleSelector& s) {
  switch (s.kind) {
    case io::ModuleSelector::Kind::Names: return "a list of names";
    case io::ModuleSelector::Kind::Regex: return "a regex";
    case io::ModuleSelector::Kind::None: break;
  }
  return "None";
}

io::ModuleSelector combined_targets(const std::vector<io::LoraConfig>& configs) {
  const auto kind = configs[0].target_modules.kind;
  for (const auto& c : configs) {
    TORCH_CHECK_VALUE(c.target_modules.kind == kind,
                      "all adapter configs should follow the same target modules type. Combining adapters with "
                      "`target_modules` type being a mix of list/set and string is not supported (got ",
                      selector_kind(configs[0].target_modules), " and ", selector_kind(c.target_modules), ")");
  }
  if (kind == io::ModuleSelector::Kind::Regex) {
    std::string regex;
    for (const auto& c : configs) regex += (regex.empty() ? "(" : "|(") + c.target_modules.regex + ")";
    return io::ModuleSelector::from_regex(regex);
  }
  TORCH_CHECK_TYPE(kind == io::ModuleSelector::Kind::Names,
                   "Invalid type None found in target_modules: the adapters to combine need target_modules");
  std::set<std::string> names;
  for (const auto& c : configs) names.insert(c.target_modules.names.begin(), c.target_modules.names.end());
  return io::ModuleSelector::from_names({names.begin(), names.end()});
}

}  // namespace

WeightedAdapterPlan plan_weighted_adapter(const std::vector<io::LoraConfig>& configs,
                                          const std::vector<std::string>& names,
                                          const WeightedAdapterOptions& options) {
  TORCH_CHECK_VALUE(!configs.empty(), "add_weighted_adapter needs at least one adapter to combine");
  TORCH_CHECK_VALUE(names.size() == configs.size(), "add_weighted_adapter: ", configs.size(), " configs but ",
                    names.size(), " names");
  for (size_t i = 0; i < configs.size(); ++i) {
    TORCH_CHECK_VALUE(!targets_parameters(configs[i]),
                      "add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '", names[i],
                      "')");
  }
  WeightedAdapterPlan plan;
  auto& c = plan.combination;
  c.type = parse_combination_type(options.combination_type);
  if (configs.size() == 1) c.type = CombinationType::Linear;  // one adapter: PEFT scales it linearly
  c.majority_sign_method = parse_majority_sign_method(options.majority_sign_method);
  c.density = options.density;
  c.svd_clamp = options.svd_clamp;
  c.svd_full_matrices = options.svd_full_matrices;
  c.svd_driver = options.svd_driver;

  std::vector<int64_t> ranks;
  for (const auto& config : configs) ranks.push_back(allocated_rank(config));
  if (c.type == CombinationType::Cat) {
    c.rank = 0;
    for (const int64_t r : ranks) c.rank += r;
  } else if (is_svd_combination(c.type)) {
    TORCH_CHECK_VALUE(!options.svd_rank || *options.svd_rank >= 1, "svd_rank must be a positive integer, got ",
                      *options.svd_rank);
    c.rank = options.svd_rank ? *options.svd_rank : *std::max_element(ranks.begin(), ranks.end());
  } else {
    TORCH_CHECK_VALUE(std::all_of(ranks.begin(), ranks.end(), [&](int64_t r) { return r == ranks[0]; }),
                      "All adapters must have the same r value when using combination_type linear, ties, dare_ties "
                      "or dare_linear.");
    c.rank = ranks[0];
  }
  plan.target_modules = combined_targets(configs);
  check_combination_options(c);
  return plan;
}

std::string weighted_adapter_config_changes(const WeightedAdapterPlan& plan) {
  Json changes = Json::object();
  changes["r"] = plan.combination.rank;
  changes["lora_alpha"] = plan.combination.rank;
  const auto& t = plan.target_modules;
  changes["target_modules"] = t.kind == io::ModuleSelector::Kind::Regex ? Json(t.regex) : Json(t.names);
  changes["rank_pattern"] = Json::object();
  changes["alpha_pattern"] = Json::object();
  return changes.dump();
}

io::LoraConfig weighted_adapter_config(const io::LoraConfig& first, const WeightedAdapterPlan& plan) {
  Json obj = Json::parse(first.to_json());
  const Json changes = Json::parse(weighted_adapter_config_changes(plan));
  for (auto it = changes.begin(); it != changes.end(); ++it) obj[it.key()] = it.value();
  return io::parse_adapter_config(obj.dump(), "the combined adapter's config");
}

io::PeftAdapter combine_adapters(const std::vector<WeightedAdapterPart>& parts, const WeightedAdapterOptions& options,
                                 const std::vector<std::string>& module_order) {
  std::vector<io::LoraConfig> configs;
  std::vector<std::string> names;
  for (const auto& p : parts) {
    TORCH_CHECK_VALUE(p.adapter != nullptr, "combine_adapters: part '", p.name, "' has no adapter");
    TORCH_CHECK_NOT_IMPLEMENTED(!p.adapter->config.use_dora, "combining adapters: '", p.name,
                                "' uses DoRA, whose magnitude a weighted combination does not define");
    TORCH_CHECK_NOT_IMPLEMENTED(p.adapter->other_tensors.empty(), "combining adapters: '", p.name,
                                "' holds tensors that are not LoRA factors (modules_to_save), which need the base model");
    configs.push_back(p.adapter->config);
    names.push_back(p.name);
  }
  const auto plan = plan_weighted_adapter(configs, names, options);
  io::PeftAdapter out;
  out.config = weighted_adapter_config(configs[0], plan);

  std::vector<std::string> order;
  std::set<std::string> held;
  for (const auto& p : parts) {
    for (const auto& [path, w] : p.adapter->modules) held.insert(path);
  }
  for (const auto& path : module_order) {
    if (held.erase(path)) order.push_back(path);
  }
  order.insert(order.end(), held.begin(), held.end());

  for (const auto& path : order) {
    std::vector<WeightedFactors> factors;
    const io::LoraModuleWeights* first = nullptr;
    for (const auto& p : parts) {
      const auto it = p.adapter->modules.find(path);
      if (it == p.adapter->modules.end()) continue;
      const auto& w = it->second;
      if (!first) first = &w;
      TORCH_CHECK_VALUE(w.kind == first->kind, "combining adapters: module '", path,
                        "' is adapted as different layer kinds by the adapters");
      factors.push_back({w.lora_A, w.lora_B, w.scaling, p.weight});
    }
    const bool transposed = first->kind == io::LoraKind::Embedding ||
                            (first->kind == io::LoraKind::Linear && configs[0].fan_in_fan_out);
    auto [A, B] = combine_lora_factors(factors, plan.combination, transposed);
    io::LoraModuleWeights result;
    result.kind = first->kind;
    result.lora_A = A;
    result.lora_B = B;
    if (out.config.lora_bias && first->kind != io::LoraKind::Embedding) {
      result.lora_bias = at::zeros({B.size(0)}, B.options());  // PEFT's new adapter starts its bias at zero
    }
    result.scaling = out.config.scaling_for(path);
    out.modules.emplace(path, std::move(result));
  }
  return out;
}

}  // namespace torchlora::peft
