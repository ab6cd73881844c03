#include "masked_lowrank.h"

#include "isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 intrinsics pass "undefined" vectors that its uninitialised-use warnings flag.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TORCHLORA_MASKED_AVX512 1
#define TORCHLORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

#include <c10/util/Exception.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace torchlora::cpu::masked {

#ifdef TORCHLORA_MASKED_AVX512
namespace {

// The mask's Bits bits from element e on, e a multiple of Bits: one load of the little-endian
// words (rows whose width is a multiple of Bits start on such an element).
template <typename Bits>
inline Bits aligned_bits(const Mask& mask, int64_t e) {
  Bits v;
  std::memcpy(&v, reinterpret_cast<const char*>(mask.words) + e / 8, sizeof(Bits));
  return v;
}

// Keep lanes of the 16 columns starting at 16 * chunk of row t (valid columns only).
inline __mmask16 keep_lanes(const Mask& mask, int64_t t, int64_t chunk, int64_t in) {
  const int64_t valid = in - 16 * chunk;
  if (valid <= 0) return 0;
  const uint32_t lanes = valid >= 16 ? 0xFFFFu : ((1u << valid) - 1u);
  if (mask.words == nullptr) return static_cast<__mmask16>(lanes);
  if (in % 16 == 0) return static_cast<__mmask16>(~aligned_bits<uint16_t>(mask, t * in + 16 * chunk));
  const uint32_t dropped = dropped16(mask.words, mask.n_words, t * in + 16 * chunk);
  return static_cast<__mmask16>(~dropped & lanes);
}

// keep_lanes of rows [t0, t0 + rows) x chunks [0, chunks) into lanes (row-major), once for all
// the register tiles that sweep those rows.
inline void fill_lanes(__mmask16* lanes, const Mask& mask, int64_t t0, int64_t rows, int64_t chunks, int64_t in) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < chunks; ++c) lanes[i * chunks + c] = keep_lanes(mask, t0 + i, c, in);
  }
}

// Lane k of the result = the sum of the 16 lanes of v[k]: a transpose-and-add tree
// (halves, then quarters, then pairs within 128-bit lanes) instead of 16 horizontal sums.
TORCHLORA_AVX512 inline __m512 sum_each(const __m512 (&v)[16]) {
  __m512 halves[8], quarters[4], pairs[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: [v[2i] partials x 8 | v[2i+1] partials x 8]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: v[4i], v[4i+1], v[4i+2], v[4i+3], 4 partials each
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // lane L: v[8i + L], v[8i + 4 + L], 2 partials each
    pairs[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0xEE));
  }
  // lane L, position p: the sum of v[L + 4p]
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], 0x88),
                                    _mm512_shuffle_ps(pairs[0], pairs[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// 16 elements of a row as float32, zero where a lane is off.
TORCHLORA_AVX512 inline __m512 load_lanes(const float* p, __mmask16 lanes) {
  return _mm512_maskz_loadu_ps(lanes, p);
}
TORCHLORA_AVX512 inline __m512 load_lanes(const c10::BFloat16* p, __mmask16 lanes) {
  const __m256i h = _mm256_maskz_loadu_epi16(lanes, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bfloat16 is float32's high half
}
TORCHLORA_AVX512 inline __m512 load_lanes(const c10::Half* p, __mmask16 lanes) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, p));
}
TORCHLORA_AVX512 inline __m512 load_whole(const float* p) {
  return _mm512_loadu_ps(p);
}
TORCHLORA_AVX512 inline __m512 load_whole(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
TORCHLORA_AVX512 inline __m512 load_whole(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Stores the lanes of v rounded to the row's type (to nearest even, as c10's conversions).
TORCHLORA_AVX512 inline void store_lanes(float* p, __mmask16 lanes, __m512 v) {
  _mm512_mask_storeu_ps(p, lanes, v);
}
TORCHLORA_AVX512 inline void store_lanes(c10::BFloat16* p, __mmask16 lanes, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
TORCHLORA_AVX512 inline void store_lanes(c10::Half* p, __mmask16 lanes, __m512 v) {
  _mm256_mask_storeu_epi16(p, lanes, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Loads 16 columns of x: under the precomputed keep lanes when there is a mask, plainly when
// the chunk is whole and there is none (no mask register to read).
template <bool kMasked, typename Row>
TORCHLORA_AVX512 inline __m512 load_x(const Row* p, __mmask16 lanes) {
  if constexpr (kMasked) {
    return load_lanes(p, lanes);
  } else {
    return load_whole(p);
  }
}

// A shrink tile's R x KR accumulators, each summed over its lanes and scaled, into rows
// [t, t + R) and ranks [k0, k0 + KR) of s [T, rank] (ranks past `rank` dropped).
template <int R, int KR>
TORCHLORA_AVX512 inline void store_shrink_tile(const __m512 (&acc)[16], float scale, int64_t rank, int64_t k0, float* s,
                                               int64_t t) {
  alignas(64) float sums[16];
  _mm512_store_ps(sums, _mm512_mul_ps(sum_each(acc), _mm512_set1_ps(scale)));
  const int64_t n = rank - k0 < KR ? rank - k0 : KR;
  for (int i = 0; i < R; ++i) {
    for (int64_t k = 0; k < n; ++k) s[(t + i) * rank + k0 + k] = sums[i * KR + k];
  }
}

template <int R, int KR, typename Row>
TORCHLORA_AVX512 inline void shrink_step(const Factor& A, const float* a0, const Row* const (&xr)[R],
                                         const __mmask16* lanes, int64_t chunks, int64_t c, __m512 (&acc)[16],
                                         const Row* prefetch_row) {
  if (prefetch_row != nullptr) _mm_prefetch(reinterpret_cast<const char*>(prefetch_row + 16 * c), _MM_HINT_T0);
  __m512 xv[R];
  for (int i = 0; i < R; ++i) xv[i] = load_lanes(xr[i] + 16 * c, lanes[i * chunks + c]);
  for (int k = 0; k < KR; ++k) {
    const __m512 av = _mm512_loadu_ps(a0 + k * A.stride + 16 * c);
    for (int i = 0; i < R; ++i) acc[i * KR + k] = _mm512_fmadd_ps(xv[i], av, acc[i * KR + k]);
  }
}

// One register tile of shrink: R rows x KR ranks (R * KR = 16 accumulators), reduced with
// sum_each. The rows' x stays in L1 across the rank tiles; each loaded vector of A serves R rows.
template <int R, int KR, typename Row>
TORCHLORA_AVX512 void shrink_tile(const Factor& A, const Row* x, const __mmask16* lanes, int64_t chunks,
                                  float scale, float* s, int64_t t, int64_t t_end) {
  static_assert(R * KR == 16);
  const Row* xr[R];
  for (int i = 0; i < R; ++i) xr[i] = x + (t + i) * A.in;
  for (int64_t k0 = 0; k0 < A.rank; k0 += KR) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const float* a0 = A.A_pad + k0 * A.stride;
    // The rank passes over these rows prefetch the next tile's rows, one row per pass.
    const int64_t next = t + R + k0 / KR;
    const Row* prefetch_row = k0 / KR < R && next < t_end ? x + next * A.in : nullptr;
    for (int64_t c = 0; c < chunks; ++c) shrink_step<R, KR, Row>(A, a0, xr, lanes, chunks, c, acc, prefetch_row);
    store_shrink_tile<R, KR>(acc, scale, A.rank, k0, s, t);
  }
}

}  // namespace

bool available() {
  return cpu_isa() >= Isa::kAvx512;
}

bool bf16_dot_available() {
  return cpu_isa() == Isa::kAvx512Bf16;
}

// One path with and without a mask: without one the lanes are the valid columns, the same for
// every row, so they are filled once (per tile they cost a sixth of the kernel's time).
template <typename Row>
TORCHLORA_AVX512 void shrink(const Factor& A, const Row* x, const Mask& mask, float scale, float* s, int64_t t0,
                             int64_t t1) {
  constexpr int64_t kRows = 4;
  const int64_t chunks = A.in_pad / 16;
  const bool masked = mask.words != nullptr;
  std::vector<__mmask16> lanes(static_cast<size_t>(kRows * chunks));
  if (!masked) fill_lanes(lanes.data(), mask, t0, kRows, chunks, A.in);
  int64_t t = t0;
  for (; t + kRows <= t1; t += kRows) {
    if (masked) fill_lanes(lanes.data(), mask, t, kRows, chunks, A.in);
    shrink_tile<4, 4, Row>(A, x, lanes.data(), chunks, scale, s, t, t1);
  }
  for (; t < t1; ++t) {
    if (masked) fill_lanes(lanes.data(), mask, t, 1, chunks, A.in);
    shrink_tile<1, 16, Row>(A, x, lanes.data(), chunks, scale, s, t, t1);
  }
}

namespace {

#define TORCHLORA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Keep lanes of the 32 columns starting at 32 * pair_chunk of row t.
inline __mmask32 keep_lanes32(const Mask& mask, int64_t t, int64_t pair_chunk, int64_t in) {
  if (mask.words != nullptr && in % 32 == 0) return ~aligned_bits<uint32_t>(mask, t * in + 32 * pair_chunk);
  return static_cast<__mmask32>(keep_lanes(mask, t, 2 * pair_chunk, in)) |
         (static_cast<__mmask32>(keep_lanes(mask, t, 2 * pair_chunk + 1, in)) << 16);
}

// One step of shrink_pairs_tile over chunk c: full (plain loads) or under per-row lanes.
template <int R, int KR, bool Full>
TORCHLORA_AVX512_BF16 inline void shrink_pairs_step(const c10::BFloat16* a0, int64_t stride,
                                                    const c10::BFloat16* const (&xr)[R], const __mmask32* lanes,
                                                    int64_t lane_stride, int64_t c, __m512 (&acc)[16]) {
  __m512i xv[R];
  for (int i = 0; i < R; ++i) {
    xv[i] = Full ? _mm512_loadu_si512(xr[i] + 32 * c) : _mm512_maskz_loadu_epi16(lanes[i * lane_stride], xr[i] + 32 * c);
  }
  for (int k = 0; k < KR; ++k) {
    const __m512i av = _mm512_loadu_si512(a0 + k * stride + 32 * c);
    for (int i = 0; i < R; ++i) acc[i * KR + k] = _mm512_dpbf16_ps(acc[i * KR + k], (__m512bh)xv[i], (__m512bh)av);
  }
}

// shrink_tile with vdpbf16ps: R rows x KR ranks, 32 columns per step. Without a mask (lanes ==
// nullptr) the full chunks take plain loads and only the last one is masked: filling a mask per
// row and chunk cost about a third of the kernel's time.
template <int R, int KR>
TORCHLORA_AVX512_BF16 void shrink_pairs_tile(const PairFactor& A, const c10::BFloat16* x, const __mmask32* lanes,
                                             int64_t chunks, float scale, float* s, int64_t t) {
  static_assert(R * KR == 16);
  const c10::BFloat16* xr[R];
  for (int i = 0; i < R; ++i) xr[i] = x + (t + i) * A.in;
  const int64_t full = lanes == nullptr ? A.in / 32 : 0;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (A.in - 32 * (A.in / 32))) - 1u);  // the same in every row
  for (int64_t k0 = 0; k0 < A.rank; k0 += KR) {
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    const c10::BFloat16* a0 = A.A_pad + k0 * A.stride;
    int64_t c = 0;
    for (; c < full; ++c) shrink_pairs_step<R, KR, true>(a0, A.stride, xr, nullptr, 0, c, acc);
    for (; c < chunks; ++c) {
      if (lanes != nullptr) {
        shrink_pairs_step<R, KR, false>(a0, A.stride, xr, lanes + c, chunks, c, acc);
      } else {
        shrink_pairs_step<R, KR, false>(a0, A.stride, xr, &tail, 0, c, acc);
      }
    }
    store_shrink_tile<R, KR>(acc, scale, A.rank, k0, s, t);
  }
}

}  // namespace

void shrink_bf16_pairs(const PairFactor& A, const c10::BFloat16* x, const Mask& mask, float scale, float* s,
                       int64_t t0, int64_t t1) {
  constexpr int64_t kRows = 4;
  const int64_t chunks = (A.in + 31) / 32;
  const bool masked = mask.words != nullptr;
  std::vector<__mmask32> lanes(masked ? static_cast<size_t>(kRows * chunks) : 0);
  auto fill = [&](int64_t t, int64_t rows) {
    if (!masked) return;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t c = 0; c < chunks; ++c) lanes[i * chunks + c] = keep_lanes32(mask, t + i, c, A.in);
    }
  };
  const __mmask32* lane_masks = masked ? lanes.data() : nullptr;
  int64_t t = t0;
  for (; t + kRows <= t1; t += kRows) {
    fill(t, kRows);
    shrink_pairs_tile<4, 4>(A, x, lane_masks, chunks, scale, s, t);
  }
  for (; t < t1; ++t) {
    fill(t, 1);
    shrink_pairs_tile<1, 16>(A, x, lane_masks, chunks, scale, s, t);
  }
}

namespace {

// Two float32 values rounded to bfloat16 (nearest even) in one 32-bit word, lo first.
inline uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(c10::BFloat16(lo).x) | (static_cast<uint32_t>(c10::BFloat16(hi).x) << 16);
}

// acc += the tile, with the column order of unpacklo/unpackhi undone: lo holds columns
// 8L + 0..3 and hi columns 8L + 4..7 of 128-bit lane L (L = 0..3) of 32 columns.
TORCHLORA_AVX512 inline void add_unpacked(float* acc, int64_t valid, __m512 lo, __m512 hi) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512 halves[2] = {_mm512_permutex2var_ps(lo, first, hi), _mm512_permutex2var_ps(lo, second, hi)};
  for (int h = 0; h < 2; ++h) {
    const int64_t n = valid - 16 * h;
    if (n <= 0) return;
    const __mmask16 lanes = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u);
    float* p = acc + 16 * h;
    _mm512_mask_storeu_ps(p, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, p), halves[h]));
  }
}

}  // namespace

TORCHLORA_AVX512_BF16 void accumulate_bf16_pairs(const Factor& A, const float* gs, const c10::BFloat16* x,
                                                 const Mask& mask, float* acc, int64_t t0, int64_t t1, Ahead ahead) {
  constexpr int64_t kRows = 64;
  constexpr int KR = 8;
  const int64_t chunks = (A.in + 31) / 32, ranks = A.rank_pad;
  // Without a mask every row's lanes are the same (all but the last chunk full): one row of them
  // serves all, as filling them per row and chunk costs a tenth of the kernel's time.
  const bool masked = mask.words != nullptr;
  std::vector<__mmask32> lanes(static_cast<size_t>((masked ? kRows : 1) * chunks));
  const int64_t lane_row = masked ? chunks : 0;
  if (!masked) {
    for (int64_t c = 0; c < chunks; ++c) lanes[c] = keep_lanes32(mask, 0, c, A.in);
  }
  std::vector<uint32_t> pairs(static_cast<size_t>(kRows / 2 * ranks));  // [row pair, rank]
  const char* next_line = static_cast<const char*>(ahead.begin);
  const char* const ahead_end = static_cast<const char*>(ahead.end);
  for (int64_t tb = t0; tb < t1; tb += kRows) {
    const int64_t te = tb + kRows < t1 ? tb + kRows : t1, rows = te - tb, row_pairs = (rows + 1) / 2;
    for (int64_t i = 0; masked && i < rows; ++i) {
      for (int64_t c = 0; c < chunks; ++c) lanes[i * chunks + c] = keep_lanes32(mask, tb + i, c, A.in);
    }
    for (int64_t q = 0; q < row_pairs; ++q) {
      const float* g0 = gs + (tb + 2 * q) * A.rank;
      const bool second = 2 * q + 1 < rows;
      for (int64_t k = 0; k < ranks; ++k) {
        pairs[q * ranks + k] = k < A.rank ? bf16_pair(g0[k], second ? g0[A.rank + k] : 0.0f) : 0u;
      }
    }
    for (int64_t k0 = 0; k0 < A.rank; k0 += KR) {
      for (int64_t c = 0; c < chunks; ++c) {
        __m512 lo[KR], hi[KR];
        for (int k = 0; k < KR; ++k) lo[k] = hi[k] = _mm512_setzero_ps();
        for (int64_t q = 0; q < row_pairs; ++q) {
          if (next_line < ahead_end) {
            _mm_prefetch(next_line, _MM_HINT_T0);
            next_line += 64;
          }
          const int64_t i = 2 * q;
          // The first rank pass walks 64 rows at once, too many streams for the hardware
          // prefetcher: fetch each row two chunks ahead (grad_A's x comes from memory; 0.24 ms
          // against 0.25-0.41 ms per thread for 1024 rows at in = 1024, r = 16).
          if (k0 == 0 && c + 2 < chunks) {
            _mm_prefetch(reinterpret_cast<const char*>(x + (tb + i) * A.in + 32 * (c + 2)), _MM_HINT_T0);
            if (i + 1 < rows) {
              _mm_prefetch(reinterpret_cast<const char*>(x + (tb + i + 1) * A.in + 32 * (c + 2)), _MM_HINT_T0);
            }
          }
          const __m512i a = _mm512_maskz_loadu_epi16(lanes[i * lane_row + c], x + (tb + i) * A.in + 32 * c);
          const __m512i b = i + 1 < rows ? _mm512_maskz_loadu_epi16(lanes[(i + 1) * lane_row + c],
                                                                       x + (tb + i + 1) * A.in + 32 * c)
                                         : _mm512_setzero_si512();
          const __m512bh xlo = (__m512bh)_mm512_unpacklo_epi16(a, b), xhi = (__m512bh)_mm512_unpackhi_epi16(a, b);
          const uint32_t* g = pairs.data() + q * ranks + k0;
          for (int k = 0; k < KR; ++k) {
            const __m512bh gv = (__m512bh)_mm512_set1_epi32(static_cast<int>(g[k]));
            lo[k] = _mm512_dpbf16_ps(lo[k], xlo, gv);
            hi[k] = _mm512_dpbf16_ps(hi[k], xhi, gv);
          }
        }
        for (int k = 0; k < KR; ++k) add_unpacked(acc + (k0 + k) * A.stride + 32 * c, A.in - 32 * c, lo[k], hi[k]);
      }
    }
  }
}

namespace {

// One register tile of expand_bf16_pairs: R rows x CV chunks of 16 columns, over rank pairs.
template <int R, int CV, typename Init>
TORCHLORA_AVX512_BF16 inline void expand_pairs_tile(const RankPairFactor& A, const uint32_t* gp, int64_t ldp,
                                                    const Init* init, const float* bias, const Mask& mask,
                                                    float scale, c10::BFloat16* out, int64_t t, int64_t c0) {
  __m512 acc[R * CV];
  TORCHLORA_UNROLLED
  for (int i = 0; i < R * CV; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t rank_pairs = (A.rank + 1) / 2;
  for (int64_t kp = 0; kp < rank_pairs; ++kp) {
    const uint32_t* a = A.pairs + kp * A.stride + 16 * c0;
    const uint32_t* g = gp + kp * ldp;
    __m512bh av[CV];
    TORCHLORA_UNROLLED
    for (int q = 0; q < CV; ++q) av[q] = (__m512bh)_mm512_loadu_si512(a + 16 * q);
    TORCHLORA_UNROLLED
    for (int i = 0; i < R; ++i) {
      const __m512bh gv = (__m512bh)_mm512_set1_epi32(static_cast<int>(g[i]));
      TORCHLORA_UNROLLED
      for (int q = 0; q < CV; ++q) acc[i * CV + q] = _mm512_dpbf16_ps(acc[i * CV + q], av[q], gv);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  // Unmasked whole chunks (the fold's weight rows) take plain loads and stores: the per-lane
  // masks cost a tenth of the fold.
  if (mask.words == nullptr && A.in >= 16 * (c0 + CV)) {
    TORCHLORA_UNROLLED
    for (int i = 0; i < R; ++i) {
      TORCHLORA_UNROLLED
      for (int q = 0; q < CV; ++q) {
        const int64_t at = (t + i) * A.in + 16 * (c0 + q);
        __m512 v = _mm512_mul_ps(acc[i * CV + q], sc);
        if (init != nullptr) v = _mm512_add_ps(v, load_whole(init + at));
        if (bias != nullptr) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * (c0 + q)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at), (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
    return;
  }
  TORCHLORA_UNROLLED
  for (int i = 0; i < R; ++i) {
    TORCHLORA_UNROLLED
    for (int q = 0; q < CV; ++q) {
      const int64_t c = c0 + q, valid = A.in - 16 * c;
      const __mmask16 lanes = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1u);
      const int64_t at = (t + i) * A.in + 16 * c;
      __m512 v = _mm512_maskz_mul_ps(keep_lanes(mask, t + i, c, A.in), acc[i * CV + q], sc);
      if (init != nullptr) v = _mm512_add_ps(v, load_lanes(init + at, lanes));
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, bias + 16 * c));
      // vcvtneps2bf16: one instruction for store_lanes' rounding to nearest even
      _mm256_mask_storeu_epi16(out + at, lanes, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

template <int R, typename Init>
TORCHLORA_AVX512_BF16 inline void expand_pairs_rows(const RankPairFactor& A, const uint32_t* gp, int64_t ldp,
                                                    const Init* init, const float* bias, const Mask& mask,
                                                    float scale, c10::BFloat16* out, int64_t t) {
  const int64_t chunks = (A.in + 15) / 16;
  int64_t c = 0;
  for (; c + 3 <= chunks; c += 3) expand_pairs_tile<R, 3>(A, gp, ldp, init, bias, mask, scale, out, t, c);
  for (; c < chunks; ++c) expand_pairs_tile<R, 1>(A, gp, ldp, init, bias, mask, scale, out, t, c);
}

}  // namespace

template <typename Init>
void expand_bf16_pairs(const RankPairFactor& A, const float* gT, int64_t ldg, const Init* init,
                       const float* bias, const Mask& mask, float scale, c10::BFloat16* out, int64_t t0, int64_t t1) {
  // The coefficients of the rows as bfloat16 rank pairs: gp[kp, i] = (g[2kp, t0 + i], g[2kp + 1, t0 + i]).
  const int64_t rows = t1 - t0, rank_pairs = (A.rank + 1) / 2;
  std::vector<uint32_t> gp(static_cast<size_t>(rank_pairs * rows));
  for (int64_t kp = 0; kp < rank_pairs; ++kp) {
    const float* g0 = gT + 2 * kp * ldg;
    const bool second = 2 * kp + 1 < A.rank;
    for (int64_t i = 0; i < rows; ++i) gp[kp * rows + i] = bf16_pair(g0[i], second ? g0[ldg + i] : 0.0f);
  }
  int64_t t = t0;
  for (; t + 8 <= t1; t += 8) expand_pairs_rows<8>(A, gp.data() + (t - t0), rows, init, bias, mask, scale, out, t);
  for (; t < t1; ++t) expand_pairs_rows<1>(A, gp.data() + (t - t0), rows, init, bias, mask, scale, out, t);
}

namespace {

// One register tile of expand: R rows x CV column chunks, summed over the ranks; per rank CV
// loads of A and R broadcasts from the transposed coefficients (constant offsets).
template <int R, int CV, typename Row, typename Init>
TORCHLORA_AVX512 inline void expand_tile(const Factor& A, const float* gsT, int64_t ldg, const Init* init,
                                         const float* bias, const Mask& mask, float scale, Row* out, int64_t t,
                                         int64_t c0) {
  __m512 acc[R * CV];
  TORCHLORA_UNROLLED
  for (int i = 0; i < R * CV; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < A.rank; ++k) {
    const float* a = A.A_pad + k * A.stride + 16 * c0;
    const float* g = gsT + k * ldg;
    __m512 av[CV];
    TORCHLORA_UNROLLED
    for (int q = 0; q < CV; ++q) av[q] = _mm512_loadu_ps(a + 16 * q);
    TORCHLORA_UNROLLED
    for (int i = 0; i < R; ++i) {
      const __m512 gv = _mm512_set1_ps(g[i]);
      TORCHLORA_UNROLLED
      for (int q = 0; q < CV; ++q) acc[i * CV + q] = _mm512_fmadd_ps(gv, av[q], acc[i * CV + q]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  TORCHLORA_UNROLLED
  for (int i = 0; i < R; ++i) {
    TORCHLORA_UNROLLED
    for (int q = 0; q < CV; ++q) {
      const int64_t c = c0 + q, valid = A.in - 16 * c;
      const __mmask16 lanes = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1u);
      const int64_t at = (t + i) * A.in + 16 * c;
      __m512 v = _mm512_maskz_mul_ps(keep_lanes(mask, t + i, c, A.in), acc[i * CV + q], sc);
      if (init != nullptr) v = _mm512_add_ps(v, load_lanes(init + at, lanes));
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, bias + 16 * c));
      store_lanes(out + at, lanes, v);
    }
  }
}

template <int R, typename Row, typename Init>
TORCHLORA_AVX512 inline void expand_rows(const Factor& A, const float* gsT, int64_t ldg, const Init* init,
                                         const float* bias, const Mask& mask, float scale, Row* out, int64_t t) {
  const int64_t chunks = (A.in + 15) / 16;
  int64_t c = 0;
  for (; c + 3 <= chunks; c += 3) expand_tile<R, 3, Row>(A, gsT, ldg, init, bias, mask, scale, out, t, c);
  for (; c < chunks; ++c) expand_tile<R, 1, Row>(A, gsT, ldg, init, bias, mask, scale, out, t, c);
}

}  // namespace

template <typename Row, typename Init>
void expand(const Factor& A, const float* gsT, int64_t ldg, const Init* init, const float* bias, const Mask& mask,
            float scale, Row* out, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + 8 <= t1; t += 8) expand_rows<8, Row>(A, gsT + (t - t0), ldg, init, bias, mask, scale, out, t);
  for (; t < t1; ++t) expand_rows<1, Row>(A, gsT + (t - t0), ldg, init, bias, mask, scale, out, t);
}

namespace {

// tile[CV * k + q] += sum over rows [tb, te) of gs[t, k0 + k] * x[t, chunk c0 + q]; the last
// rank tile (kFull false) reads only the nk valid ranks of gs.
template <int KR, int CV, bool kMasked, bool kFull, typename Row>
TORCHLORA_AVX512 inline void accumulate_sweep(const float* gs, int64_t rank, const Row* x, int64_t in,
                                              const __mmask16* lanes, int64_t lane_stride, int64_t rows,
                                              int64_t nk, __m512 (&tile)[KR * CV]) {
  for (int64_t t = 0; t < rows; ++t, x += in, gs += rank, lanes += lane_stride) {
    __m512 xv[CV];
    for (int q = 0; q < CV; ++q) xv[q] = load_x<kMasked, Row>(x + 16 * q, lanes[q]);
    for (int k = 0; k < KR; ++k) {
      const __m512 gv = kFull || k < nk ? _mm512_set1_ps(gs[k]) : _mm512_setzero_ps();
      for (int q = 0; q < CV; ++q) tile[CV * k + q] = _mm512_fmadd_ps(gv, xv[q], tile[CV * k + q]);
    }
  }
}

// Register tiles of 8 ranks x 3 column chunks, loaded once and stored once per block of up to
// 64 rows (whose x stays in L2 while the tiles sweep it): 3 loads of x and 8 broadcasts of gs
// per 24 FMAs. Ranks past `rank` multiply by zero into the padding rows of acc.
template <bool kMasked, typename Row>
TORCHLORA_AVX512 void accumulate_rows(const Factor& A, const float* gs, const Row* x, const Mask& mask, float* acc,
                                      int64_t t0, int64_t t1) {
  constexpr int64_t kRows = 64;
  constexpr int KR = 8, CV = 3;
  const int64_t groups = (A.in_pad / 16 + CV - 1) / CV, chunks = CV * groups;
  // Without a mask only the last group can have partial or absent chunks, the same in every
  // row: one row of lanes serves all (lane_stride 0) instead of a fill per block.
  std::vector<__mmask16> lanes(static_cast<size_t>((kMasked ? kRows : 1) * chunks));
  const int64_t lane_stride = kMasked ? chunks : 0;
  if (!kMasked) fill_lanes(lanes.data(), mask, t0, 1, chunks, A.in);
  for (int64_t tb = t0; tb < t1; tb += kRows) {
    const int64_t te = tb + kRows < t1 ? tb + kRows : t1;
    if (kMasked) fill_lanes(lanes.data(), mask, tb, te - tb, chunks, A.in);
    for (int64_t k0 = 0; k0 < A.rank; k0 += KR) {
      const int64_t nk = A.rank - k0 < KR ? A.rank - k0 : KR;
      for (int64_t cg = 0; cg < groups; ++cg) {
        const int64_t c0 = CV * cg;
        const bool whole = !kMasked && 16 * (c0 + CV) <= A.in;
        __m512 tile[KR * CV];  // tile[CV * rank + chunk]
        for (int k = 0; k < KR; ++k) {
          for (int q = 0; q < CV; ++q) tile[CV * k + q] = _mm512_loadu_ps(acc + (k0 + k) * A.stride + 16 * (c0 + q));
        }
        const float* g = gs + tb * A.rank + k0;
        const Row* xr = x + tb * A.in + 16 * c0;
        const __mmask16* ln = lanes.data() + c0;
        const int64_t rows = te - tb;
        if (whole && nk == KR) {
          accumulate_sweep<KR, CV, false, true, Row>(g, A.rank, xr, A.in, ln, lane_stride, rows, nk, tile);
        } else if (nk == KR) {
          accumulate_sweep<KR, CV, true, true, Row>(g, A.rank, xr, A.in, ln, lane_stride, rows, nk, tile);
        } else {
          accumulate_sweep<KR, CV, true, false, Row>(g, A.rank, xr, A.in, ln, lane_stride, rows, nk, tile);
        }
        for (int k = 0; k < KR; ++k) {
          for (int q = 0; q < CV; ++q) _mm512_storeu_ps(acc + (k0 + k) * A.stride + 16 * (c0 + q), tile[CV * k + q]);
        }
      }
    }
  }
}

}  // namespace

template <typename Row>
void accumulate(const Factor& A, const float* gs, const Row* x, const Mask& mask, float* acc, int64_t t0,
                int64_t t1) {
  if (mask.words != nullptr) {
    accumulate_rows<true, Row>(A, gs, x, mask, acc, t0, t1);
  } else {
    accumulate_rows<false, Row>(A, gs, x, mask, acc, t0, t1);
  }
}

#else

bool available() {
  return false;
}

bool bf16_dot_available() {
  return false;
}

void shrink_bf16_pairs(const PairFactor&, const c10::BFloat16*, const Mask&, float, float*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}
void accumulate_bf16_pairs(const Factor&, const float*, const c10::BFloat16*, const Mask&, float*, int64_t, int64_t,
                           Ahead) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}
template <typename Init>
void expand_bf16_pairs(const RankPairFactor&, const float*, int64_t, const Init*, const float*, const Mask&,
                       float, c10::BFloat16*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}

template <typename Row>
void shrink(const Factor&, const Row*, const Mask&, float, float*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}
template <typename Row, typename Init>
void expand(const Factor&, const float*, int64_t, const Init*, const float*, const Mask&, float, Row*, int64_t,
            int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}
template <typename Row>
void accumulate(const Factor&, const float*, const Row*, const Mask&, float*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}

#endif

#define TORCHLORA_MASKED_INSTANTIATE(Row)                                                                       \
  template void shrink<Row>(const Factor&, const Row*, const Mask&, float, float*, int64_t, int64_t);        \
  template void expand<Row, Row>(const Factor&, const float*, int64_t, const Row*, const float*, const Mask&,  \
                                 float, Row*, int64_t, int64_t);                                                \
  template void accumulate<Row>(const Factor&, const float*, const Row*, const Mask&, float*, int64_t, int64_t);
TORCHLORA_MASKED_INSTANTIATE(float)
TORCHLORA_MASKED_INSTANTIATE(c10::BFloat16)
TORCHLORA_MASKED_INSTANTIATE(c10::Half)
#undef TORCHLORA_MASKED_INSTANTIATE
// 16-bit rows folded from a float32 weight
template void expand<c10::BFloat16, float>(const Factor&, const float*, int64_t, const float*, const float*,
                                           const Mask&, float, c10::BFloat16*, int64_t, int64_t);
template void expand<c10::Half, float>(const Factor&, const float*, int64_t, const float*, const float*, const Mask&,
                                       float, c10::Half*, int64_t, int64_t);
template void expand_bf16_pairs<c10::BFloat16>(const RankPairFactor&, const float*, int64_t, const c10::BFloat16*,
                                               const float*, const Mask&, float, c10::BFloat16*, int64_t, int64_t);
template void expand_bf16_pairs<float>(const RankPairFactor&, const float*, int64_t, const float*, const float*,
                                       const Mask&, float, c10::BFloat16*, int64_t, int64_t);

}  // namespace torchlora::cpu::masked
