// PEFT's key of trainable token rows (LoraConfig.trainable_token_indices): the one definition
// for C++ and Python (torchlora._C.peft.TRAINABLE_TOKENS_DELTA).
#pragma once

namespace torchlora::peft {

// "<embedding path>.token_adapter.trainable_tokens_delta.<adapter>" in a model,
// "base_model.model.<embedding path>.token_adapter.trainable_tokens_delta" in a file. The tensor
// holds the new values of the chosen rows, [len(indices), embedding_dim], in index order.
inline constexpr const char* kTrainableTokensDelta = "token_adapter.trainable_tokens_delta";

}  // namespace torchlora::peft
