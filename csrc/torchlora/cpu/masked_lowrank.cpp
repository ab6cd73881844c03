#include "masked_lowrank.h"

#include "isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's AVX-512 intrinsics pass "undefined" vectors that its uninitialised-use warnings flag.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TORCHLORA_MASKED_AVX512 1
#define TORCHLORA_AVX512 __attribute__((target("avx512f")))
#endif

#include <c10/util/Exception.h>

#include <vector>

namespace torchlora::cpu::masked {

#ifdef TORCHLORA_MASKED_AVX512
namespace {

// Keep lanes of the 16 columns starting at 16 * chunk of row t (valid columns only).
inline __mmask16 keep_lanes(const Mask& mask, int64_t t, int64_t chunk, int64_t in) {
  const int64_t valid = in - 16 * chunk;
  if (valid <= 0) return 0;
  const uint32_t lanes = valid >= 16 ? 0xFFFFu : ((1u << valid) - 1u);
  if (mask.words == nullptr) return static_cast<__mmask16>(lanes);
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

}  // namespace

bool available() {
  return cpu_isa() == Isa::kAvx512;
}

TORCHLORA_AVX512 void shrink_row(const Factor& A, const float* x, const Mask& mask, float scale, float* s, int64_t t) {
  const int64_t chunks = A.in_pad / 16;
  const float* xr = x + t * A.in;
  for (int64_t k0 = 0; k0 < A.rank; k0 += 16) {
    __m512 acc[16];
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
    const float* a0 = A.A_pad + k0 * A.stride;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 xv = _mm512_maskz_loadu_ps(keep_lanes(mask, t, c, A.in), xr + 16 * c);
      for (int k = 0; k < 16; ++k) acc[k] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(a0 + k * A.stride + 16 * c), acc[k]);
    }
    const int64_t n = A.rank - k0 < 16 ? A.rank - k0 : 16;
    const __m512 sums = _mm512_mul_ps(sum_each(acc), _mm512_set1_ps(scale));
    _mm512_mask_storeu_ps(s + t * A.rank + k0, static_cast<__mmask16>((1u << n) - 1u), sums);
  }
}

// Blocks of 2 rows x 8 ranks: each loaded vector of A serves both rows, halving the A traffic
// (A outgrows L1 for wide inputs and then streams from L2).
TORCHLORA_AVX512 void shrink(const Factor& A, const float* x, const Mask& mask, float scale, float* s, int64_t t0,
                             int64_t t1) {
  const int64_t chunks = A.in_pad / 16;
  std::vector<__mmask16> lanes(static_cast<size_t>(2 * chunks));
  int64_t t = t0;
  for (; t + 2 <= t1; t += 2) {
    fill_lanes(lanes.data(), mask, t, 2, chunks, A.in);
    for (int64_t k0 = 0; k0 < A.rank; k0 += 8) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
      const float* a0 = A.A_pad + k0 * A.stride;
      const float* x0 = x + t * A.in;
      const float* x1 = x0 + A.in;
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 xv0 = _mm512_maskz_loadu_ps(lanes[c], x0 + 16 * c);
        const __m512 xv1 = _mm512_maskz_loadu_ps(lanes[chunks + c], x1 + 16 * c);
        for (int k = 0; k < 8; ++k) {
          const __m512 av = _mm512_loadu_ps(a0 + k * A.stride + 16 * c);
          acc[k] = _mm512_fmadd_ps(xv0, av, acc[k]);
          acc[8 + k] = _mm512_fmadd_ps(xv1, av, acc[8 + k]);
        }
      }
      alignas(64) float sums[16];
      _mm512_store_ps(sums, _mm512_mul_ps(sum_each(acc), _mm512_set1_ps(scale)));
      const int64_t n = A.rank - k0 < 8 ? A.rank - k0 : 8;
      for (int64_t k = 0; k < n; ++k) {
        s[t * A.rank + k0 + k] = sums[k];
        s[(t + 1) * A.rank + k0 + k] = sums[8 + k];
      }
    }
  }
  for (; t < t1; ++t) shrink_row(A, x, mask, scale, s, t);
}

// Stores scale * v under the keep lanes of row t, chunk c (valid columns only).
TORCHLORA_AVX512 inline void store_kept(float* out, const Mask& mask, int64_t t, int64_t c, int64_t in, __m512 v,
                                        __m512 scale) {
  const int64_t valid = in - 16 * c;
  const __mmask16 lanes = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1u);
  _mm512_mask_storeu_ps(out + t * in + 16 * c, lanes, _mm512_maskz_mul_ps(keep_lanes(mask, t, c, in), v, scale));
}

TORCHLORA_AVX512 void expand(const Factor& A, const float* gs, const Mask& mask, float scale, float* gx, int64_t t0,
                             int64_t t1) {
  const int64_t chunks = A.in_pad / 16;
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    int64_t c = 0;
    for (; c + 4 <= chunks; c += 4) {
      __m512 acc[4 * 4];
      for (int i = 0; i < 4 * 4; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < A.rank; ++k) {
        const float* a = A.A_pad + k * A.stride + 16 * c;
        __m512 av[4];
        for (int q = 0; q < 4; ++q) av[q] = _mm512_loadu_ps(a + 16 * q);
        for (int i = 0; i < 4; ++i) {
          const __m512 g = _mm512_set1_ps(gs[(t + i) * A.rank + k]);
          for (int q = 0; q < 4; ++q) acc[4 * i + q] = _mm512_fmadd_ps(g, av[q], acc[4 * i + q]);
        }
      }
      for (int i = 0; i < 4; ++i) {
        for (int q = 0; q < 4; ++q) store_kept(gx, mask, t + i, c + q, A.in, acc[4 * i + q], sc);
      }
    }
    for (; c < chunks; ++c) {
      __m512 acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < A.rank; ++k) {
        const __m512 av = _mm512_loadu_ps(A.A_pad + k * A.stride + 16 * c);
        for (int i = 0; i < 4; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(gs[(t + i) * A.rank + k]), av, acc[i]);
      }
      for (int i = 0; i < 4; ++i) store_kept(gx, mask, t + i, c, A.in, acc[i], sc);
    }
  }
  for (; t < t1; ++t) {
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < A.rank; ++k) {
        acc = _mm512_fmadd_ps(_mm512_set1_ps(gs[t * A.rank + k]), _mm512_loadu_ps(A.A_pad + k * A.stride + 16 * c), acc);
      }
      store_kept(gx, mask, t, c, A.in, acc, sc);
    }
  }
}

// Register tiles of 4 ranks x 4 column chunks, loaded once and stored once per block of up to
// 64 rows (whose x stays in L2 while the tiles sweep it): 4 loads of x and 4 broadcasts of gs
// per 16 FMAs. Ranks past `rank` multiply by zero into the padding rows of acc.
TORCHLORA_AVX512 void accumulate(const Factor& A, const float* gs, const float* x, const Mask& mask, float* acc,
                                 int64_t t0, int64_t t1) {
  constexpr int64_t kRows = 64;
  const int64_t chunk_groups = (A.in_pad / 16 + 3) / 4, chunks = 4 * chunk_groups;
  std::vector<__mmask16> lanes(static_cast<size_t>(kRows * chunks));
  for (int64_t tb = t0; tb < t1; tb += kRows) {
    const int64_t te = tb + kRows < t1 ? tb + kRows : t1;
    fill_lanes(lanes.data(), mask, tb, te - tb, chunks, A.in);
    for (int64_t k0 = 0; k0 < A.rank; k0 += 4) {
      const int64_t nk = A.rank - k0 < 4 ? A.rank - k0 : 4;
      for (int64_t cg = 0; cg < chunk_groups; ++cg) {
        const int64_t c0 = 4 * cg;
        __m512 tile[16];  // tile[4 * rank + chunk]
        for (int k = 0; k < 4; ++k) {
          for (int q = 0; q < 4; ++q) tile[4 * k + q] = _mm512_loadu_ps(acc + (k0 + k) * A.stride + 16 * (c0 + q));
        }
        for (int64_t t = tb; t < te; ++t) {
          __m512 xv[4], g[4];
          for (int q = 0; q < 4; ++q) {
            xv[q] = _mm512_maskz_loadu_ps(lanes[(t - tb) * chunks + c0 + q], x + t * A.in + 16 * (c0 + q));
          }
          for (int k = 0; k < 4; ++k) g[k] = k < nk ? _mm512_set1_ps(gs[t * A.rank + k0 + k]) : _mm512_setzero_ps();
          for (int k = 0; k < 4; ++k) {
            for (int q = 0; q < 4; ++q) tile[4 * k + q] = _mm512_fmadd_ps(g[k], xv[q], tile[4 * k + q]);
          }
        }
        for (int k = 0; k < 4; ++k) {
          for (int q = 0; q < 4; ++q) _mm512_storeu_ps(acc + (k0 + k) * A.stride + 16 * (c0 + q), tile[4 * k + q]);
        }
      }
    }
  }
}

#else

bool available() {
  return false;
}

void shrink(const Factor&, const float*, const Mask&, float, float*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}
void expand(const Factor&, const float*, const Mask&, float, float*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}
void accumulate(const Factor&, const float*, const float*, const Mask&, float*, int64_t, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "torchlora: masked AVX-512 kernels are not built for this CPU");
}

#endif

}  // namespace torchlora::cpu::masked
