// LoRA on nn.Parameters from PEFT adapters (see parameter_adapters.h).
#include <torchlora/io/parameter_adapters.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>

#include <torchlora/peft/parameter_lora.h>
#include <torchlora/peft/scaling.h>

namespace torchlora::io {
namespace {

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

}  // namespace

std::vector<std::string> target_parameters(const LoraConfig& config) {
  const auto obj = nlohmann::ordered_json::parse(config.original_json);
  const auto it = obj.find("target_parameters");
  if (it == obj.end() || it->is_null()) return {};
  return it->get<std::vector<std::string>>();
}

std::map<std::string, ParameterLoraWeights> parameter_adapters(
    const PeftAdapter& adapter, const std::vector<std::pair<std::string, std::vector<int64_t>>>& named_shapes,
    const std::vector<std::string>& transposed_modules) {
  const auto targets = target_parameters(adapter.config);
  std::map<std::string, ParameterLoraWeights> out;
  if (targets.empty()) return out;
  for (const auto& [path, w] : adapter.modules) {
    int64_t depth = 0;
    const std::string module = peft::strip_base_layer(path, &depth);
    std::vector<const std::pair<std::string, std::vector<int64_t>>*> params;  // in the model's order
    for (const auto& item : named_shapes) {
      const auto& name = item.first;
      const bool direct = name.size() > module.size() + 1 && name.starts_with(module + ".") &&
                          name.find('.', module.size() + 1) == std::string::npos;
      if (direct && peft::parameter_is_targeted(name, targets)) params.push_back(&item);
    }
    if (params.empty()) {
      // a module adapted through target_modules: not ours, unless only a wrapper could have made the path
      TORCH_CHECK_VALUE(depth == 0, "torchlora: the adapter has LoRA factors for '", path, "' but module '", module,
                        "' has no parameter matched by target_parameters");
      continue;
    }
    TORCH_CHECK_VALUE(depth < static_cast<int64_t>(params.size()), "torchlora: the adapter has LoRA factors for '",
                      path, "' (nesting depth ", depth, ") but module '", module, "' has only ", params.size(),
                      " parameter(s) matched by target_parameters");
    const auto& [param_name, shape] = *params[params.size() - 1 - depth];
    const bool transposed = contains(transposed_modules, module);
    const auto s = peft::parameter_lora_shape(shape, transposed);
    const int64_t r = adapter.config.rank_for(param_name);
    const auto a_shape = peft::parameter_lora_A_shape(s, r);
    const auto b_shape = peft::parameter_lora_B_shape(s, r);
    TORCH_CHECK_VALUE(w.lora_A.sizes() == at::IntArrayRef(a_shape) && w.lora_B.sizes() == at::IntArrayRef(b_shape),
                      "torchlora: the adapter's factors for parameter '", param_name, "' (module '", path,
                      "') must be lora_A ", at::IntArrayRef(a_shape), " and lora_B ", at::IntArrayRef(b_shape),
                      " for r=", r, " and a parameter of shape ", at::IntArrayRef(shape), ", got ", w.lora_A.sizes(),
                      " and ", w.lora_B.sizes());
    out.emplace(path, ParameterLoraWeights{param_name, w.lora_A, w.lora_B, adapter.config.scaling_for(param_name)});
  }
  return out;
}

std::vector<std::string> merge_parameter_adapters(const PeftAdapter& adapter,
                                                  const std::vector<std::pair<std::string, at::Tensor>>& named_parameters,
                                                  const std::vector<std::string>& transposed_modules, double sign) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  std::map<std::string, at::Tensor> by_name;
  for (const auto& [name, t] : named_parameters) {
    TORCH_CHECK_VALUE(t.defined(), "torchlora: parameter '", name, "' is undefined");
    shapes.emplace_back(name, t.sizes().vec());
    by_name.emplace(name, t);
  }
  const auto found = parameter_adapters(adapter, shapes, transposed_modules);
  TORCH_CHECK_VALUE(!target_parameters(adapter.config).empty(),
                    "torchlora: the adapter's config has no target_parameters: nothing to merge into parameters");
  TORCH_CHECK_VALUE(!found.empty(), "torchlora: no parameter of the model is matched by the adapter's target_parameters ",
                    nlohmann::ordered_json(target_parameters(adapter.config)).dump());
  std::vector<std::string> changed;
  at::NoGradGuard no_grad;
  for (const auto& [path, p] : found) {
    at::Tensor param = by_name.at(p.parameter);
    const bool transposed = contains(transposed_modules, peft::strip_base_layer(path));
    // float32 at least, so that a half-precision parameter rounds once
    const auto compute = c10::promoteTypes(p.lora_A.scalar_type(), at::kFloat);
    const auto delta = peft::parameter_delta_weight(p.lora_A.to(param.device(), compute),
                                                    p.lora_B.to(param.device(), compute), p.scaling * sign,
                                                    param.sizes().vec(), transposed);
    param.copy_(param.to(compute).add(delta.reshape(param.sizes())));
    changed.push_back(p.parameter);
  }
  return changed;
}

}  // namespace torchlora::io
