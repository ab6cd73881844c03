// PEFT's add_weighted_adapter at the adapter level: which combination applies, the new
// adapter's rank and config, and (for adapters held in memory) its factors in every module.
// The per-module math is peft/adapter_combination.h. Used by serve::AdapterPool::compose and,
// through torchlora._C.peft.weighted_adapter_plan, by LoraModel.add_weighted_adapter.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/peft/adapter_combination.h>

namespace torchlora::peft {

// add_weighted_adapter's keyword arguments, PEFT's names and defaults.
struct WeightedAdapterOptions {
  std::string combination_type = "svd";
  std::optional<int64_t> svd_rank;  // svd kinds: the new rank (default: the largest of the adapters)
  std::optional<double> svd_clamp;
  bool svd_full_matrices = true;
  std::optional<std::string> svd_driver;
  std::optional<double> density;
  std::string majority_sign_method = "total";
};

struct WeightedAdapterPlan {
  // The checked per-module options: the kind (linear when there is one adapter, as in PEFT) and
  // the new rank (linear kinds: the adapters' common rank; cat: the sum; svd: svd_rank or the max).
  CombinationOptions combination;
  io::ModuleSelector target_modules;  // names: the union; regexes: "(a)|(b)"
};

// PEFT's checks and choices, from the adapters' configs (`names` name them in errors): no
// target_parameters, one rank for the linear kinds, target_modules all names or all regexes.
// An adapter's rank is its r, or the largest of r and its rank_pattern. ValueError / TypeError
// naming what is wrong.
TORCHLORA_API WeightedAdapterPlan plan_weighted_adapter(const std::vector<io::LoraConfig>& configs,
                                                        const std::vector<std::string>& names,
                                                        const WeightedAdapterOptions& options);

// The fields of the new adapter's config that differ from the first adapter's, as a JSON object:
// r and lora_alpha (both the new rank, so its scaling is 1 without rsLoRA), target_modules,
// and empty rank_pattern / alpha_pattern.
TORCHLORA_API std::string weighted_adapter_config_changes(const WeightedAdapterPlan& plan);
// The first adapter's config with those changes.
TORCHLORA_API io::LoraConfig weighted_adapter_config(const io::LoraConfig& first, const WeightedAdapterPlan& plan);

struct WeightedAdapterPart {
  std::string name;
  const io::PeftAdapter* adapter = nullptr;
  double weight = 1.0;
};

// The weighted combination of adapters held in memory: the config above and, for every module
// some part adapts, combine_lora_factors over the parts that adapt it. Modules are combined in
// `module_order` (the model's module order, which fixes the order of the dare_* random draws as
// in PEFT), then any others in name order. DoRA adapters and adapters with modules_to_save
// tensors are not supported (NotImplementedError).
TORCHLORA_API io::PeftAdapter combine_adapters(const std::vector<WeightedAdapterPart>& parts,
                                               const WeightedAdapterOptions& options,
                                               const std::vector<std::string>& module_order = {});

}  // namespace torchlora::peft
