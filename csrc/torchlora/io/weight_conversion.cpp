// PiSSA / OLoRA adapters -> plain LoRA adapters for the original base weights.
#include <torchlora/io/weight_conversion.h>

#include <c10/util/Exception.h>

#include <torchlora/peft/mutated_init.h>

namespace torchlora::io {

bool applies_to_rewritten_base_weights(const LoraConfig& config, const std::string& source) {
  peft::check_base_weights_reproducible(config.init_lora_weights, source);
  return peft::base_weight_init(config.init_lora_weights) != peft::BaseWeightInit::Unchanged;
}

LoraConfig config_for_original_weights(const LoraConfig& config) {
  peft::RankAlphaSettings s{config.r, config.lora_alpha, config.use_rslora, config.rank_pattern, config.alpha_pattern};
  s = peft::settings_for_original_weights(std::move(s));
  LoraConfig out = config;
  out.r = s.r;
  out.lora_alpha = s.lora_alpha;
  out.rank_pattern = std::move(s.rank_pattern);
  out.alpha_pattern = std::move(s.alpha_pattern);
  out.init_lora_weights = "true";
  return out;
}

PeftAdapter adapter_for_original_weights(const PeftAdapter& adapter, const BaseWeightLookup& base_weight) {
  if (!applies_to_rewritten_base_weights(adapter.config)) {
    return adapter;
  }
  PeftAdapter out;
  out.config = config_for_original_weights(adapter.config);
  out.other_tensors = adapter.other_tensors;
  for (const auto& [path, w] : adapter.modules) {
    peft::LoraFactors initial;  // undefined: zeros (PEFT rewrites Linear / Conv1D weights only)
    if (w.kind == LoraKind::Linear) {
      at::Tensor weight = base_weight(path);
      TORCH_CHECK(weight.defined() && weight.dim() == 2, "torchlora: module '", path,
                  "': the adapter (init_lora_weights=\"", adapter.config.init_lora_weights,
                  "\") needs the module's original 2-D base weight to recompute its initial factors");
      if (adapter.config.fan_in_fan_out) weight = weight.t();
      TORCH_CHECK(weight.size(0) == w.lora_B.size(0) && weight.size(1) == w.lora_A.size(1), "torchlora: module '", path,
                  "': the base weight ", adapter.config.fan_in_fan_out ? "(transposed, fan_in_fan_out) " : "", "is ",
                  weight.sizes(), " but the adapter's factors need [", w.lora_B.size(0), ", ", w.lora_A.size(1), "]");
      // On the weight's device (the SVD / QR are what they cost there), kept with the adapter's tensors.
      initial = peft::initial_factors(adapter.config.init_lora_weights, weight, w.rank(), w.scaling);
      initial = {initial.lora_A.to(w.lora_A.device()), initial.lora_B.to(w.lora_B.device())};
    }
    const auto converted = peft::factors_for_original_weights({w.lora_A, w.lora_B}, initial);
    LoraModuleWeights cw = w;
    cw.lora_A = converted.lora_A;
    cw.lora_B = converted.lora_B;
    TORCH_INTERNAL_ASSERT(cw.rank() == out.config.rank_for(path));
    out.modules.emplace(path, std::move(cw));
  }
  return out;
}

}  // namespace torchlora::io
