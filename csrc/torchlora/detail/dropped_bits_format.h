// The dropout mask as packed bits ("dropped bits"): what _linear_with_lora_forward keeps for
// its backward and what the CPU kernels read. One bit stream over the row-major elements of
// x's [T, in] view: bit e % 64 of (little-endian, int64-stored) word e / 64 is set when
// element e is dropped, that is when its Philox draw (philox_dropout.h) is below
// dropout_threshold(p); the bits past the last element are clear.
#pragma once

#include <cstdint>

namespace torchlora::detail {

inline constexpr int64_t kDroppedBitsPerWord = 64;

// Words holding the bits of `count` elements (int64_t, or c10::SymInt for the Meta kernels).
template <typename Count>
Count dropped_words(const Count& count) {
  return (count + (kDroppedBitsPerWord - 1)) / kDroppedBitsPerWord;
}

}  // namespace torchlora::detail
