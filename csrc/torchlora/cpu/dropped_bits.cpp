#include "dropped_bits.h"

#include "../detail/philox_dropout.h"
#include "isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 shift intrinsics pass an "undefined" vector that -Wuninitialized flags.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#define TORCHLORA_X86_SIMD 1
#endif

namespace torchlora::cpu {
namespace {

using detail::kPhiloxMultiplier0;
using detail::kPhiloxMultiplier1;
using detail::kPhiloxRounds;
using detail::kPhiloxWeyl0;
using detail::kPhiloxWeyl1;

// Bits of the 64 elements of quads q0 .. q0 + 15 (bit 4j + lane = element 4 (q0 + j) + lane).
uint64_t dropped_word_scalar(uint64_t q0, uint64_t key, uint32_t threshold) {
  uint64_t word = 0;
  for (int j = 0; j < 16; ++j) {
    const uint32_t keep = detail::keep_bits4(key, q0 + static_cast<uint64_t>(j), threshold);
    word |= static_cast<uint64_t>(~keep & 0xFu) << (4 * j);
  }
  return word;
}

#ifdef TORCHLORA_X86_SIMD
// Spreads bit j of m (j < 16) to bit 4j + lane.
__attribute__((target("bmi2"))) inline uint64_t spread4(uint32_t m, int lane) {
  return _pdep_u64(m, 0x1111111111111111ull << lane);
}

__attribute__((target("avx512f,bmi2"))) inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Words w .. w + N - 1 (quads 16 w ..) into out[0 .. N): N independent 16-lane Philox chains
// interleaved, so that one chain's multiplies run while another's wait on theirs (one chain
// at a time is bound by the rounds' latency).
template <int N>
__attribute__((target("avx512f,bmi2"))) inline void dropped_words_avx512(uint64_t* out, uint64_t w, uint64_t key,
                                                                       uint32_t threshold) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxMultiplier0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxMultiplier1));
  __m512i c0[N], c1[N], c2[N], c3[N];
  TORCHLORA_UNROLLED
  for (int n = 0; n < N; ++n) {
    const uint64_t q0 = 16 * (w + static_cast<uint64_t>(n));
    const __m512i lo_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0)));
    const __m512i hi_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0 >> 32)));
    c0[n] = _mm512_add_epi32(lo_base, lanes);
    c1[n] = _mm512_mask_add_epi32(hi_base, _mm512_cmplt_epu32_mask(c0[n], lo_base), hi_base, _mm512_set1_epi32(1));
    c2[n] = c3[n] = _mm512_setzero_si512();
  }
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  TORCHLORA_UNROLLED
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    TORCHLORA_UNROLLED
  for (int n = 0; n < N; ++n) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0[n], m0, hi0, lo0);
      mulhilo16(c2[n], m1, hi1, lo1);
      c0[n] = _mm512_ternarylogic_epi32(hi1, c1[n], key0, 0x96);  // three-way xor
      c2[n] = _mm512_ternarylogic_epi32(hi0, c3[n], key1, 0x96);
      c1[n] = lo1;
      c3[n] = lo0;
    }
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  const __m512i t = _mm512_set1_epi32(static_cast<int>(threshold));
  TORCHLORA_UNROLLED
  for (int n = 0; n < N; ++n) {
    out[n] = spread4(_mm512_cmplt_epu32_mask(c0[n], t), 0) | spread4(_mm512_cmplt_epu32_mask(c1[n], t), 1) |
             spread4(_mm512_cmplt_epu32_mask(c2[n], t), 2) | spread4(_mm512_cmplt_epu32_mask(c3[n], t), 3);
  }
}

__attribute__((target("avx512f,bmi2"))) void fill_words_avx512(uint64_t* out, int64_t w0, int64_t w1, uint64_t key,
                                                              uint32_t threshold) {
  constexpr int kChains = 4;
  int64_t w = w0;
  for (; w + kChains <= w1; w += kChains) {
    dropped_words_avx512<kChains>(out + (w - w0), static_cast<uint64_t>(w), key, threshold);
  }
  for (; w < w1; ++w) dropped_words_avx512<1>(out + (w - w0), static_cast<uint64_t>(w), key, threshold);
}

__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Bits (as above) of the 32 elements of quads q0 .. q0 + 7.
__attribute__((target("avx2,bmi2"))) uint32_t dropped_half_word_avx2(uint64_t q0, uint64_t key, uint32_t threshold) {
  alignas(32) uint32_t lo_words[8], hi_words[8];
  for (int j = 0; j < 8; ++j) {
    const uint64_t q = q0 + static_cast<uint64_t>(j);
    lo_words[j] = static_cast<uint32_t>(q);
    hi_words[j] = static_cast<uint32_t>(q >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_words));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_words));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxMultiplier0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxMultiplier1));
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  const __m256i t = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256i words[4] = {c0, c1, c2, c3};
  uint64_t out = 0;
  for (int lane = 0; lane < 4; ++lane) {
    // kept <=> max(word, threshold) == word (unsigned)
    const __m256i kept = _mm256_cmpeq_epi32(_mm256_max_epu32(words[lane], t), words[lane]);
    const uint32_t dropped = ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(kept))) & 0xFFu;
    out |= _pdep_u64(dropped, 0x11111111ull << lane);
  }
  return static_cast<uint32_t>(out);
}

__attribute__((target("avx2,bmi2"))) uint64_t dropped_word_avx2(uint64_t q0, uint64_t key, uint32_t threshold) {
  return static_cast<uint64_t>(dropped_half_word_avx2(q0, key, threshold)) |
         (static_cast<uint64_t>(dropped_half_word_avx2(q0 + 8, key, threshold)) << 32);
}
#endif

using DroppedWordFn = uint64_t (*)(uint64_t, uint64_t, uint32_t);

DroppedWordFn dropped_word() {
#ifdef TORCHLORA_X86_SIMD
  if (cpu_isa() == Isa::kAvx2) return &dropped_word_avx2;
#endif
  return &dropped_word_scalar;
}

}  // namespace

void fill_dropped_words(uint64_t* out, int64_t w0, int64_t w1, int64_t count, uint64_t key, uint32_t threshold) {
#ifdef TORCHLORA_X86_SIMD
  if (cpu_isa() >= Isa::kAvx512) {
    fill_words_avx512(out, w0, w1, key, threshold);
  } else
#endif
  {
    const DroppedWordFn word = dropped_word();
    for (int64_t w = w0; w < w1; ++w) out[w - w0] = word(16 * static_cast<uint64_t>(w), key, threshold);
  }
  const int tail = static_cast<int>(count & 63);
  if (tail != 0 && w1 == dropped_words(count) && w1 > w0) out[w1 - 1 - w0] &= (uint64_t{1} << tail) - 1;
}

}  // namespace torchlora::cpu
