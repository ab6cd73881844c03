// A LoRA adapter as PEFT saves it (adapter_config.json + adapter_model.safetensors), mapped
// from PEFT's tensor keys to module paths of the base model.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

#include <torchlora/export.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/peft/keys.h>

namespace torchlora::io {

enum class LoraKind { Linear, Embedding, Conv2d };

// One adapted module. Shapes (PEFT's):
//   Linear     lora_A [r, in]           lora_B [out, r]                 lora_bias [out]
//   Embedding  lora_A [r, num_emb]      lora_B [dim, r]
//   Conv2d     lora_A [r, in, kh, kw]   lora_B [out, r / groups, 1, 1]  lora_bias [out]
// DoRA (use_dora): magnitude [out] for Linear, [dim] for Embedding, [1, out, 1, 1] for Conv2d.
struct LoraModuleWeights {
  LoraKind kind = LoraKind::Linear;
  at::Tensor lora_A;
  at::Tensor lora_B;
  at::Tensor lora_bias;  // undefined unless the adapter has lora_bias
  at::Tensor magnitude;  // undefined unless the adapter uses DoRA
  double scaling = 1.0;  // from the config (rank_pattern / alpha_pattern / use_rslora applied)
  int64_t rank() const { return lora_A.size(0); }
};

struct PeftAdapter {
  LoraConfig config;
  // Module path in the base model (PEFT's key without "base_model.model." and the suffix).
  std::map<std::string, LoraModuleWeights> modules;
  // Tensors that are not LoRA factors (modules_to_save copies), by parameter path.
  std::map<std::string, at::Tensor> other_tensors;
};

using peft::kPeftKeyPrefix;

// Every tensor of a saved adapter: floating point and finite; raises c10::ValueError naming
// `source` and `key`. (Python's loader applies this very check.)
TORCHLORA_API void check_adapter_tensor(const at::Tensor& tensor, const std::string& key, const std::string& source);

// Groups a PEFT state dict ("base_model.model.<path>.lora_A.weight", ...) by module and
// checks it: both factors present, ranks and shapes consistent with each other and with the
// config, floating dtypes; with config.use_dora a finite "<path>.lora_magnitude_vector" of the
// module's output size for every module (and none without it). `source` names the file in errors.
TORCHLORA_API PeftAdapter adapter_from_state_dict(
    LoraConfig config, const std::map<std::string, at::Tensor>& state_dict, const std::string& source);

// The inverse: PEFT's keys and tensors.
TORCHLORA_API std::map<std::string, at::Tensor> adapter_state_dict(const PeftAdapter& adapter);

// The change an adapted module makes to its base weight, in the base weight's layout
// ([out, in], [num_emb, dim] for embeddings, [out, in, kh, kw]); `fan_in_fan_out` transposes
// it for weights stored [in, out] (transformers Conv1D). torchlora::lora_delta_weight, returned
// in float32 at least so that merging into a weight of any dtype rounds once.
TORCHLORA_API at::Tensor delta_weight(const LoraModuleWeights& weights, bool fan_in_fan_out = false);
// scaling * lora_bias, or an undefined tensor.
TORCHLORA_API at::Tensor delta_bias(const LoraModuleWeights& weights);

// Reads <dir>/adapter_config.json and <dir>/adapter_model.safetensors. Rejects adapters whose
// initialisation rewrote the base weights in a way that cannot be recomputed ("pissa_niter_<K>",
// see io/weight_conversion.h); PiSSA / OLoRA ones load as saved (convert them to apply them).
TORCHLORA_API PeftAdapter load_peft_adapter(const std::string& dir);
// Writes both files into `dir` (created if missing).
TORCHLORA_API void save_peft_adapter(const std::string& dir, const PeftAdapter& adapter);

}  // namespace torchlora::io
