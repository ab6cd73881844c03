#include "adapter_checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <set>
#include <sstream>

#include <torchlora/io/parameter_adapters.h>
#include <torchlora/io/trainable_tokens.h>
#include <torchlora/io/weight_conversion.h>

namespace torchlora::serve::detail {
namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  return s.str() + "]";
}

std::string some_targets(const std::vector<TargetLayer>& layers) {
  std::ostringstream s;
  const size_t shown = std::min<size_t>(layers.size(), 5);
  for (size_t i = 0; i < shown; ++i) s << (i ? ", " : "") << "'" << layers[i].name << "'";
  if (layers.size() > shown) s << ", ... (" << layers.size() << " in all)";
  return s.str();
}

// The factor shapes PEFT saves for a module of this base layer and rank r.
std::vector<int64_t> expected_a(const TargetLayer& l, int64_t r) {
  const auto& w = l.weight_shape;
  switch (l.kind) {
    case io::LoraKind::Linear: return {r, w[1]};
    case io::LoraKind::Embedding: return {r, w[0]};
    case io::LoraKind::Conv2d: return {r, w[1] * l.groups, w[2], w[3]};
  }
  return {};
}

std::vector<int64_t> expected_b(const TargetLayer& l, int64_t r) {
  const auto& w = l.weight_shape;
  switch (l.kind) {
    case io::LoraKind::Linear: return {w[0], r};
    case io::LoraKind::Embedding: return {w[1], r};
    case io::LoraKind::Conv2d: return {w[0], r / l.groups, 1, 1};
  }
  return {};
}

[[noreturn]] void reject(const std::string& name, const std::string& message) {
  throw AdapterRejected(name, "torchlora: adapter '" + name + "' " + message);
}

}  // namespace

std::string kind_name(io::LoraKind kind) {
  switch (kind) {
    case io::LoraKind::Linear: return "linear";
    case io::LoraKind::Embedding: return "embedding";
    case io::LoraKind::Conv2d: return "conv2d";
  }
  return "?";
}

void check_pool_layout(const std::vector<TargetLayer>& layers, const PoolOptions& o) {
  TORCH_CHECK_VALUE(o.max_loras >= 1, "torchlora: AdapterPool: max_loras must be >= 1, got ", o.max_loras);
  TORCH_CHECK_VALUE(o.max_lora_rank >= 1, "torchlora: AdapterPool: max_lora_rank must be >= 1, got ", o.max_lora_rank);
  TORCH_CHECK_VALUE(o.max_cpu_loras == 0 || o.max_cpu_loras >= o.max_loras,
                    "torchlora: AdapterPool: max_cpu_loras (", o.max_cpu_loras, ") must be 0 or >= max_loras (",
                    o.max_loras, ")");
  TORCH_CHECK_VALUE(at::isFloatingType(o.dtype), "torchlora: AdapterPool: dtype must be floating point, got ", o.dtype);
  TORCH_CHECK_VALUE(!layers.empty(), "torchlora: AdapterPool needs at least one target layer");
  std::set<std::string> seen;
  for (const auto& l : layers) {
    TORCH_CHECK_VALUE(seen.insert(l.name).second, "torchlora: AdapterPool: target layer '", l.name, "' is given twice");
    const size_t dims = l.kind == io::LoraKind::Conv2d ? 4 : 2;
    TORCH_CHECK_VALUE(l.weight_shape.size() == dims, "torchlora: AdapterPool: target layer '", l.name, "' (",
                      kind_name(l.kind), ") needs a ", dims, "-D weight shape, got ", shape_str(l.weight_shape));
    for (const int64_t d : l.weight_shape) {
      TORCH_CHECK_VALUE(d >= 1, "torchlora: AdapterPool: target layer '", l.name, "' has weight shape ",
                        shape_str(l.weight_shape));
    }
    TORCH_CHECK_VALUE(l.groups >= 1 && (l.groups == 1 || l.kind == io::LoraKind::Conv2d),
                      "torchlora: AdapterPool: target layer '", l.name, "': groups must be 1 (or >= 1 for conv2d), got ",
                      l.groups);
    TORCH_CHECK_VALUE(!l.base_weight.defined() || l.base_weight.sizes().vec() == l.weight_shape,
                      "torchlora: AdapterPool: target layer '", l.name, "': base_weight has shape ",
                      l.base_weight.sizes(), " but weight_shape is ", shape_str(l.weight_shape));
    TORCH_CHECK_VALUE(o.max_lora_rank % l.groups == 0, "torchlora: AdapterPool: max_lora_rank (", o.max_lora_rank,
                      ") must be a multiple of groups (", l.groups, ") of conv2d layer '", l.name, "'");
  }
}

int64_t check_adapter(const std::string& name, const io::PeftAdapter& adapter, const std::vector<TargetLayer>& layers,
                      const std::map<std::string, size_t>& layer_index, const PoolOptions& options) {
  const auto& config = adapter.config;
  bool rewritten = false;
  try {
    rewritten = io::applies_to_rewritten_base_weights(config, "adapter '" + name + "'");
  } catch (const c10::Error& e) {
    reject(name, std::string("cannot be served: ") + e.what_without_backtrace());
  }
  if (rewritten) {
    reject(name, "was saved relative to base weights its initialisation rewrote (init_lora_weights=\"" +
                     config.init_lora_weights +
                     "\"); convert it to a plain LoRA adapter first (PEFT: save_pretrained(..., "
                     "path_initial_model_for_weight_conversion=...), or torchlora's adapter_for_original_weights)");
  }
  if (io::uses_trainable_tokens(config)) {
    reject(name, "uses trainable_token_indices (embedding rows replaced per adapter), which the adapter pool "
                 "cannot share between requests: load it into a model (C++ modules or Python) instead");
  }
  if (!io::target_parameters(config).empty()) {
    reject(name, "uses target_parameters (LoRA on nn.Parameters such as MoE expert weights), which the adapter pool "
                 "has no slots for: merge it into the parameters (io::merge_parameter_adapters) instead");
  }
  for (const auto& [key, tensor] : adapter.other_tensors) {
    if (key.ends_with(".base_layer.weight") && layer_index.count(key.substr(0, key.size() - 18))) {
      reject(name, "holds the base weight '" + key +
                       "' (PEFT saves embedding layers' base weights with save_embedding_layers=True); the pool "
                       "serves adapters over one shared base model: save it with save_embedding_layers=False");
    }
  }
  if (!adapter.other_tensors.empty()) {
    reject(name, "holds " + std::to_string(adapter.other_tensors.size()) + " tensors that are not LoRA factors (e.g. '" +
                     adapter.other_tensors.begin()->first +
                     "', from modules_to_save or bias), which the adapter pool cannot share between requests");
  }
  if (adapter.modules.empty()) {
    reject(name, "adapts no module");
  }
  int64_t max_rank = 0;
  for (const auto& [path, w] : adapter.modules) {
    const auto it = layer_index.find(path);
    if (it == layer_index.end()) {
      reject(name, "adapts module '" + path + "', which is not a LoRA target layer of the served model (targets: " +
                       some_targets(layers) + ")");
    }
    const TargetLayer& layer = layers[it->second];
    const std::string where = "module '" + path + "'";
    if (w.kind != layer.kind) {
      reject(name, "has " + kind_name(w.kind) + " factors for " + where + ", which is a " + kind_name(layer.kind) +
                       " layer");
    }
    const int64_t r = w.rank();
    if (r > options.max_lora_rank) {
      reject(name, "has rank " + std::to_string(r) + " at " + where + ", above the pool's max_lora_rank " +
                       std::to_string(options.max_lora_rank));
    }
    if (r % layer.groups != 0) {
      reject(name, "has rank " + std::to_string(r) + " at " + where + ", not a multiple of its groups (" +
                       std::to_string(layer.groups) + ")");
    }
    const auto a = w.lora_A.sizes().vec();
    const auto b = w.lora_B.sizes().vec();
    if (a != expected_a(layer, r) || b != expected_b(layer, r)) {
      reject(name, "has lora_A " + shape_str(a) + " and lora_B " + shape_str(b) + " at " + where +
                       ", but its base weight " + shape_str(layer.weight_shape) + " needs lora_A " +
                       shape_str(expected_a(layer, r)) + " and lora_B " + shape_str(expected_b(layer, r)));
    }
    if (w.lora_bias.defined()) {
      if (!options.lora_bias) {
        reject(name, "has lora_bias (at " + where + "), but the pool was made without lora_bias");
      }
      const int64_t out = layer.weight_shape[layer.kind == io::LoraKind::Embedding ? 1 : 0];
      if (w.lora_bias.dim() != 1 || w.lora_bias.size(0) != out) {
        reject(name, "has lora_bias " + shape_str(w.lora_bias.sizes().vec()) + " at " + where + ", expected [" +
                         std::to_string(out) + "]");
      }
    }
    if (config.use_dora) {
      if (!layer.base_weight.defined()) {
        reject(name, "uses DoRA (use_dora=true), whose weight norm needs the base weight of " + where +
                         ", which the pool's target layer does not hold: pools made from serve::target_layers(root) "
                         "(C++ modules) serve DoRA; ExportedModel (AOTInductor) pools and target layers given without "
                         "base_weight do not");
      }
      if (layer.groups != 1) {
        reject(name, "uses DoRA at " + where + ", a conv2d layer with groups=" + std::to_string(layer.groups) +
                         ", which DoRA does not support");
      }
    }
    max_rank = std::max(max_rank, r);
  }
  return max_rank;
}

}  // namespace torchlora::serve::detail
