// Device code of the multi-adapter operators (multi_lora_shrink, multi_lora_expand and their
// backward ops): S adapters stacked in slots, row t of the batch taking slot[t] (-1: none).
// Shapes are runtime values everywhere; the kernels are templates on the dtypes only.
//
//   shrink-shaped   out[t, n] = sum_k X[t, k] W[slot[t]][n, k]        (long contraction)
//                   h = x A^T (forward), u = grad_out B (expand backward)
//   expand-shaped   out[t, c] = epilogue(sum_r H[t, r] W[slot[t]][c, r])   (over the rank)
//                   out = base_out + scale (h B^T + lora_bias) (forward), grad_x = grad_h A
//   segmented outer F[s][n, k] += coef[s] sum_{t: slot[t] = s} P[t, n] Q[t, k]
//                   grad_A, grad_B, and the per-slot column sums of grad_out (lora_bias, scale)
//
// W[s][o, i] = W[s * stride_slot + o * stride_out + i * stride_in], so one kernel serves a stack
// and its transpose (A [S, r, in] as W[s][r, k] or W[s][k, r]; B [S, out, r] likewise); tiles
// are staged walking the weight's contiguous dimension, so the global reads coalesce either way.
//
// Each product has two kernels, picked on the host from T (a shape, so no host sync):
//   BGMV (decode: few rows, any slot per row): one block per (row, output chunk), slot read once.
//   SGMV (prefill: many rows in runs of one slot): one block per tile of 32 consecutive rows. The
//        tile's rows are grouped by slot on the device (warp ballots); for each group the block
//        runs a tiled product with that slot's weights staged in shared memory. Random slots
//        still work (more, smaller groups).
// Accumulation is float32 (float64 for float64 adapters); the T x r intermediate stays float32.
//
// Slot values are read on the device only (the ops are CUDA-graph safe): a value outside
// [-1, S) trips a device-side assert (CUDA_KERNEL_ASSERT: the CUDA context then reports the
// error on its next synchronisation, as for an out-of-range index in ATen), and is otherwise
// treated as -1 so that nothing is read out of bounds.
//
// The weight gradients are reduced with atomicAdd into a float32 (float64) accumulator: their
// float summation order, and so their last bits, can change from run to run. The forward
// products are deterministic (a split contraction is summed in a fixed order).
//
// Everything here has internal linkage: each .cu that includes it gets its own copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "lora_kernels_common.cuh"

namespace torchlora::cuda::multi {
namespace {

// ---- dtypes ---------------------------------------------------------------------------------

// Accumulator of a weight dtype: float32, float64 for float64.
template <typename T>
struct AccFor {
  using type = float;
};
template <>
struct AccFor<double> {
  using type = double;
};
template <typename T>
using acc_for = typename AccFor<T>::type;

template <typename T>
inline constexpr bool kReducedFloat = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Value conversions through float for float16/bfloat16 (c10's types, no CUDA half intrinsics).
template <typename To, typename From>
__device__ __forceinline__ To cast_to(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (kReducedFloat<From>) {
    return static_cast<To>(static_cast<float>(v));
  } else if constexpr (kReducedFloat<To>) {
    return To(static_cast<float>(v));
  } else {
    return static_cast<To>(v);
  }
}

// ---- operands -------------------------------------------------------------------------------

// slot_index [T], int64 or int32 (exactly one pointer is set), contiguous.
struct SlotIndex {
  const int64_t* p64 = nullptr;
  const int32_t* p32 = nullptr;
};

inline SlotIndex slot_index_view(const at::Tensor& slot_index) {
  SlotIndex v;
  if (slot_index.scalar_type() == at::kLong) {
    v.p64 = slot_index.const_data_ptr<int64_t>();
  } else {
    v.p32 = slot_index.const_data_ptr<int32_t>();
  }
  return v;
}

// Slot of row t, or -1. A value outside [-1, slots) is a caller's bug: device-side assert (no
// host sync), and -1 where asserts are compiled out, so that nothing is read out of bounds.
__device__ __forceinline__ int load_slot(const SlotIndex& idx, int64_t t, int64_t slots) {
  const int64_t s = idx.p64 != nullptr ? idx.p64[t] : static_cast<int64_t>(idx.p32[t]);
  CUDA_KERNEL_ASSERT(s >= -1 && s < slots);
  return (s >= 0 && s < slots) ? static_cast<int>(s) : -1;
}

// A stack of S weights: W[s][o, i] = data[s * stride_slot + o * stride_out + i * stride_in].
template <typename w_t>
struct SlotWeights {
  const w_t* data;
  int64_t stride_slot, stride_out, stride_in;
};

__device__ __forceinline__ int64_t ceil_div_device(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- the rows of a 32-row tile, grouped by slot (SGMV kernels) ------------------------------

constexpr int kTileRows = 32;  // one warp's ballot covers the tile

struct TileGroup {
  int rows[kTileRows];  // tile rows (0..31) of the current group, ascending
  int slot;             // the current group's slot; -1 once every group is done
  int count;            // rows in the current group
  unsigned no_adapter;  // tile rows (t < row_end) with slot -1
};

// What warp 0 keeps between groups: its lane's slot and the rows not yet grouped.
struct TilePending {
  int my_slot = -1;
  unsigned pending = 0;
};

// Warp 0 only (all 32 lanes): reads the slots of rows [t0, t0 + 32) ∩ [.., row_end).
__device__ __forceinline__ TilePending tile_begin(TileGroup& g, const SlotIndex& idx, int64_t t0, int64_t row_end,
                                                  int64_t slots) {
  const int lane = threadIdx.x & 31;
  const int64_t t = t0 + lane;
  TilePending p;
  p.my_slot = t < row_end ? load_slot(idx, t, slots) : -1;
  const unsigned in_range = __ballot_sync(0xffffffffu, t < row_end);
  p.pending = __ballot_sync(0xffffffffu, p.my_slot >= 0);
  if (lane == 0) g.no_adapter = in_range & ~p.pending;
  return p;
}

// Warp 0 only (all 32 lanes): publishes the next group (the slot of the first pending row and
// every pending row with that slot) in g, or g.slot = -1 when none is left.
__device__ __forceinline__ void tile_next(TileGroup& g, TilePending& p) {
  const int lane = threadIdx.x & 31;
  if (p.pending == 0) {  // warp-uniform (a ballot result)
    if (lane == 0) {
      g.slot = -1;
      g.count = 0;
    }
    return;
  }
  const int leader = __ffs(static_cast<int>(p.pending)) - 1;
  const int s = __shfl_sync(0xffffffffu, p.my_slot, leader);
  const unsigned match = __ballot_sync(0xffffffffu, p.my_slot == s) & p.pending;
  if ((match >> lane) & 1u) g.rows[__popc(match & ((1u << lane) - 1u))] = lane;
  if (lane == 0) {
    g.slot = s;
    g.count = __popc(match);
  }
  p.pending &= ~match;
}

// ---- shrink-shaped products ------------------------------------------------------------------
// partial[split, t, n] = sum_{k in split} X[t, k] W[slot[t]][n, k]; zero rows for slot -1.

// BGMV: a block per (split, row, 8 outputs); the threads stride over k, then reduce.
constexpr int kBgmvShrinkThreads = 256;
constexpr int kBgmvShrinkOutputs = 8;

template <typename x_t, typename w_t, typename acc_t>
__global__ void __launch_bounds__(kBgmvShrinkThreads)
    bgmv_shrink_kernel(const x_t* __restrict__ X,  // [T, K] contiguous
                       int64_t T, int64_t K, SlotWeights<w_t> W, int64_t N, int64_t slots, SlotIndex slot_index,
                       acc_t* __restrict__ partial,  // [splits, T, N]
                       int64_t splits, int64_t k_per_split) {
  __shared__ acc_t red_s[kBgmvShrinkThreads / 32][kBgmvShrinkOutputs];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n_tiles = ceil_div_device(N, kBgmvShrinkOutputs);
  const int64_t items = splits * T * n_tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // block-uniform
    const int64_t n0 = (item % n_tiles) * kBgmvShrinkOutputs;
    const int64_t t = (item / n_tiles) % T;
    const int64_t split = item / (n_tiles * T);
    const int nn = static_cast<int>(min64(kBgmvShrinkOutputs, N - n0));
    acc_t* dst = partial + (split * T + t) * N + n0;
    const int s = load_slot(slot_index, t, slots);
    if (s < 0) {  // block-uniform: no barrier is skipped by part of the block
      if (tid < nn) dst[tid] = acc_t(0);
      continue;
    }
    const int64_t k_begin = split * k_per_split;
    const int64_t k_end = min64(K, k_begin + k_per_split);
    const x_t* xr = X + t * K;
    const w_t* w = W.data + s * W.stride_slot + n0 * W.stride_out;
    acc_t acc[kBgmvShrinkOutputs];
#pragma unroll
    for (int j = 0; j < kBgmvShrinkOutputs; ++j) acc[j] = acc_t(0);
    for (int64_t k = k_begin + tid; k < k_end; k += kBgmvShrinkThreads) {
      const acc_t xv = cast_to<acc_t>(xr[k]);
      const w_t* wk = w + k * W.stride_in;
#pragma unroll
      for (int j = 0; j < kBgmvShrinkOutputs; ++j) {
        if (j < nn) acc[j] += xv * cast_to<acc_t>(wk[j * W.stride_out]);
      }
    }
#pragma unroll
    for (int j = 0; j < kBgmvShrinkOutputs; ++j) {
      const acc_t v = warp_sum(acc[j]);
      if (lane == 0) red_s[warp][j] = v;
    }
    __syncthreads();
    if (tid < nn) {
      acc_t v = acc_t(0);
#pragma unroll
      for (int w8 = 0; w8 < kBgmvShrinkThreads / 32; ++w8) v += red_s[w8][tid];
      dst[tid] = v;
    }
    __syncthreads();  // red_s is read before the next item writes it
  }
}

// SGMV: a block per (32-row tile, 32 outputs, split); per slot group, chunks of 32 k staged in
// shared memory; thread (warp ty, lane tx) computes output tx of the group's rows ty + 8j.
constexpr int kSgmvShrinkThreads = 256;
constexpr int kSgmvShrinkTileN = 32;
constexpr int kSgmvShrinkChunk = 32;
constexpr int kSgmvShrinkRowsPerThread = kTileRows / (kSgmvShrinkThreads / 32);  // 4

template <typename x_t, typename w_t, typename acc_t>
__global__ void __launch_bounds__(kSgmvShrinkThreads)
    sgmv_shrink_kernel(const x_t* __restrict__ X,  // [T, K] contiguous
                       int64_t T, int64_t K, SlotWeights<w_t> W, int64_t N, int64_t slots, SlotIndex slot_index,
                       acc_t* __restrict__ partial,  // [splits, T, N]
                       int64_t k_per_split) {
  __shared__ TileGroup group;
  __shared__ acc_t x_s[kTileRows][kSgmvShrinkChunk + 1];  // +1: conflict-free column reads
  __shared__ acc_t w_s[kSgmvShrinkTileN][kSgmvShrinkChunk + 1];
  const int tid = threadIdx.x, tx = tid & 31, ty = tid >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSgmvShrinkTileN;
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);
  acc_t* out = partial + split * T * N;
  const bool w_k_contiguous = W.stride_in == 1;

  TilePending pending;
  if (ty == 0) pending = tile_begin(group, slot_index, t0, T, slots);
  __syncthreads();
  for (int i = tid; i < kTileRows * kSgmvShrinkTileN; i += kSgmvShrinkThreads) {
    const int r = i / kSgmvShrinkTileN, n = i % kSgmvShrinkTileN;
    if (((group.no_adapter >> r) & 1u) && n0 + n < N) out[(t0 + r) * N + n0 + n] = acc_t(0);
  }
  while (true) {
    if (ty == 0) tile_next(group, pending);
    __syncthreads();
    const int s = group.slot, count = group.count;
    if (s < 0) break;  // block-uniform
    const w_t* w = W.data + s * W.stride_slot;
    acc_t acc[kSgmvShrinkRowsPerThread];
#pragma unroll
    for (int j = 0; j < kSgmvShrinkRowsPerThread; ++j) acc[j] = acc_t(0);
    for (int64_t kc = k_begin; kc < k_end; kc += kSgmvShrinkChunk) {
      for (int i = tid; i < kTileRows * kSgmvShrinkChunk; i += kSgmvShrinkThreads) {
        const int r = i / kSgmvShrinkChunk, kk = i % kSgmvShrinkChunk;
        acc_t v = acc_t(0);
        if (r < count && kc + kk < k_end) v = cast_to<acc_t>(X[(t0 + group.rows[r]) * K + kc + kk]);
        x_s[r][kk] = v;
      }
      for (int i = tid; i < kSgmvShrinkTileN * kSgmvShrinkChunk; i += kSgmvShrinkThreads) {
        // walk the weight along its contiguous dimension
        const int n = w_k_contiguous ? i / kSgmvShrinkChunk : i % kSgmvShrinkTileN;
        const int kk = w_k_contiguous ? i % kSgmvShrinkChunk : i / kSgmvShrinkTileN;
        const int64_t gn = n0 + n, gk = kc + kk;
        w_s[n][kk] = (gn < N && gk < k_end) ? cast_to<acc_t>(w[gn * W.stride_out + gk * W.stride_in]) : acc_t(0);
      }
      __syncthreads();
      if (ty < count) {  // warp-uniform: warps past the group's rows have nothing to compute
#pragma unroll 8
        for (int kk = 0; kk < kSgmvShrinkChunk; ++kk) {
          const acc_t wv = w_s[tx][kk];
#pragma unroll
          for (int j = 0; j < kSgmvShrinkRowsPerThread; ++j) acc[j] += x_s[ty + 8 * j][kk] * wv;
        }
      }
      __syncthreads();  // x_s / w_s are read before the next chunk overwrites them
    }
#pragma unroll
    for (int j = 0; j < kSgmvShrinkRowsPerThread; ++j) {
      const int r = ty + 8 * j;
      if (r < count && n0 + tx < N) out[(t0 + group.rows[r]) * N + n0 + tx] = acc[j];
    }
    __syncthreads();  // group.rows is read before warp 0 publishes the next group
  }
}

// out[i] = sum_split partial[split, i], in a fixed order.
constexpr int kSumThreads = 256;

template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) sum_splits_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t n,
                                  acc_t* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v = acc_t(0);
    for (int64_t s = 0; s < splits; ++s) v += partial[s * n + i];
    out[i] = v;
  }
}

// ---- expand-shaped products ------------------------------------------------------------------

// What becomes of the product v = sum_r H[t, r] W[s][c, r] of row t, column c:
//   base == null:  out[t, c] = v (rows with slot -1: 0)
//   else:          out[t, c] = base[t, c] + scale[s] * (v + bias[s, c]) (rows with slot -1: base),
//                  added in float32 (float64 when either side is float64) and rounded once.
// Columns are contiguous; rows are `*_stride` apart. out may be base itself (in_place): each
// element is read and then written by one thread, so neither pointer is __restrict__.
template <typename w_t, typename out_t, typename acc_t>
struct ExpandEpilogue {
  out_t* out;
  int64_t out_stride;
  const out_t* base;
  int64_t base_stride;
  const acc_t* scale;  // [S], with base
  const w_t* bias;     // [S, C] or null
  bool in_place;
};

template <typename w_t, typename out_t, typename acc_t>
__device__ __forceinline__ void expand_store(const ExpandEpilogue<w_t, out_t, acc_t>& ep, int64_t t, int64_t c,
                                             int64_t C, int s, acc_t v) {
  if (ep.base == nullptr) {
    ep.out[t * ep.out_stride + c] = cast_to<out_t>(v);
    return;
  }
  using add_t = std::conditional_t<std::is_same_v<out_t, double> || std::is_same_v<acc_t, double>, double, float>;
  if (ep.bias != nullptr) v += cast_to<acc_t>(ep.bias[s * C + c]);
  v *= ep.scale[s];
  const add_t sum = cast_to<add_t>(ep.base[t * ep.base_stride + c]) + cast_to<add_t>(v);
  ep.out[t * ep.out_stride + c] = cast_to<out_t>(sum);
}

template <typename w_t, typename out_t, typename acc_t>
__device__ __forceinline__ void expand_store_no_adapter(const ExpandEpilogue<w_t, out_t, acc_t>& ep, int64_t t,
                                                        int64_t c) {
  if (ep.base == nullptr) {
    ep.out[t * ep.out_stride + c] = cast_to<out_t>(acc_t(0));
  } else if (!ep.in_place) {
    ep.out[t * ep.out_stride + c] = ep.base[t * ep.base_stride + c];
  }
}

constexpr int kExpandRankChunk = 16;  // ranks staged per step

// BGMV: a block per (row, 128 columns), a thread per column; the slot's [128, 16] weight tile
// and the row's 16 values of H are staged per step.
constexpr int kBgmvExpandThreads = 128;
constexpr int kBgmvExpandCols = kBgmvExpandThreads;

template <typename w_t, typename out_t, typename acc_t>
__global__ void __launch_bounds__(kBgmvExpandThreads)
    bgmv_expand_kernel(const acc_t* __restrict__ H,  // [T, R] contiguous
                       int64_t T, int64_t R, SlotWeights<w_t> W, int64_t C, int64_t slots, SlotIndex slot_index,
                       ExpandEpilogue<w_t, out_t, acc_t> ep) {
  __shared__ acc_t w_s[kExpandRankChunk][kBgmvExpandCols + 1];
  __shared__ acc_t h_s[kExpandRankChunk];
  const int tid = threadIdx.x;
  const bool w_r_contiguous = W.stride_in == 1;
  const int64_t c_tiles = ceil_div_device(C, kBgmvExpandCols);
  const int64_t items = T * c_tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // block-uniform
    const int64_t t = item / c_tiles;
    const int64_t c0 = (item % c_tiles) * kBgmvExpandCols;
    const int64_t c = c0 + tid;
    const int s = load_slot(slot_index, t, slots);
    if (s < 0) {  // block-uniform
      if (c < C) expand_store_no_adapter(ep, t, c);
      continue;
    }
    const w_t* w = W.data + s * W.stride_slot;
    acc_t acc = acc_t(0);
    for (int64_t rc = 0; rc < R; rc += kExpandRankChunk) {
      for (int i = tid; i < kExpandRankChunk * kBgmvExpandCols; i += kBgmvExpandThreads) {
        const int rr = w_r_contiguous ? i % kExpandRankChunk : i / kBgmvExpandCols;
        const int cc = w_r_contiguous ? i / kExpandRankChunk : i % kBgmvExpandCols;
        const int64_t gr = rc + rr, gc = c0 + cc;
        w_s[rr][cc] = (gr < R && gc < C) ? cast_to<acc_t>(w[gc * W.stride_out + gr * W.stride_in]) : acc_t(0);
      }
      if (tid < kExpandRankChunk) h_s[tid] = rc + tid < R ? H[t * R + rc + tid] : acc_t(0);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < kExpandRankChunk; ++rr) acc += w_s[rr][tid] * h_s[rr];
      __syncthreads();  // w_s / h_s are read before the next step overwrites them
    }
    if (c < C) expand_store(ep, t, c, C, s, acc);
  }
}

// SGMV: a block per (32-row tile, 128 columns); per slot group, 16 ranks staged per step;
// thread (tr = tid / 64, tc = tid % 64) computes columns tc, tc + 64 of the group's rows tr + 4j.
constexpr int kSgmvExpandThreads = 256;
constexpr int kSgmvExpandCols = 128;
constexpr int kSgmvExpandRowGroups = kSgmvExpandThreads / (kSgmvExpandCols / 2);  // 4
constexpr int kSgmvExpandRowsPerThread = kTileRows / kSgmvExpandRowGroups;       // 8

template <typename w_t, typename out_t, typename acc_t>
__global__ void __launch_bounds__(kSgmvExpandThreads, 2)
    sgmv_expand_kernel(const acc_t* __restrict__ H,  // [T, R] contiguous
                       int64_t T, int64_t R, SlotWeights<w_t> W, int64_t C, int64_t slots, SlotIndex slot_index,
                       ExpandEpilogue<w_t, out_t, acc_t> ep) {
  __shared__ TileGroup group;
  __shared__ acc_t w_s[kExpandRankChunk][kSgmvExpandCols + 1];
  __shared__ acc_t h_s[kTileRows][kExpandRankChunk + 1];
  const int tid = threadIdx.x, warp = tid >> 5;
  const int tc = tid % (kSgmvExpandCols / 2), tr = tid / (kSgmvExpandCols / 2);  // tr is warp-uniform
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kSgmvExpandCols;
  const bool w_r_contiguous = W.stride_in == 1;

  TilePending pending;
  if (warp == 0) pending = tile_begin(group, slot_index, t0, T, slots);
  __syncthreads();
  for (int i = tid; i < kTileRows * kSgmvExpandCols; i += kSgmvExpandThreads) {
    const int r = i / kSgmvExpandCols, cc = i % kSgmvExpandCols;
    if (((group.no_adapter >> r) & 1u) && c0 + cc < C) expand_store_no_adapter(ep, t0 + r, c0 + cc);
  }
  while (true) {
    if (warp == 0) tile_next(group, pending);
    __syncthreads();
    const int s = group.slot, count = group.count;
    if (s < 0) break;  // block-uniform
    const w_t* w = W.data + s * W.stride_slot;
    acc_t acc[kSgmvExpandRowsPerThread][2];
#pragma unroll
    for (int j = 0; j < kSgmvExpandRowsPerThread; ++j) acc[j][0] = acc[j][1] = acc_t(0);
    for (int64_t rc = 0; rc < R; rc += kExpandRankChunk) {
      for (int i = tid; i < kExpandRankChunk * kSgmvExpandCols; i += kSgmvExpandThreads) {
        const int rr = w_r_contiguous ? i % kExpandRankChunk : i / kSgmvExpandCols;
        const int cc = w_r_contiguous ? i / kExpandRankChunk : i % kSgmvExpandCols;
        const int64_t gr = rc + rr, gc = c0 + cc;
        w_s[rr][cc] = (gr < R && gc < C) ? cast_to<acc_t>(w[gc * W.stride_out + gr * W.stride_in]) : acc_t(0);
      }
      for (int i = tid; i < kTileRows * kExpandRankChunk; i += kSgmvExpandThreads) {
        const int r = i / kExpandRankChunk, rr = i % kExpandRankChunk;
        acc_t v = acc_t(0);
        if (r < count && rc + rr < R) v = H[(t0 + group.rows[r]) * R + rc + rr];
        h_s[r][rr] = v;
      }
      __syncthreads();
      if (tr < count) {  // warp-uniform
#pragma unroll
        for (int rr = 0; rr < kExpandRankChunk; ++rr) {
          const acc_t w0 = w_s[rr][tc], w1 = w_s[rr][tc + kSgmvExpandCols / 2];
#pragma unroll
          for (int j = 0; j < kSgmvExpandRowsPerThread; ++j) {
            const acc_t hv = h_s[tr + kSgmvExpandRowGroups * j][rr];
            acc[j][0] += hv * w0;
            acc[j][1] += hv * w1;
          }
        }
      }
      __syncthreads();  // w_s / h_s are read before the next step overwrites them
    }
#pragma unroll
    for (int j = 0; j < kSgmvExpandRowsPerThread; ++j) {
      const int r = tr + kSgmvExpandRowGroups * j;
      if (r >= count) break;
      const int64_t t = t0 + group.rows[r];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int64_t c = c0 + tc + q * (kSgmvExpandCols / 2);
        if (c < C) expand_store(ep, t, c, C, s, acc[j][q]);
      }
    }
    __syncthreads();  // group.rows is read before warp 0 publishes the next group
  }
}

// ---- segmented outer product (the weight gradients) ----------------------------------------
// F[s][n, k] += coef[s] * sum_{t: slot[t] = s} P[t, n] Q[t, k]  for n < N (F[s * fs + n * fn + k * fk])
// ones_out[s, k] += sum_{t: slot[t] = s} Q[t, k]                  (column N of P taken as ones)
// A block per (row range, 64 k, 32 n). It walks its rows in tiles of 32, groups each tile by
// slot and keeps the sums of one slot in registers until the slot changes (runs of a slot span
// tiles), then adds them to F with atomicAdd. Thread (tn = warp, tk = lane) holds k = tk, tk + 32
// for n = tn + 8j.
constexpr int kOuterThreads = 256;
constexpr int kOuterTileN = 32;
constexpr int kOuterTileK = 64;
constexpr int kOuterN = kOuterTileN / (kOuterThreads / 32);  // 4 n per thread

template <typename acc_t>
__device__ __forceinline__ void outer_reset(acc_t (&acc)[kOuterN][2]) {
#pragma unroll
  for (int j = 0; j < kOuterN; ++j) acc[j][0] = acc[j][1] = acc_t(0);
}

// Adds this thread's sums of slot s to F (times coef[s]) and ones_out.
template <typename acc_t>
__device__ __forceinline__ void outer_flush(const acc_t (&acc)[kOuterN][2], int s, int64_t n0, int64_t k0, int64_t N,
                                            int64_t K, bool ones_column, acc_t* F, int64_t fs, int64_t fn,
                                            int64_t fk, const acc_t* coef, acc_t* ones_out) {
  const int tk = threadIdx.x & 31, tn = threadIdx.x >> 5;
  const acc_t c = coef != nullptr ? coef[s] : acc_t(1);
#pragma unroll
  for (int j = 0; j < kOuterN; ++j) {
    const int64_t n = n0 + tn + (kOuterThreads / 32) * j;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int64_t k = k0 + tk + 32 * q;
      if (k >= K) continue;
      if (n < N) {
        atomicAdd(&F[s * fs + n * fn + k * fk], c * acc[j][q]);
      } else if (ones_column && n == N) {
        atomicAdd(&ones_out[s * K + k], acc[j][q]);
      }
    }
  }
}

template <typename q_t, typename acc_t>
__global__ void __launch_bounds__(kOuterThreads)
    segmented_outer_kernel(const acc_t* __restrict__ P,  // [T, p_stride], columns 0..N-1 used
                           int64_t p_stride, int64_t N, bool ones_column,
                           const q_t* __restrict__ Q,  // [T, K] contiguous
                           int64_t T, int64_t K, int64_t slots, SlotIndex slot_index, int64_t rows_per_block,
                           acc_t* __restrict__ F, int64_t fs, int64_t fn, int64_t fk,
                           const acc_t* __restrict__ coef,  // [S] or null (1)
                           acc_t* __restrict__ ones_out) {  // [S, K] or null
  __shared__ TileGroup group;
  __shared__ acc_t p_s[kTileRows][kOuterTileN + 1];
  __shared__ acc_t q_s[kTileRows][kOuterTileK + 1];
  const int tid = threadIdx.x, tk = tid & 31, tn = tid >> 5;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = min64(T, row_begin + rows_per_block);
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kOuterTileK;
  const int64_t n0 = static_cast<int64_t>(blockIdx.z) * kOuterTileN;

  acc_t acc[kOuterN][2];
  outer_reset(acc);
  int acc_slot = -1;  // block-uniform

  for (int64_t t0 = row_begin; t0 < row_end; t0 += kTileRows) {
    TilePending pending;
    if (tn == 0) pending = tile_begin(group, slot_index, t0, row_end, slots);
    while (true) {
      if (tn == 0) tile_next(group, pending);
      __syncthreads();
      const int s = group.slot, count = group.count;
      if (s < 0) break;  // block-uniform
      if (s != acc_slot) {
        if (acc_slot >= 0) outer_flush(acc, acc_slot, n0, k0, N, K, ones_column, F, fs, fn, fk, coef, ones_out);
        outer_reset(acc);
        acc_slot = s;
      }
      for (int i = tid; i < kTileRows * kOuterTileN; i += kOuterThreads) {
        const int r = i / kOuterTileN, n = i % kOuterTileN;
        const int64_t gn = n0 + n;
        acc_t v = acc_t(0);
        if (r < count) {
          if (gn < N) {
            v = P[(t0 + group.rows[r]) * p_stride + gn];
          } else if (ones_column && gn == N) {
            v = acc_t(1);
          }
        }
        p_s[r][n] = v;
      }
      for (int i = tid; i < kTileRows * kOuterTileK; i += kOuterThreads) {
        const int r = i / kOuterTileK, kk = i % kOuterTileK;
        acc_t v = acc_t(0);
        if (r < count && k0 + kk < K) v = cast_to<acc_t>(Q[(t0 + group.rows[r]) * K + k0 + kk]);
        q_s[r][kk] = v;
      }
      __syncthreads();
      for (int r = 0; r < count; ++r) {
        const acc_t q0 = q_s[r][tk], q1 = q_s[r][tk + 32];
#pragma unroll
        for (int j = 0; j < kOuterN; ++j) {
          const acc_t p = p_s[r][tn + (kOuterThreads / 32) * j];
          acc[j][0] += p * q0;
          acc[j][1] += p * q1;
        }
      }
      __syncthreads();  // group, p_s, q_s are read before they are overwritten
    }
    __syncthreads();  // every thread has read group.slot == -1 before warp 0 starts the next tile
  }
  if (acc_slot >= 0) outer_flush(acc, acc_slot, n0, k0, N, K, ones_column, F, fs, fn, fk, coef, ones_out);
}

// ---- the rows of the expand backward ---------------------------------------------------------
// grad_h[t] = scale[slot[t]] u[t] (zero for slot -1), and grad_scale[s] += u[t] . h[t] summed
// over the rows of slot s: within a warp by slot (__match_any_sync), then one atomicAdd each.
constexpr int kRowsThreads = 256;

template <typename acc_t>
__global__ void __launch_bounds__(kRowsThreads)
    expand_backward_rows_kernel(const acc_t* __restrict__ U,  // [T, R]
                                const acc_t* __restrict__ H,  // [T, R]
                                int64_t T, int64_t R, const acc_t* __restrict__ scale, int64_t slots,
                                SlotIndex slot_index,
                                acc_t* __restrict__ grad_h,       // [T, R] or null
                                acc_t* __restrict__ grad_scale) {  // [S] or null
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x; first < T; first += stride) {  // block-uniform
    const int64_t t = first + threadIdx.x;
    const int s = t < T ? load_slot(slot_index, t, slots) : -1;
    acc_t dot = acc_t(0);
    if (s >= 0) {
      const acc_t sc = scale[s];
      for (int64_t r = 0; r < R; ++r) {
        const acc_t u = U[t * R + r];
        if (grad_h != nullptr) grad_h[t * R + r] = sc * u;
        dot += u * H[t * R + r];
      }
    } else if (t < T && grad_h != nullptr) {
      for (int64_t r = 0; r < R; ++r) grad_h[t * R + r] = acc_t(0);
    }
    if (grad_scale == nullptr) continue;  // uniform
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
    if (s >= 0) atomicAdd(&grad_scale[s], dot);
#else
    const unsigned peers = __match_any_sync(0xffffffffu, s);
    acc_t sum = acc_t(0);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const acc_t v = __shfl_sync(0xffffffffu, dot, j);
      if ((peers >> j) & 1u) sum += v;
    }
    if (s >= 0 && lane == __ffs(static_cast<int>(peers)) - 1) atomicAdd(&grad_scale[s], sum);
#endif
  }
}

// ---- host launchers (current stream; the caller holds the CUDAGuard) ------------------------

// Up to this many rows a batch takes the BGMV kernels (decode); above, the SGMV ones.
constexpr int64_t kBgmvMaxRows = 32;

inline bool use_bgmv(int64_t rows) {
  return rows <= kBgmvMaxRows;
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Blocks of a grid-stride kernel over `items` work items.
inline unsigned stride_blocks(int64_t items, int per_sm, int device) {
  return static_cast<unsigned>(std::clamp<int64_t>(items, 1, int64_t{per_sm} * sm_count(device)));
}

// out [T, N] (acc_t, contiguous) = the shrink-shaped product of X [T, K] (contiguous) and W.
template <typename x_t, typename w_t>
void launch_shrink_shaped(const at::Tensor& X, const SlotWeights<w_t>& W, int64_t N, int64_t slots,
                          const at::Tensor& slot_index, const at::Tensor& out, const char* op) {
  using acc_t = acc_for<w_t>;
  const int64_t T = X.size(0), K = X.size(1);
  if (T == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const int device = X.device().index();
  const cudaStream_t stream = stream_of(X);
  const SlotIndex idx = slot_index_view(slot_index);
  at::Tensor partial = out;
  int64_t splits = 1;
  if (use_bgmv(T)) {
    const int64_t n_tiles = ceil_div(N, kBgmvShrinkOutputs);
    const SplitPlan plan = plan_split(T * n_tiles, K, kBgmvShrinkThreads, 64, device);
    splits = plan.splits;
    if (splits > 1) partial = at::empty({splits, T, N}, out.options());
    bgmv_shrink_kernel<x_t, w_t, acc_t><<<stride_blocks(splits * T * n_tiles, 32, device), kBgmvShrinkThreads, 0,
                                          stream>>>(X.const_data_ptr<x_t>(), T, K, W, N, slots, idx,
                                                    partial.mutable_data_ptr<acc_t>(), splits, plan.per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t row_tiles = ceil_div(T, kTileRows), n_tiles = ceil_div(N, kSgmvShrinkTileN);
    const SplitPlan plan = plan_split(row_tiles * n_tiles, K, kSgmvShrinkChunk, 64, device);
    splits = plan.splits;
    if (splits > 1) partial = at::empty({splits, T, N}, out.options());
    const dim3 grid(grid_dim(row_tiles, kGridXLimit, op, "the shrink over rows"),
                    grid_dim(n_tiles, kGridYZLimit, op, "the shrink over ranks"),
                    grid_dim(splits, kGridYZLimit, op, "the shrink over features"));
    sgmv_shrink_kernel<x_t, w_t, acc_t><<<grid, kSgmvShrinkThreads, 0, stream>>>(
        X.const_data_ptr<x_t>(), T, K, W, N, slots, idx, partial.mutable_data_ptr<acc_t>(), plan.per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (splits > 1) {
    const int64_t n = T * N;
    sum_splits_kernel<acc_t><<<stride_blocks(ceil_div(n, kSumThreads), 8, device), kSumThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), splits, n, out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The expand-shaped product of H [T, R] (acc_t, contiguous) and W over C columns, into `ep`.
template <typename w_t, typename out_t, typename acc_t>
void launch_expand_shaped(const at::Tensor& H, const SlotWeights<w_t>& W, int64_t C, int64_t slots,
                          const at::Tensor& slot_index, const ExpandEpilogue<w_t, out_t, acc_t>& ep, const char* op) {
  static_assert(std::is_same_v<acc_t, acc_for<w_t>>);
  const int64_t T = H.size(0), R = H.size(1);
  if (T == 0 || C == 0) return;
  const int device = H.device().index();
  const cudaStream_t stream = stream_of(H);
  const SlotIndex idx = slot_index_view(slot_index);
  if (use_bgmv(T)) {
    const int64_t items = T * ceil_div(C, kBgmvExpandCols);
    bgmv_expand_kernel<w_t, out_t, acc_t><<<stride_blocks(items, 32, device), kBgmvExpandThreads, 0, stream>>>(
        H.const_data_ptr<acc_t>(), T, R, W, C, slots, idx, ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const dim3 grid(grid_dim(ceil_div(T, kTileRows), kGridXLimit, op, "the expand over rows"),
                    grid_dim(ceil_div(C, kSgmvExpandCols), kGridYZLimit, op, "the expand over features"));
    sgmv_expand_kernel<w_t, out_t, acc_t><<<grid, kSgmvExpandThreads, 0, stream>>>(H.const_data_ptr<acc_t>(), T, R,
                                                                                   W, C, slots, idx, ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// F[s][n, k] (through fs, fn, fk) += coef[s] sum_{t in s} P[t, n] Q[t, k] for n < N, and with
// ones_out also ones_out[s, k] += sum_{t in s} Q[t, k]. F and ones_out must start zeroed.
// P [T, p_stride] (acc_t, contiguous; unused when N == 0), Q [T, K] contiguous.
template <typename q_t, typename acc_t>
void launch_segmented_outer(const at::Tensor& P, int64_t N, const at::Tensor& Q, int64_t slots,
                            const at::Tensor& slot_index, acc_t* F, int64_t fs, int64_t fn, int64_t fk,
                            const acc_t* coef, acc_t* ones_out, const char* op) {
  const int64_t T = Q.size(0), K = Q.size(1);
  const int64_t n_total = N + (ones_out != nullptr ? 1 : 0);
  if (T == 0 || K == 0 || n_total == 0) return;
  const int device = Q.device().index();
  const int64_t k_tiles = ceil_div(K, kOuterTileK), n_tiles = ceil_div(n_total, kOuterTileN);
  // About 8 blocks per SM; each takes a whole number of 32-row tiles.
  const int64_t row_tiles = ceil_div(T, kTileRows);
  const int64_t wanted = std::clamp<int64_t>(ceil_div(8 * int64_t{sm_count(device)}, k_tiles * n_tiles), 1, row_tiles);
  const int64_t rows_per_block = ceil_div(row_tiles, wanted) * kTileRows;
  const dim3 grid(grid_dim(ceil_div(T, rows_per_block), kGridXLimit, op, "the weight gradient over rows"),
                  grid_dim(k_tiles, kGridYZLimit, op, "the weight gradient over features"),
                  grid_dim(n_tiles, kGridYZLimit, op, "the weight gradient over ranks"));
  segmented_outer_kernel<q_t, acc_t><<<grid, kOuterThreads, 0, stream_of(Q)>>>(
      N > 0 ? P.const_data_ptr<acc_t>() : nullptr, N > 0 ? P.size(1) : 0, N, ones_out != nullptr,
      Q.const_data_ptr<q_t>(), T, K, slots, slot_index_view(slot_index), rows_per_block, F, fs, fn, fk, coef,
      ones_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_h = scale[slot] u (null: not wanted), grad_scale[s] += sum_{t in s} u[t] . h[t] (null: not
// wanted; must start zeroed). U, H [T, R] (acc_t, contiguous), scale [S] (acc_t).
template <typename acc_t>
void launch_expand_backward_rows(const at::Tensor& U, const at::Tensor& H, const at::Tensor& scale, int64_t slots,
                                 const at::Tensor& slot_index, acc_t* grad_h, acc_t* grad_scale) {
  const int64_t T = U.size(0), R = U.size(1);
  if (T == 0 || (grad_h == nullptr && grad_scale == nullptr)) return;
  expand_backward_rows_kernel<acc_t><<<stride_blocks(ceil_div(T, kRowsThreads), 8, U.device().index()), kRowsThreads,
                                       0, stream_of(U)>>>(U.const_data_ptr<acc_t>(), H.const_data_ptr<acc_t>(), T, R,
                                                       scale.const_data_ptr<acc_t>(), slots,
                                                       slot_index_view(slot_index), grad_h, grad_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace torchlora::cuda::multi
