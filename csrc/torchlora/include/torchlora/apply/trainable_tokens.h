// Trainable token rows (LoraConfig.trainable_token_indices) on a C++ module tree.
#pragma once

#include <torch/nn/module.h>

#include <map>
#include <string>

#include <torchlora/export.h>
#include <torchlora/io/trainable_tokens.h>

namespace torchlora::apply {

// Replaces the rows in the weights of the modules at the given paths of `root` (Embedding,
// LoraEmbedding, or a Linear / LoraLinear output layer), as PEFT merges trainable tokens: the
// module then computes with the adapter's rows whatever adapter is active. Every path is
// checked before anything is written; raises c10::ValueError naming the module otherwise.
TORCHLORA_API void write_trainable_tokens(torch::nn::Module& root,
                                          const std::map<std::string, io::TrainableTokenRows>& rows);

}  // namespace torchlora::apply
