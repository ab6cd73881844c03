// The low-rank kernels of the linear and embedding ops, for runtime shapes (T tokens, rank R,
// any feature sizes) and float32 / float16 / bfloat16 data; all accumulate in float32.
//
//   shrink        P[split, t, r] = alpha * sum_k keep(t*K+k) * X[t, k] * W[r, k]     (k in the split)
//   expand        out[t, c] = base[t, c] + alpha * keep(t*C+c) * (sum_r S[t, r] W[c, r] + bias[c])
//   column reduce P[split, r, c] = sum_t keep(t*C+c) * G[t, c] * S[t, r]             (t in the split)
//   finalize      out[c, r] = alpha * sum_split P[split, r, c], in the weight's dtype
//
// W is addressed through two strides, so one kernel serves A [R, K] and B [N, R] either way
// round. Long reductions are split over the grid and summed in a fixed order (deterministic).
// Everything here has internal linkage: each .cu that includes it gets its own copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include "lora_kernels_common.cuh"

namespace torchlora::cuda {
namespace {

constexpr int kRankTile = 16;  // ranks per block in shrink / column reduce (a grid dimension covers the rest)

// ---- shrink: 8 warps x 4 tokens per block; a lane reads 4 consecutive features per chunk.
constexpr int kShrinkThreads = 256;
constexpr int kShrinkTokensPerWarp = 4;
constexpr int kShrinkTokens = (kShrinkThreads / 32) * kShrinkTokensPerWarp;  // 32
constexpr int kShrinkChunk = 128;                                            // 32 lanes x 4 features

template <typename scalar_t>
__global__ void __launch_bounds__(kShrinkThreads)
    lowrank_shrink_kernel(const scalar_t* __restrict__ X,  // [T, K] contiguous
                          int64_t T, int64_t K,
                          const scalar_t* __restrict__ W,  // W[r, k] = W[r * w_stride_r + k * w_stride_k]
                          int64_t w_stride_r, int64_t w_stride_k, int64_t R,
                          float* __restrict__ partial,  // [splits, T, R]
                          int64_t k_per_split, float alpha, DropoutParams dropout) {
  // +4 floats per row: rows stay 16-byte aligned and the transposed fill has few bank conflicts
  __shared__ __align__(16) float w_s[kRankTile][kShrinkChunk + 4];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t t_first = static_cast<int64_t>(blockIdx.x) * kShrinkTokens + warp * kShrinkTokensPerWarp;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * k_per_split;
  const int64_t k_end = min64(K, k_begin + k_per_split);
  const uint64_t key = dropout.enabled ? dropout_key(dropout) : 0;
  const bool w_k_contiguous = w_stride_k == 1;
  const bool warp_active = t_first < T;  // warp-uniform

  float acc[kShrinkTokensPerWarp][kRankTile];
#pragma unroll
  for (int i = 0; i < kShrinkTokensPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < kRankTile; ++r) acc[i][r] = 0.f;

  for (int64_t kc = k_begin; kc < k_end; kc += kShrinkChunk) {
    // This chunk's features of the warp's tokens, read (raw) before the barriers so the reads
    // are in flight while the block fills w_s; converted and masked after.
    const int64_t k = kc + 4 * lane;  // this lane's first feature
    scalar_t xr[kShrinkTokensPerWarp][4];
    uint32_t keep[kShrinkTokensPerWarp];
#pragma unroll
    for (int i = 0; i < kShrinkTokensPerWarp; ++i) {
      const int64_t t = t_first + i;
      keep[i] = 0xFu;
#pragma unroll
      for (int j = 0; j < 4; ++j) xr[i][j] = static_cast<scalar_t>(0.f);
      if (t < T) {
        const scalar_t* row = X + t * K;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (k + j < k_end) xr[i][j] = row[k + j];
        }
        if (dropout.enabled) keep[i] = keep_bits_run4(key, static_cast<uint64_t>(t * K + k), dropout.threshold);
      }
    }
    __syncthreads();  // the previous chunk's readers are done with w_s
#pragma unroll
    for (int idx = tid; idx < kRankTile * kShrinkChunk; idx += kShrinkThreads) {
      // walk the weight along its contiguous dimension so the global reads coalesce
      const int r = w_k_contiguous ? idx / kShrinkChunk : idx % kRankTile;
      const int kk = w_k_contiguous ? idx % kShrinkChunk : idx / kRankTile;
      const int64_t gr = r0 + r, gk = kc + kk;
      w_s[r][kk] = (gr < R && gk < k_end) ? static_cast<float>(W[gr * w_stride_r + gk * w_stride_k]) : 0.f;
    }
    __syncthreads();
    if (warp_active) {
      float xv[kShrinkTokensPerWarp][4];
#pragma unroll
      for (int i = 0; i < kShrinkTokensPerWarp; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[i][j] = ((keep[i] >> j) & 1u) ? static_cast<float>(xr[i][j]) : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kRankTile; ++r) {
        const float4 w = *reinterpret_cast<const float4*>(&w_s[r][4 * lane]);
#pragma unroll
        for (int i = 0; i < kShrinkTokensPerWarp; ++i) {
          acc[i][r] += xv[i][0] * w.x + xv[i][1] * w.y + xv[i][2] * w.z + xv[i][3] * w.w;
        }
      }
    }
  }
  if (!warp_active) return;  // no barrier follows
#pragma unroll
  for (int i = 0; i < kShrinkTokensPerWarp; ++i) {
#pragma unroll
    for (int r = 0; r < kRankTile; ++r) {
      float v = acc[i][r];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      acc[i][r] = v;
    }
  }
  if (lane != 0) return;
#pragma unroll
  for (int i = 0; i < kShrinkTokensPerWarp; ++i) {
    const int64_t t = t_first + i;
    if (t >= T) break;
#pragma unroll
    for (int r = 0; r < kRankTile; ++r) {
      if (r0 + r < R) partial[(split * T + t) * R + r0 + r] = alpha * acc[i][r];
    }
  }
}

// ---- expand: 128 threads x 4 consecutive columns, 16 tokens per block, ranks in chunks of 16.
constexpr int kExpandThreads = 128;
constexpr int kExpandCols = 4 * kExpandThreads;  // 512
constexpr int kExpandTokens = 16;
constexpr int kExpandRankChunk = 16;

// Where row t of the [T, R] low-rank activations S comes from: float32 partial sums (summed on
// load), or a gather S[t, r] = table[r * table_stride_r + ids[t] * table_stride_v] (embedding).
template <typename scalar_t>
struct LowRankSource {
  const float* partial = nullptr;  // [splits, T, R]
  int64_t splits = 1;
  const scalar_t* table = nullptr;
  int64_t table_stride_r = 0, table_stride_v = 0, table_rows = 0;
  const int64_t* ids64 = nullptr;
  const int32_t* ids32 = nullptr;
  float* write_back = nullptr;  // [T, R] float32: the loaded S, written by the blocks of column tile 0
};

template <typename scalar_t>
__device__ __forceinline__ float load_lowrank(const LowRankSource<scalar_t>& src, int64_t T, int64_t R, int64_t t,
                                              int64_t r) {
  if (src.table != nullptr) {
    const int64_t id = src.ids64 != nullptr ? src.ids64[t] : static_cast<int64_t>(src.ids32[t]);
    CUDA_KERNEL_ASSERT(id >= 0 && id < src.table_rows);
    if (id < 0 || id >= src.table_rows) return 0.f;  // never read out of bounds
    return static_cast<float>(src.table[r * src.table_stride_r + id * src.table_stride_v]);
  }
  float v = 0.f;
  for (int64_t s = 0; s < src.splits; ++s) v += src.partial[(s * T + t) * R + r];
  return v;
}

// out and base are not __restrict__: out may alias base (each element is read, then written,
// by the same thread).
template <typename scalar_t>
__global__ void __launch_bounds__(kExpandThreads)
    lowrank_expand_kernel(scalar_t* out,         // [T, C] contiguous
                          const scalar_t* base,  // [T, C] contiguous, or null
                          int64_t T, int64_t C, LowRankSource<scalar_t> src, int64_t R,
                          const scalar_t* __restrict__ W,  // W[c, r] = W[c * w_stride_c + r * w_stride_r]
                          int64_t w_stride_c, int64_t w_stride_r,
                          const scalar_t* __restrict__ bias,  // [C] or null
                          float alpha, DropoutParams dropout) {
  __shared__ __align__(16) float w_s[kExpandRankChunk][kExpandCols + 4];
  __shared__ __align__(16) float s_s[kExpandTokens][kExpandRankChunk];
  const int tid = threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kExpandTokens;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kExpandCols;
  const int64_t c = c0 + 4 * tid;  // this thread's first column
  const bool write_back = src.write_back != nullptr && blockIdx.y == 0;
  const bool w_c_contiguous = w_stride_c == 1;

  float acc[kExpandTokens][4];
#pragma unroll
  for (int tt = 0; tt < kExpandTokens; ++tt)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[tt][j] = 0.f;

  for (int64_t rc = 0; rc < R; rc += kExpandRankChunk) {
    __syncthreads();  // the previous chunk's readers are done with w_s / s_s
#pragma unroll 4
    for (int idx = tid; idx < kExpandRankChunk * kExpandCols; idx += kExpandThreads) {
      const int r = w_c_contiguous ? idx / kExpandCols : idx % kExpandRankChunk;
      const int cc = w_c_contiguous ? idx % kExpandCols : idx / kExpandRankChunk;
      const int64_t gr = rc + r, gc = c0 + cc;
      w_s[r][cc] = (gr < R && gc < C) ? static_cast<float>(W[gc * w_stride_c + gr * w_stride_r]) : 0.f;
    }
    for (int idx = tid; idx < kExpandTokens * kExpandRankChunk; idx += kExpandThreads) {
      const int tt = idx / kExpandRankChunk, r = idx % kExpandRankChunk;
      const int64_t gt = t0 + tt, gr = rc + r;
      float v = 0.f;
      if (gt < T && gr < R) {
        v = load_lowrank(src, T, R, gt, gr);
        if (write_back) src.write_back[gt * R + gr] = v;
      }
      s_s[tt][r] = v;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kExpandRankChunk; r += 4) {
      float4 w[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) w[q] = *reinterpret_cast<const float4*>(&w_s[r + q][4 * tid]);
#pragma unroll
      for (int tt = 0; tt < kExpandTokens; ++tt) {
        const float4 s = *reinterpret_cast<const float4*>(&s_s[tt][r]);
        acc[tt][0] += s.x * w[0].x + s.y * w[1].x + s.z * w[2].x + s.w * w[3].x;
        acc[tt][1] += s.x * w[0].y + s.y * w[1].y + s.z * w[2].y + s.w * w[3].y;
        acc[tt][2] += s.x * w[0].z + s.y * w[1].z + s.z * w[2].z + s.w * w[3].z;
        acc[tt][3] += s.x * w[0].w + s.y * w[1].w + s.z * w[2].w + s.w * w[3].w;
      }
    }
  }
  if (c >= C) return;  // no barrier follows
  float b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = (bias != nullptr && c + j < C) ? static_cast<float>(bias[c + j]) : 0.f;
  const uint64_t key = dropout.enabled ? dropout_key(dropout) : 0;
  // Every read of base comes before the first store: the reads can all be in flight at once
  // (out may alias base, so a store would otherwise order the next read behind it).
#pragma unroll
  for (int tt = 0; tt < kExpandTokens; ++tt) {
    const int64_t gt = t0 + tt;
    if (gt >= T) break;
    const int64_t row = gt * C;
    const uint32_t keep =
        dropout.enabled ? keep_bits_run4(key, static_cast<uint64_t>(row + c), dropout.threshold) : 0xFu;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float v = ((keep >> j) & 1u) ? alpha * (acc[tt][j] + b[j]) : 0.f;
      if (base != nullptr && c + j < C) v += static_cast<float>(base[row + c + j]);
      acc[tt][j] = v;
    }
  }
#pragma unroll
  for (int tt = 0; tt < kExpandTokens; ++tt) {
    const int64_t gt = t0 + tt;
    if (gt >= T) break;
    const int64_t row = gt * C;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c + j < C) out[row + c + j] = static_cast<scalar_t>(acc[tt][j]);
    }
  }
}

// ---- column reduce: 128 threads x 4 consecutive columns, tokens staged 32 at a time.
constexpr int kReduceThreads = 128;
constexpr int kReduceCols = 4 * kReduceThreads;  // 512
constexpr int kReduceTokenChunk = 32;

// With ones_column, S gets an extra column R of ones, so partial row R is the column sum of G
// (the bias gradient); it is never combined with dropout.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    lowrank_column_reduce_kernel(const scalar_t* __restrict__ G,  // [T, C] contiguous
                                 int64_t T, int64_t C,
                                 const float* __restrict__ S,  // [T, R] contiguous
                                 int64_t R, bool ones_column,
                                 float* __restrict__ partial,  // [splits, R + ones_column, C]
                                 int64_t t_per_split, DropoutParams dropout) {
  __shared__ __align__(16) float s_s[kReduceTokenChunk][kRankTile];
  const int tid = threadIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kReduceCols + 4 * tid;
  const int64_t split = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * kRankTile;
  const int64_t r_total = R + (ones_column ? 1 : 0);
  const int64_t t_begin = split * t_per_split;
  const int64_t t_end = min64(T, t_begin + t_per_split);
  const uint64_t key = dropout.enabled ? dropout_key(dropout) : 0;

  float acc[kRankTile][4];
#pragma unroll
  for (int r = 0; r < kRankTile; ++r)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[r][j] = 0.f;

  for (int64_t tc = t_begin; tc < t_end; tc += kReduceTokenChunk) {
    __syncthreads();  // the previous chunk's readers are done with s_s
    for (int idx = tid; idx < kReduceTokenChunk * kRankTile; idx += kReduceThreads) {
      const int tt = idx / kRankTile, r = idx % kRankTile;
      const int64_t gt = tc + tt, gr = r0 + r;
      float v = 0.f;
      if (gt < t_end) {
        if (gr < R) {
          v = S[gt * R + gr];
        } else if (ones_column && gr == R) {
          v = 1.f;
        }
      }
      s_s[tt][r] = v;
    }
    __syncthreads();
    if (c < C) {
      const int tokens = static_cast<int>(min64(kReduceTokenChunk, t_end - tc));
#pragma unroll 8
      for (int tt = 0; tt < tokens; ++tt) {  // unrolled: the reads of several tokens in flight
        const int64_t row = (tc + tt) * C;
        float g[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) g[j] = (c + j < C) ? static_cast<float>(G[row + c + j]) : 0.f;
        if (dropout.enabled) {
          const uint32_t keep = keep_bits_run4(key, static_cast<uint64_t>(row + c), dropout.threshold);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (!((keep >> j) & 1u)) g[j] = 0.f;
          }
        }
#pragma unroll
        for (int r = 0; r < kRankTile; r += 4) {
          const float4 s = *reinterpret_cast<const float4*>(&s_s[tt][r]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[r][j] += s.x * g[j];
            acc[r + 1][j] += s.y * g[j];
            acc[r + 2][j] += s.z * g[j];
            acc[r + 3][j] += s.w * g[j];
          }
        }
      }
    }
  }
  if (c >= C) return;
#pragma unroll
  for (int r = 0; r < kRankTile; ++r) {
    const int64_t gr = r0 + r;
    if (gr >= r_total) break;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c + j < C) partial[(split * r_total + gr) * C + c + j] = acc[r][j];
    }
  }
}

// out[c * out_stride_c + r * out_stride_r] = alpha * sum_split P[split, r, c] for r < R; row R
// (the ones column) goes to ones_out[c]. Either output may be null.
template <typename out_t>
__global__ void finalize_column_reduce_kernel(const float* __restrict__ partial, int64_t splits, int64_t R,
                                              int64_t r_total, int64_t C, float alpha, out_t* __restrict__ out,
                                              int64_t out_stride_c, int64_t out_stride_r,
                                              out_t* __restrict__ ones_out) {
  const int64_t n = r_total * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int64_t s = 0; s < splits; ++s) v += partial[s * n + i];
    v *= alpha;
    const int64_t r = i / C, c = i % C;
    if (r < R) {
      if (out != nullptr) out[c * out_stride_c + r * out_stride_r] = static_cast<out_t>(v);
    } else if (ones_out != nullptr) {
      ones_out[c] = static_cast<out_t>(v);
    }
  }
}

// out[i] = sum_split P[split, i]
__global__ void sum_partials_kernel(const float* __restrict__ partial, int64_t splits, int64_t n,
                                    float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int64_t s = 0; s < splits; ++s) v += partial[s * n + i];
    out[i] = v;
  }
}

// ---- host launchers (current stream; the caller holds the CUDAGuard) -----------------------

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline unsigned elementwise_blocks(int64_t n, int threads, int device) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(n, threads), 1, 8 * int64_t{sm_count(device)}));
}

// Partial sums [splits, T, R] (float32) of alpha * keep(X) W^T over the splits of K.
// X [T, K] contiguous, W of X's dtype addressed as W[r, k]. splits == 1: the final result.
inline at::Tensor launch_shrink(const at::Tensor& X, const at::Tensor& W, int64_t w_stride_r, int64_t w_stride_k,
                                int64_t R, float alpha, const DropoutParams& dropout, const char* op) {
  const int64_t T = X.size(0), K = X.size(1);
  const int device = X.device().index();
  const int64_t token_blocks = ceil_div(T, kShrinkTokens), rank_tiles = ceil_div(R, kRankTile);
  const SplitPlan plan = plan_split(token_blocks * rank_tiles, K, kShrinkChunk, 64, device);
  at::Tensor partial = at::empty({plan.splits, T, R}, X.options().dtype(at::kFloat));
  const dim3 grid(grid_dim(token_blocks, kGridXLimit, op, "the shrink over tokens"),
                  grid_dim(rank_tiles, kGridYZLimit, op, "the shrink over ranks"),
                  grid_dim(plan.splits, kGridYZLimit, op, "the shrink over features"));
  const cudaStream_t stream = current_stream(X);
  dispatch_kernel_dtype(X.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    lowrank_shrink_kernel<scalar_t><<<grid, kShrinkThreads, 0, stream>>>(
        X.const_data_ptr<scalar_t>(), T, K, W.const_data_ptr<scalar_t>(), w_stride_r, w_stride_k, R,
        partial.mutable_data_ptr<float>(), plan.per_split, alpha, dropout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial;
}

// out [T, C] = base + alpha * keep (S W^T + bias), S from `src`; out, base, W, bias of one dtype.
template <typename scalar_t>
void launch_expand(const at::Tensor& out, const at::Tensor* base, const LowRankSource<scalar_t>& src, int64_t R,
                   const at::Tensor& W, int64_t w_stride_c, int64_t w_stride_r, const at::Tensor* bias, float alpha,
                   const DropoutParams& dropout, const char* op) {
  const int64_t T = out.size(0), C = out.size(1);
  const dim3 grid(grid_dim(ceil_div(T, kExpandTokens), kGridXLimit, op, "the expand over tokens"),
                  grid_dim(ceil_div(C, kExpandCols), kGridYZLimit, op, "the expand over features"));
  lowrank_expand_kernel<scalar_t><<<grid, kExpandThreads, 0, current_stream(out)>>>(
      out.mutable_data_ptr<scalar_t>(), base != nullptr ? base->const_data_ptr<scalar_t>() : nullptr, T, C, src, R,
      W.const_data_ptr<scalar_t>(), w_stride_c, w_stride_r,
      bias != nullptr ? bias->const_data_ptr<scalar_t>() : nullptr, alpha, dropout);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
LowRankSource<scalar_t> partial_source(const at::Tensor& partial, float* write_back) {
  LowRankSource<scalar_t> src;
  src.partial = partial.const_data_ptr<float>();
  src.splits = partial.size(0);
  src.write_back = write_back;
  return src;
}

// [T, R] float32 sum of the partials (a view of them when there is one split).
inline at::Tensor reduce_partials(const at::Tensor& partial) {
  const int64_t splits = partial.size(0), T = partial.size(1), R = partial.size(2);
  if (splits == 1) return partial.view({T, R});
  at::Tensor out = at::empty({T, R}, partial.options());
  const int64_t n = T * R;
  constexpr int threads = 256;
  sum_partials_kernel<<<elementwise_blocks(n, threads, partial.device().index()), threads, 0,
                        current_stream(partial)>>>(partial.const_data_ptr<float>(), splits, n,
                                                   out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out[c, r] (through out_stride_c / out_stride_r) = alpha * sum_t keep(G)[t, c] S[t, r], and with
// ones_out also ones_out[c] = alpha * sum_t G[t, c]. G [T, C] contiguous of the outputs' dtype;
// S [T, R] float32 contiguous. `out` may be undefined when only ones_out is wanted.
inline void launch_column_reduce(const at::Tensor& G, const at::Tensor& S, float alpha, const DropoutParams& dropout,
                                 const at::Tensor& out, int64_t out_stride_c, int64_t out_stride_r,
                                 const at::Tensor* ones_out, const char* op) {
  TORCH_CHECK(!(ones_out != nullptr && dropout.enabled), op, ": a column sum under dropout is not supported");
  const int64_t T = G.size(0), C = G.size(1), R = S.size(1);
  const bool ones_column = ones_out != nullptr;
  const int64_t r_total = R + (ones_column ? 1 : 0);
  const int device = G.device().index();
  const int64_t col_blocks = ceil_div(C, kReduceCols), rank_tiles = ceil_div(r_total, kRankTile);
  const SplitPlan plan = plan_split(col_blocks * rank_tiles, T, kReduceTokenChunk, 128, device);
  at::Tensor partial = at::empty({plan.splits, r_total, C}, G.options().dtype(at::kFloat));
  const dim3 grid(grid_dim(col_blocks, kGridXLimit, op, "the weight gradient over features"),
                  grid_dim(plan.splits, kGridYZLimit, op, "the weight gradient over tokens"),
                  grid_dim(rank_tiles, kGridYZLimit, op, "the weight gradient over ranks"));
  const cudaStream_t stream = current_stream(G);
  dispatch_kernel_dtype(G.scalar_type(), op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    lowrank_column_reduce_kernel<scalar_t><<<grid, kReduceThreads, 0, stream>>>(
        G.const_data_ptr<scalar_t>(), T, C, S.const_data_ptr<float>(), R, ones_column,
        partial.mutable_data_ptr<float>(), plan.per_split, dropout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int threads = 256;
    finalize_column_reduce_kernel<scalar_t><<<elementwise_blocks(r_total * C, threads, device), threads, 0, stream>>>(
        partial.const_data_ptr<float>(), plan.splits, R, r_total, C, alpha,
        out.defined() ? out.mutable_data_ptr<scalar_t>() : nullptr, out_stride_c, out_stride_r,
        ones_column ? ones_out->mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace torchlora::cuda
