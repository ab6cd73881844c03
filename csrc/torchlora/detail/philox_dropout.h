// The dropout mask of torchlora, shared by the CPU and CUDA kernels so that both draw the
// same mask: element i (row-major index over the logical shape) is kept when the Philox-4x32-10
// draw for counter i / 4, lane i % 4, keyed by the seed, is at least p * 2^32.
// Counter-based: backward regenerates the mask from (seed, i) instead of storing it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TORCHLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TORCHLORA_HOST_DEVICE inline
#endif

namespace torchlora::detail {

// The Philox-4x32 round constants (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", and Random123): the two multipliers of the rounds and the two Weyl increments of the
// key. Every implementation of the mask (scalar, AVX2, AVX-512, CUDA) uses these.
inline constexpr uint32_t kPhiloxMultiplier0 = 0xD2511F53u;
inline constexpr uint32_t kPhiloxMultiplier1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u;
inline constexpr uint32_t kPhiloxWeyl1 = 0xBB67AE85u;
inline constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t v[4];
};

TORCHLORA_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
TORCHLORA_HOST_DEVICE Philox4 philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxMultiplier0, c0, hi0, lo0);
    mulhilo32(kPhiloxMultiplier1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxWeyl0;
    k1 += kPhiloxWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// p * 2^32 rounded, as the threshold a uniform uint32 draw must reach to be kept.
inline uint64_t dropout_threshold(double p) {
  return static_cast<uint64_t>(p * 4294967296.0);
}

// Keeps of elements 4q .. 4q+3 as four bits (bit j = element 4q + j).
TORCHLORA_HOST_DEVICE uint32_t keep_bits4(uint64_t seed, uint64_t quad, uint64_t threshold) {
  const Philox4 r = philox4x32_10(quad, seed);
  return (r.v[0] >= threshold ? 1u : 0u) | (r.v[1] >= threshold ? 2u : 0u) |
         (r.v[2] >= threshold ? 4u : 0u) | (r.v[3] >= threshold ? 8u : 0u);
}

TORCHLORA_HOST_DEVICE bool keep_element(uint64_t seed, uint64_t index, uint64_t threshold) {
  return (keep_bits4(seed, index >> 2, threshold) >> (index & 3u)) & 1u;
}

}  // namespace torchlora::detail
