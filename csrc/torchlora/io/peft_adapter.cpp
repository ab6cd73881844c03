// PEFT state dicts <-> per-module LoRA weights, and the deltas they make to base weights.
#include <torchlora/io/peft_adapter.h>

#include <ATen/ops/all.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/Exception.h>

#include <sstream>

#include <torchlora/io/parameter_adapters.h>
#include <torchlora/io/trainable_tokens.h>
#include <torchlora/ops.h>

namespace torchlora::io {
namespace {

// Positions in peft::kLoraTensorNames.
enum Role { kA = 0, kB = 1, kBias = 2, kEmbA = 3, kEmbB = 4, kMagnitude = 5 };
static_assert(peft::kLoraTensorNames.size() == 6);

struct Parts {
  at::Tensor A, B, bias, magnitude;
  bool embedding = false;
  bool other_kind = false;
  std::string a_key, b_key, magnitude_key;
};

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_float(const at::Tensor& t, const std::string& source, const std::string& key) {
  check_adapter_tensor(t, key, source);
}

// DoRA's magnitude: one value per output feature, in PEFT's shape for the module's kind.
void check_magnitude(const LoraConfig& config, const std::string& path, const Parts& p, LoraModuleWeights& w,
                     const std::string& source) {
  const std::string key = kPeftKeyPrefix + path + "." + peft::kLoraTensorNames[kMagnitude];
  if (!config.use_dora) {
    TORCH_CHECK_VALUE(!p.magnitude.defined(), "torchlora: ", source, ": '", key,
                      "' is a DoRA magnitude vector but adapter_config.json has use_dora=false");
    return;
  }
  TORCH_CHECK_VALUE(p.magnitude.defined(), "torchlora: ", source, ": module '", path, "' has no '", key,
                    "', which adapter_config.json's use_dora=true needs for every module");
  check_float(p.magnitude, source, key);
  const int64_t out = p.B.size(0);
  const bool conv = w.kind == LoraKind::Conv2d;
  const bool shape_ok = conv ? (p.magnitude.dim() == 4 && p.magnitude.size(0) == 1 && p.magnitude.size(1) == out &&
                                p.magnitude.size(2) == 1 && p.magnitude.size(3) == 1)
                             : (p.magnitude.dim() == 1 && p.magnitude.size(0) == out);
  TORCH_CHECK_VALUE(shape_ok, "torchlora: ", source, ": '", key, "' must have shape ",
                    conv ? "[1, " + std::to_string(out) + ", 1, 1]" : "[" + std::to_string(out) + "]",
                    " (one value per output feature of module '", path, "'), got ", shape_str(p.magnitude));
  w.magnitude = p.magnitude;
}

LoraModuleWeights check_module(const LoraConfig& config, const std::string& path, const Parts& p,
                               const std::string& source) {
  // PEFT's MultiheadAttention adapters keep out_proj's factors under "<mha>.base_layer.out_proj"
  // (nested target_parameters wrappers end in ".base_layer" instead, and are read)
  const bool mha_out_proj = path == "base_layer.out_proj" || path.ends_with(".base_layer.out_proj");
  TORCH_CHECK_NOT_IMPLEMENTED(!mha_out_proj, "torchlora: ", source, ": module '", path,
                              "' is the out_proj inside a LoRA layer's base_layer, as PEFT writes MultiheadAttention "
                              "adapters; the C++ loader does not support MultiheadAttention adapters");
  TORCH_CHECK_VALUE(p.A.defined() || p.B.defined(), "torchlora: ", source, ": module '", path,
                    "' has a lora_magnitude_vector but no LoRA factors");
  TORCH_CHECK_VALUE(!p.other_kind, "torchlora: ", source, ": module '", path,
              "' mixes lora_A/lora_B with lora_embedding_A/lora_embedding_B keys");
  const char* a_name = p.embedding ? "lora_embedding_A" : "lora_A.weight";
  const char* b_name = p.embedding ? "lora_embedding_B" : "lora_B.weight";
  TORCH_CHECK_VALUE(p.A.defined(), "torchlora: ", source, ": module '", path, "' has ", b_name, " but no ", a_name);
  TORCH_CHECK_VALUE(p.B.defined(), "torchlora: ", source, ": module '", path, "' has ", a_name, " but no ", b_name);
  check_float(p.A, source, p.a_key);
  check_float(p.B, source, p.b_key);
  TORCH_CHECK_VALUE(p.A.scalar_type() == p.B.scalar_type(), "torchlora: ", source, ": module '", path, "': ", a_name,
              " is ", p.A.scalar_type(), " but ", b_name, " is ", p.B.scalar_type());

  LoraModuleWeights w;
  w.lora_A = p.A;
  w.lora_B = p.B;
  const int64_t r = p.A.dim() > 0 ? p.A.size(0) : 0;
  if (p.embedding) {
    w.kind = LoraKind::Embedding;
    TORCH_CHECK_VALUE(p.A.dim() == 2 && p.B.dim() == 2 && p.B.size(1) == r, "torchlora: ", source, ": module '", path,
                "': embedding factors must be lora_embedding_A [r, num_embeddings] and lora_embedding_B "
                "[embedding_dim, r], got ", shape_str(p.A), " and ", shape_str(p.B));
  } else if (p.A.dim() == 2) {
    w.kind = LoraKind::Linear;
    TORCH_CHECK_VALUE(p.B.dim() == 2 && p.B.size(1) == r, "torchlora: ", source, ": module '", path,
                "': linear factors must be lora_A [r, in] and lora_B [out, r], got ", shape_str(p.A), " and ",
                shape_str(p.B));
  } else if (p.A.dim() == 4) {
    w.kind = LoraKind::Conv2d;
    TORCH_CHECK_VALUE(p.B.dim() == 4 && p.B.size(2) == 1 && p.B.size(3) == 1 && p.B.size(1) > 0 && r % p.B.size(1) == 0,
                "torchlora: ", source, ": module '", path,
                "': conv factors must be lora_A [r, in, kh, kw] and lora_B [out, r / groups, 1, 1], got ",
                shape_str(p.A), " and ", shape_str(p.B));
  } else if (p.A.dim() == 3 || p.A.dim() == 5) {
    // PEFT writes these for nn.Conv1d / nn.Conv3d, which the C++ modules do not wrap (Python does)
    TORCH_CHECK_NOT_IMPLEMENTED(false, "torchlora: ", source, ": module '", path, "' is a ",
                                p.A.dim() == 3 ? "Conv1d" : "Conv3d", " adapter (lora_A ", shape_str(p.A),
                                "); the C++ loader supports Linear, Embedding and Conv2d adapters only");
  } else {
    TORCH_CHECK_VALUE(false, "torchlora: ", source, ": module '", path, "': lora_A must have 2 or 4 dimensions, got ",
                shape_str(p.A));
  }
  const int64_t expected_r = config.rank_for(path);
  // target_parameters factors hold r rows per expert; io::parameter_adapters checks them against the parameter
  const bool expert_factors = w.kind == LoraKind::Linear && r % expected_r == 0 && !target_parameters(config).empty();
  TORCH_CHECK_VALUE(r == expected_r || expert_factors, "torchlora: ", source, ": module '", path, "' has rank ", r,
              " but adapter_config.json gives it r=", expected_r);
  if (p.bias.defined()) {
    check_float(p.bias, source, kPeftKeyPrefix + path + ".lora_B.bias");
    TORCH_CHECK_VALUE(!p.embedding, "torchlora: ", source, ": module '", path, "': embeddings have no lora_B.bias");
    TORCH_CHECK_VALUE(p.bias.dim() == 1 && p.bias.size(0) == p.B.size(0), "torchlora: ", source, ": module '", path,
                "': lora_B.bias must be [", p.B.size(0), "], got ", shape_str(p.bias));
    w.lora_bias = p.bias;
  }
  check_magnitude(config, path, p, w, source);
  w.scaling = config.scaling_for(path);
  return w;
}

}  // namespace

void check_adapter_tensor(const at::Tensor& t, const std::string& key, const std::string& source) {
  TORCH_CHECK_VALUE(t.defined(), source, ": tensor '", key, "' is undefined");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), source, ": key '", key, "' has dtype ", t.scalar_type(),
                    ", expected a floating point tensor");
  TORCH_CHECK_VALUE(at::isfinite(t).all().item<bool>(), source, ": key '", key, "' holds non-finite values");
}

PeftAdapter adapter_from_state_dict(LoraConfig config, const std::map<std::string, at::Tensor>& state_dict,
                                    const std::string& source) {
  config.validate();
  std::map<std::string, Parts> parts;
  PeftAdapter adapter;
  const std::string prefix = kPeftKeyPrefix;
  for (const auto& [key, tensor] : state_dict) {
    TORCH_CHECK_VALUE(tensor.defined(), "torchlora: ", source, ": tensor '", key, "' is undefined");
    const std::string rel = key.starts_with(prefix) ? key.substr(prefix.size()) : key;
    std::string path;
    const int role = peft::split_lora_key(rel, &path);  // index into peft::kLoraTensorNames
    if (role < 0 || path.empty()) {
      adapter.other_tensors.emplace(rel, tensor);
      continue;
    }
    auto& p = parts[path];
    if (role == kMagnitude) {
      p.magnitude = tensor;
      p.magnitude_key = key;
      continue;
    }
    const bool is_embedding_key = role == kEmbA || role == kEmbB;
    if (p.A.defined() || p.B.defined() || p.bias.defined()) {
      p.other_kind = p.other_kind || (is_embedding_key != p.embedding);
    }
    p.embedding = is_embedding_key;
    switch (role) {
      case kA: case kEmbA: p.A = tensor; p.a_key = key; break;
      case kB: case kEmbB: p.B = tensor; p.b_key = key; break;
      case kBias: p.bias = tensor; break;
    }
  }
  TORCH_CHECK_VALUE(!parts.empty(), "torchlora: ", source, ": no LoRA tensors (keys ending in .lora_A.weight, "
              ".lora_B.weight, .lora_embedding_A, .lora_embedding_B) found");
  for (const auto& [path, p] : parts) {
    adapter.modules.emplace(path, check_module(config, path, p, source));
  }
  adapter.config = std::move(config);
  trainable_token_rows(adapter, source);  // the rows in the file and trainable_token_indices must agree
  return adapter;
}

std::map<std::string, at::Tensor> adapter_state_dict(const PeftAdapter& adapter) {
  std::map<std::string, at::Tensor> out;
  const std::string prefix = kPeftKeyPrefix;
  for (const auto& [path, w] : adapter.modules) {
    const bool emb = w.kind == LoraKind::Embedding;
    const auto key = [&](int role) { return prefix + path + "." + peft::kLoraTensorNames[role]; };
    out[key(emb ? kEmbA : kA)] = w.lora_A;
    out[key(emb ? kEmbB : kB)] = w.lora_B;
    if (w.lora_bias.defined()) {
      out[key(kBias)] = w.lora_bias;
    }
    if (w.magnitude.defined()) {
      out[key(kMagnitude)] = w.magnitude;
    }
  }
  for (const auto& [path, t] : adapter.other_tensors) {
    out[prefix + path] = t;
  }
  return out;
}

at::Tensor delta_weight(const LoraModuleWeights& w, bool fan_in_fan_out) {
  // PEFT's fan_in_fan_out transposes Linear deltas only; embedding weights are stored [in, out].
  const bool transposed = w.kind == LoraKind::Embedding || (w.kind == LoraKind::Linear && fan_in_fan_out);
  // Kept in float32 for half-precision adapters: the caller merges into a weight of any dtype
  // and rounds once.
  return torchlora::lora_delta_weight(w.lora_A, w.lora_B, w.scaling, transposed,
                                      c10::promoteTypes(w.lora_A.scalar_type(), at::kFloat));
}

at::Tensor delta_bias(const LoraModuleWeights& w) {
  if (!w.lora_bias.defined()) {
    return {};
  }
  return w.lora_bias.to(c10::promoteTypes(w.lora_bias.scalar_type(), at::kFloat)).mul(w.scaling);
}

}  // namespace torchlora::io
