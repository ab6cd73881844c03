// AVX-512 kernels of the low-rank path for float32, bfloat16 or float16 rows (x, grad_out,
// the output; factors, coefficients and sums are float32), optionally under a dropout mask. The
// mask comes as packed bits (dropped_bits.h) and serves as the lane mask of the loads of x:
// dropout costs no masked copy and no extra pass, only the bits. Without a mask BLAS is as fast
// for shrink; accumulate (the T-long reductions of grad_A and grad_B) beats it by keeping the
// rank x column tile in registers, and expand with an initial value folds an adapter into a
// weight in one pass.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "dropped_bits.h"

namespace torchlora::cpu::masked {

// Whether this CPU runs the kernels (AVX-512 F, BW and VL); callers fall back to BLAS and corrections.
bool available();

// A [rank, in] factor zero-padded to [round16(rank), round16(in)] so every load is a full
// vector, with rows `stride` floats apart (off multiples of 4 KiB, whose rows share L1 sets).
// accumulate uses only the shape and stride (A_pad may be null).
struct Factor {
  const float* A_pad;
  int64_t rank, in, rank_pad, in_pad, stride;
};

inline int64_t round16(int64_t n) {
  return (n + 15) / 16 * 16;
}

inline int64_t padded_stride(int64_t in) {
  return round16(in) + 16;
}

// accumulate works on tiles of 8 ranks x three 16-column chunks: its [ranks, stride]
// accumulator covers whole tiles.
inline int64_t accumulate_stride(int64_t in) {
  return (in + 47) / 48 * 48 + 16;
}

inline int64_t accumulate_ranks(int64_t rank) {
  return (rank + 7) / 8 * 8;
}

// The dropout mask: the bit stream of dropped_bits.h over x's [T, in] elements; words ==
// nullptr keeps every element (the kernels then serve the dropout-free path too).
struct Mask {
  const uint64_t* words;
  int64_t n_words;
};

// Rows t in [t0, t1) of x [T, in] (row-major, of element type Row):
//   shrink:     s[t, :]    = scale * sum_j keep[t, j] * x[t, j] * A[:, j]        (s [T, rank])
//   expand:     out[t, j]  = init[t, j] + bias[j] + (keep[t, j] ? scale * sum_k g[k, t] * A[k, j] : 0)
//               (out, init [T, in]; init and bias (float32 [in]) may be null for 0; g the
//               coefficients transposed: g[k, t] at gT[k * ldg + t - t0], so their broadcasts
//               have constant offsets; the sum is rounded to Row once)
//   accumulate: acc[k, j] += sum_t gs[t, k] * keep[t, j] * x[t, j]
//               (acc [accumulate_ranks(rank), accumulate_stride(in)], zero-initialised by the caller)
// expand also folds an adapter into a weight: out = W + scale * B @ A with rows = W's rows,
// gT = B^T and init = W. init is of Row's type or float32 (a float32 W folded into 16-bit rows
// is rounded once, with the adapter).
template <typename Row>
void shrink(const Factor& A, const Row* x, const Mask& mask, float scale, float* s, int64_t t0, int64_t t1);
template <typename Row, typename Init = Row>
void expand(const Factor& A, const float* gT, int64_t ldg, const Init* init, const float* bias, const Mask& mask,
            float scale, Row* out, int64_t t0, int64_t t1);
template <typename Row>
void accumulate(const Factor& A, const float* gs, const Row* x, const Mask& mask, float* acc, int64_t t0, int64_t t1);

// bfloat16 rows and a bfloat16 factor on CPUs with AVX512_BF16: vdpbf16ps multiplies pairs of
// columns, twice the products per instruction of float32 FMAs; the products are exact in
// float32 and the sums float32, so the result is that of shrink on the same bfloat16 values.
bool bf16_dot_available();

// A [rank, in] bfloat16 factor zero-padded to [round16(rank), stride] with stride a multiple of 32.
struct PairFactor {
  const c10::BFloat16* A_pad;
  int64_t rank, in, rank_pad, stride;
};

inline int64_t pair_stride(int64_t in) {
  return (in + 31) / 32 * 32 + 32;
}

void shrink_bf16_pairs(const PairFactor& A, const c10::BFloat16* x, const Mask& mask, float scale, float* s,
                       int64_t t0, int64_t t1);

// Memory [begin, end) that a kernel fetches into cache for a later pass, one line per inner
// step: a pass that computes from cache so hides the next pass's reads behind its arithmetic
// (the kernels otherwise add the two, as the hardware prefetcher starts too late).
struct Ahead {
  const void* begin = nullptr;
  const void* end = nullptr;
};

// accumulate<c10::BFloat16> with vdpbf16ps over pairs of rows; the coefficients gs are rounded
// to bfloat16 (as the bfloat16 [T, r] intermediates of an unfused bfloat16 LoRA are). One line
// of `ahead` per row pair and chunk.
void accumulate_bf16_pairs(const Factor& A, const float* gs, const c10::BFloat16* x, const Mask& mask, float* acc,
                           int64_t t0, int64_t t1, Ahead ahead = {});

// A [rank, in] bfloat16 factor as pairs of ranks: word [kp, j] = (A[2kp, j], A[2kp + 1, j]),
// [ceil(rank / 2), stride] 32-bit words, zero-padded, stride a multiple of 16.
struct RankPairFactor {
  const uint32_t* pairs;
  int64_t rank, in, stride;
};

inline int64_t rank_pair_stride(int64_t in) {
  return (in + 15) / 16 * 16 + 16;
}

// expand<c10::BFloat16> with vdpbf16ps over pairs of ranks; the coefficients are rounded to
// bfloat16 (as above). init: bfloat16 or float32 (as expand's).
template <typename Init>
void expand_bf16_pairs(const RankPairFactor& A, const float* gT, int64_t ldg, const Init* init,
                       const float* bias, const Mask& mask, float scale, c10::BFloat16* out, int64_t t0, int64_t t1);

}  // namespace torchlora::cpu::masked
