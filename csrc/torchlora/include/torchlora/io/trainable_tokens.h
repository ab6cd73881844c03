// Trainable token rows of a PEFT adapter (LoraConfig.trainable_token_indices): the chosen rows
// of an embedding, trained and saved instead of the whole layer, read from a PeftAdapter.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/peft/trainable_tokens_keys.h>

namespace torchlora::io {

// New values of some rows of one embedding weight: values[i] replaces row indices[i].
struct TrainableTokenRows {
  std::vector<int64_t> indices;
  at::Tensor values;  // [indices.size(), embedding_dim]
};

// Whether adapter_config.json sets trainable_token_indices.
TORCHLORA_API bool uses_trainable_tokens(const LoraConfig& config);

// Whether a key of PeftAdapter::other_tensors ("<path>.token_adapter.trainable_tokens_delta")
// holds trainable token rows; `module_path` receives <path>.
TORCHLORA_API bool is_trainable_tokens_key(const std::string& key, std::string* module_path = nullptr);

// The adapter's rows by embedding path: the tensors of `is_trainable_tokens_key` with their
// indices from the config (a list: the input embedding's; a dict: the entry whose module name
// the path ends with, as PEFT matches it). Raises c10::ValueError naming `source` when the file
// and the config disagree (rows without indices or the reverse, counts, a tensor that is not
// [len(indices), dim] floating point).
TORCHLORA_API std::map<std::string, TrainableTokenRows> trainable_token_rows(const PeftAdapter& adapter,
                                                                             const std::string& source);

// `weight` ([num_embeddings, dim], or a tied output layer's [vocab, dim]) with the rows
// replaced, as PEFT merges them (index_copy, in the weight's dtype). Raises c10::ValueError
// naming `where` for an index out of range or a width that differs.
TORCHLORA_API at::Tensor with_trainable_tokens(const at::Tensor& weight, const TrainableTokenRows& rows,
                                               const std::string& where);

}  // namespace torchlora::io
