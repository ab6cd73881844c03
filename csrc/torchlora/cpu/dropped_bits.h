// Which elements torchlora's dropout drops, as packed bits (the format of
// detail/dropped_bits_format.h): the same Philox-4x32-10 draws as detail::keep_element (and
// so as the CUDA kernels and dropout_apply), made 16 counters (64 elements, one word) at a
// time with AVX-512 (8 with AVX2) where the CPU has it.
#pragma once

#include <cstdint>

#include "../detail/dropped_bits_format.h"

namespace torchlora::cpu {

using detail::dropped_words;

// Words [w0, w1) of the stream of a `count`-element tensor into out[0 .. w1 - w0) (bits past
// count are clear).
void fill_dropped_words(uint64_t* out, int64_t w0, int64_t w1, int64_t count, uint64_t key, uint32_t threshold);

// The 16 bits of elements e .. e + 15 (bit i = element e + i); words past n_words read as 0.
inline uint32_t dropped16(const uint64_t* words, int64_t n_words, int64_t e) {
  const int64_t w = e >> 6;
  const int shift = static_cast<int>(e & 63);
  uint64_t v = words[w] >> shift;
  if (shift > 48 && w + 1 < n_words) v |= words[w + 1] << (64 - shift);
  return static_cast<uint32_t>(v & 0xFFFFu);
}

// Calls fn(e - begin) for every set bit e in [begin, end), in increasing order.
template <typename Fn>
inline void for_each_dropped_in(const uint64_t* words, int64_t begin, int64_t end, Fn&& fn) {
  for (int64_t w = begin >> 6; w * 64 < end; ++w) {
    uint64_t bits = words[w];
    const int64_t first = w * 64;
    if (first < begin) bits &= ~uint64_t{0} << (begin - first);
    if (end - first < 64) bits &= (uint64_t{1} << (end - first)) - 1;
    while (bits != 0) {
      fn(first + __builtin_ctzll(bits) - begin);
      bits &= bits - 1;
    }
  }
}

}  // namespace torchlora::cpu
