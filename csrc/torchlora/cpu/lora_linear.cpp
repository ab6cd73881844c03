// CPU kernels of lora_linear (functional and in-place).
//
// With dropout, the shrink s = dropout(x) @ A^T never materialises dropout(x): one parallel
// region (at::parallel_for over rows) masks each row of x into a thread-local row buffer and
// shrinks it at once. The expand is one BLAS GEMM with the scaling folded into alpha and the
// accumulation into beta, writing into base_out itself for the in-place op. The float32 [T, r]
// s is the only new activation kept for backward. Backward regenerates each row's mask once
// (the Philox stream of dropout_apply: element index = row-major index in the [T, in] view) and
// uses it for both grad_A (per-thread partial sums) and grad_x, again in one parallel region.
// Few parallel regions matter: each is a barrier, costly on a busy machine. float16/bfloat16
// compute in float32; float64 uses the ATen formula.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../detail/aten_math.h"
#include "../detail/checks.h"
#include "../detail/op_handles.h"
#include "../detail/philox_dropout.h"

namespace torchlora::cpu {
namespace {

struct DropoutMask {
  uint64_t key;
  uint32_t threshold;
  float scale;
};

DropoutMask make_mask(double p, const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu(), "torchlora.lora_linear: the seed for a CPU input must be on the CPU");
  const uint64_t threshold = detail::dropout_threshold(p);  // < 2^32 since p < 1
  return DropoutMask{static_cast<uint64_t>(seed.item<int64_t>()), static_cast<uint32_t>(threshold),
                     static_cast<float>(1.0 / (1.0 - p))};
}

constexpr int kQuadBatch = 8;

// Keep bytes of the 4 * kQuadBatch elements of quads q0 .. q0 + kQuadBatch - 1, scalar.
void keep_quad_batch_scalar(uint8_t* keep, uint64_t q0, uint64_t key, uint32_t threshold) {
  for (int j = 0; j < kQuadBatch; ++j) {
    const uint32_t bits = detail::keep_bits4(key, q0 + static_cast<uint64_t>(j), threshold);
    for (int lane = 0; lane < 4; ++lane) keep[4 * j + lane] = static_cast<uint8_t>((bits >> lane) & 1u);
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORCHLORA_HAVE_AVX2_PHILOX 1

// (hi, lo) of the eight 32 x 32 -> 64-bit products a[i] * m.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// The same Philox-4x32-10 as detail::philox4x32_10, eight counters at a time.
__attribute__((target("avx2"))) void keep_quad_batch_avx2(uint8_t* keep, uint64_t q0, uint64_t key,
                                                          uint32_t threshold) {
  alignas(32) uint32_t lo_words[kQuadBatch], hi_words[kQuadBatch];
  for (int j = 0; j < kQuadBatch; ++j) {
    const uint64_t q = q0 + static_cast<uint64_t>(j);
    lo_words[j] = static_cast<uint32_t>(q);
    hi_words[j] = static_cast<uint32_t>(q >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_words));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_words));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // word >= threshold (unsigned) <=> max(word, threshold) == word
  const __m256i t = _mm256_set1_epi32(static_cast<int>(threshold));
  alignas(32) uint32_t kept[4][kQuadBatch];
  const __m256i words[4] = {c0, c1, c2, c3};
  for (int lane = 0; lane < 4; ++lane) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(kept[lane]),
                       _mm256_cmpeq_epi32(_mm256_max_epu32(words[lane], t), words[lane]));
  }
  for (int j = 0; j < kQuadBatch; ++j) {
    for (int lane = 0; lane < 4; ++lane) keep[4 * j + lane] = static_cast<uint8_t>(kept[lane][j] & 1u);
  }
}
#endif

using KeepBatchFn = void (*)(uint8_t*, uint64_t, uint64_t, uint32_t);

KeepBatchFn keep_quad_batch() {
#ifdef TORCHLORA_HAVE_AVX2_PHILOX
  static const KeepBatchFn fn = __builtin_cpu_supports("avx2") ? &keep_quad_batch_avx2 : &keep_quad_batch_scalar;
  return fn;
#else
  return &keep_quad_batch_scalar;
#endif
}

// keep[i] = whether element first + i (row-major index over [T, in]) survives dropout.
void fill_keep(uint8_t* keep, int64_t first, int64_t count, const DropoutMask& m) {
  int64_t i = 0;
  auto scalar_quad = [&](uint64_t e) {  // elements e .. up to the next quad boundary
    const int lane = static_cast<int>(e & 3u);
    const uint32_t bits = detail::keep_bits4(m.key, e >> 2, m.threshold);
    const int64_t n = std::min<int64_t>(4 - lane, count - i);
    for (int64_t j = 0; j < n; ++j) keep[i + j] = static_cast<uint8_t>((bits >> (lane + j)) & 1u);
    i += n;
  };
  if ((first & 3) != 0 && count > 0) scalar_quad(static_cast<uint64_t>(first));
  const KeepBatchFn batch = keep_quad_batch();
  for (; i + 4 * kQuadBatch <= count; i += 4 * kQuadBatch) {
    batch(keep + i, static_cast<uint64_t>(first + i) >> 2, m.key, m.threshold);
  }
  while (i < count) scalar_quad(static_cast<uint64_t>(first + i));
}

// dst[i] = keep[i] ? src[i] * scale : 0, computed in acc_t (src and dst may alias).
template <typename src_t, typename dst_t>
void apply_keep(const src_t* src, dst_t* dst, const uint8_t* keep, int64_t count, float scale) {
  using acc_t = std::conditional_t<std::is_same_v<src_t, double> || std::is_same_v<dst_t, double>, double, float>;
  for (int64_t i = 0; i < count; ++i) {
    dst[i] = keep[i] ? static_cast<dst_t>(static_cast<acc_t>(src[i]) * scale) : static_cast<dst_t>(0);
  }
}

// Calls fn(scalar_t{}, cd_t{}) for the input dtype and its CPU compute dtype.
template <typename Fn>
void dispatch_input(at::ScalarType dtype, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "torchlora_lora_linear_cpu", [&] {
    using cd_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fn(scalar_t{}, cd_t{});
  });
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TORCHLORA_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define TORCHLORA_CPU_CLONES
#endif

// s[j] = sum_i x[i] * At[i, j] for one row; At = A^T [n, r] contiguous. Eight outputs at a
// time with four independent accumulators (fixed-width loops, so they vectorise).
TORCHLORA_CPU_CLONES
void shrink_row(const float* __restrict x, const float* __restrict At, int64_t n, int64_t r, float* __restrict s) {
  constexpr int W = 8;
  for (int64_t j0 = 0; j0 < r; j0 += W) {
    const int64_t width = std::min<int64_t>(W, r - j0);
    float acc[4][W] = {};
    if (width == W) {
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) {
        for (int u = 0; u < 4; ++u) {
          const float xi = x[i + u];
          const float* __restrict a = At + (i + u) * r + j0;
          for (int jj = 0; jj < W; ++jj) acc[u][jj] += xi * a[jj];
        }
      }
      for (; i < n; ++i) {
        const float* __restrict a = At + i * r + j0;
        for (int jj = 0; jj < W; ++jj) acc[0][jj] += x[i] * a[jj];
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t jj = 0; jj < width; ++jj) acc[0][jj] += x[i] * At[i * r + j0 + jj];
      }
    }
    for (int64_t jj = 0; jj < width; ++jj) s[j0 + jj] = (acc[0][jj] + acc[1][jj]) + (acc[2][jj] + acc[3][jj]);
  }
}

// y[:] = sum_j c[j] * M[j, :] for one row; M [r, n] contiguous (vectorised over n).
TORCHLORA_CPU_CLONES
void expand_row(const float* __restrict c, const float* __restrict M, int64_t r, int64_t n, float* __restrict y) {
  for (int64_t i = 0; i < n; ++i) y[i] = 0.f;
  for (int64_t j = 0; j < r; ++j) {
    const float cj = c[j];
    const float* __restrict m = M + j * n;
    for (int64_t i = 0; i < n; ++i) y[i] += cj * m[i];
  }
}

// acc[j, :] += c[j] * v[:] for j < r; acc [r, n] contiguous (vectorised over n).
TORCHLORA_CPU_CLONES
void accumulate_outer(float* __restrict acc, const float* __restrict c, const float* __restrict v, int64_t r,
                      int64_t n) {
  for (int64_t j = 0; j < r; ++j) {
    const float cj = c[j];
    float* __restrict a = acc + j * n;
    for (int64_t i = 0; i < n; ++i) a[i] += cj * v[i];
  }
}

// acc[j, :] += sum_u c[u * r + j] * v[u * n + :] over four rows u at once (a quarter of the
// passes over acc).
TORCHLORA_CPU_CLONES
void accumulate_outer4(float* __restrict acc, const float* __restrict c, const float* __restrict v, int64_t r,
                       int64_t n) {
  const float* __restrict v0 = v;
  const float* __restrict v1 = v + n;
  const float* __restrict v2 = v + 2 * n;
  const float* __restrict v3 = v + 3 * n;
  for (int64_t j = 0; j < r; ++j) {
    const float c0 = c[j], c1 = c[r + j], c2 = c[2 * r + j], c3 = c[3 * r + j];
    float* __restrict a = acc + j * n;
    for (int64_t i = 0; i < n; ++i) a[i] += (c0 * v0[i] + c1 * v1[i]) + (c2 * v2[i] + c3 * v3[i]);
  }
}

// Rows per chunk of the one parallel region of each fused kernel.
int64_t row_grain(int64_t in) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(in, 1)); }

// s = dropout(x2) @ A^T as float32 [T, r], one parallel region: each row is masked into a
// thread-local row buffer and shrunk at once (the dropped-out x never exists as a tensor).
at::Tensor shrink_dropout_float(const at::Tensor& x2, const at::Tensor& A_f, const DropoutMask& mask) {
  const at::Tensor xc = x2.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1), rank = A_f.size(0);
  at::Tensor shrunk = at::empty({tokens, rank}, A_f.options());
  if (tokens == 0) return shrunk;
  const at::Tensor At = A_f.t().contiguous();  // [in, r]
  const float* at_ptr = At.const_data_ptr<float>();
  float* s_ptr = shrunk.mutable_data_ptr<float>();
  at::parallel_for(0, tokens, row_grain(in), [&](int64_t t0, int64_t t1) {
    std::vector<float> row(static_cast<size_t>(in));
    std::vector<uint8_t> keep(static_cast<size_t>(in));
    for (int64_t t = t0; t < t1; ++t) {
      fill_keep(keep.data(), t * in, in, mask);
      dispatch_input(xc.scalar_type(), [&](auto xv, auto) {
        using x_t = decltype(xv);
        apply_keep(xc.const_data_ptr<x_t>() + t * in, row.data(), keep.data(), in, mask.scale);
      });
      shrink_row(row.data(), at_ptr, in, rank, s_ptr + t * rank);
    }
  });
  return shrunk;
}

// s = dropout(x2) @ A^T in the compute dtype. Float compute takes the fused row kernel; float64
// takes the ATen formula.
at::Tensor shrink(const at::Tensor& x2, const at::Tensor& A_cd, double dropout_p,
                  const std::optional<at::Tensor>& seed) {
  const auto cd = A_cd.scalar_type();
  if (dropout_p == 0.0) return at::mm(x2.to(cd), A_cd.t());
  if (cd == at::kFloat) return shrink_dropout_float(x2, A_cd, make_mask(dropout_p, *seed));
  return at::mm(detail::dropout_apply_op().call(x2, dropout_p, *seed).to(cd), A_cd.t());
}

struct LinearInputs {
  int64_t tokens, in, rank, out;
  at::ScalarType cd;
  at::Tensor x2, A_cd, B_cd;
};

LinearInputs prepare(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, double scaling,
                     double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto dims = detail::check_lora_linear(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  LinearInputs in;
  in.tokens = dims.tokens.expect_int();
  in.in = dims.in_features.expect_int();
  in.rank = dims.rank.expect_int();
  in.out = dims.out_features.expect_int();
  in.cd = detail::compute_dtype(x);
  in.x2 = x.reshape({in.tokens, in.in});
  in.A_cd = lora_A.to(in.cd);
  in.B_cd = lora_B.to(in.cd);
  return in;
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto in = prepare(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  const at::Tensor shrunk = shrink(in.x2, in.A_cd, dropout_p, seed);
  at::Tensor base2 = base_out.reshape({in.tokens, in.out});
  at::Tensor out2;
  if (base_out.scalar_type() == in.cd) {
    if (lora_bias.has_value() && lora_bias->defined()) base2 = base2.add(*lora_bias, scaling);
    out2 = at::addmm(base2, shrunk, in.B_cd.t(), 1.0, scaling);  // one pass over base_out
  } else {
    at::Tensor delta = at::mm(shrunk, in.B_cd.t());
    if (lora_bias.has_value() && lora_bias->defined()) delta.add_(lora_bias->to(in.cd));
    out2 = detail::accumulate_into_base(base2, delta, scaling);
  }
  return {out2.view(base_out.sizes()), shrunk.to(at::kFloat)};
}

at::Tensor lora_linear_forward_inplace_cpu(
    at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto in = prepare(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  const at::Tensor shrunk = shrink(in.x2, in.A_cd, dropout_p, seed);  // before base_out changes (x may alias it)
  detail::expand_into_base_(base_out, shrunk, in.B_cd, lora_bias, scaling);
  return shrunk.to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrunk, const at::Tensor& lora_A,
    const at::Tensor& lora_B, bool has_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 3> output_mask) {
  if (dropout_p == 0.0 || detail::compute_dtype(x) != at::kFloat) {
    // Without dropout the ATen path is already one GEMM per gradient; float64 takes it too.
    return detail::lora_linear_backward_aten(grad_out, x, shrunk, lora_A, lora_B, has_bias, scaling, dropout_p,
                                             seed, output_mask);
  }
  constexpr const char* op = "torchlora._lora_linear_backward";
  const int64_t in = lora_A.size(1), rank = lora_A.size(0), out_features = lora_B.size(0);
  TORCH_CHECK(shrunk.dim() == 2 && shrunk.size(1) == rank, op, ": shrunk must be [T, ", rank, "], got ",
              shrunk.sizes());
  const int64_t tokens = shrunk.size(0);
  TORCH_CHECK(grad_out.numel() == tokens * out_features, op, ": grad_out has ", grad_out.numel(),
              " elements, expected ", tokens, " x ", out_features);
  TORCH_CHECK(x.numel() == tokens * in, op, ": x has ", x.numel(), " elements, expected ", tokens, " x ", in);
  detail::check_dropout(dropout_p, seed, x.device(), op);
  const DropoutMask mask = make_mask(dropout_p, *seed);
  const auto cd = at::kFloat;
  const auto cd_opts = x.options().dtype(cd);
  const at::Tensor g2 = grad_out.reshape({tokens, out_features}).to(cd);
  const at::Tensor A_cd = lora_A.to(cd).contiguous();
  const at::Tensor none = at::empty({0}, x.options());
  at::Tensor grad_x = none, grad_A = none, grad_B = none, grad_bias = none;

  if (output_mask[2]) grad_B = at::mm(g2.t(), shrunk.to(cd)).mul_(scaling).to(lora_B.scalar_type());
  if (has_bias) grad_bias = at::sum(g2, {0}).mul_(scaling).to(lora_B.scalar_type());
  if (!(output_mask[0] || output_mask[1])) return {grad_x, grad_A, grad_B, grad_bias};

  const at::Tensor grad_s = at::mm(g2, lora_B.to(cd)).mul_(scaling).contiguous();  // [T, r]
  const at::Tensor x2 = x.reshape({tokens, in}).contiguous();
  const bool want_x = output_mask[0], want_A = output_mask[1];
  if (want_x) grad_x = at::empty({tokens, in}, x.options().memory_format(at::MemoryFormat::Contiguous));
  // One [r, in] partial sum of grad_A per thread, added up in thread order (deterministic).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor partial_A = want_A ? at::zeros({threads, rank, in}, cd_opts) : at::Tensor();
  const float* gs_ptr = grad_s.const_data_ptr<float>();
  const float* a_ptr = A_cd.const_data_ptr<float>();
  const bool grad_x_is_float = x.scalar_type() == at::kFloat;

  // One parallel region: per row, the mask is regenerated once and serves grad_A and grad_x.
  at::parallel_for(0, tokens, row_grain(in), [&](int64_t t0, int64_t t1) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
    float* acc = want_A ? partial_A.mutable_data_ptr<float>() + tid * rank * in : nullptr;
    constexpr int64_t kGroup = 4;  // rows masked together, so grad_A takes four rows per pass
    std::vector<float> rows(static_cast<size_t>(kGroup * in));
    std::vector<uint8_t> keep(static_cast<size_t>(kGroup * in));
    for (int64_t g0 = t0; g0 < t1; g0 += kGroup) {
      const int64_t group = std::min(kGroup, t1 - g0);
      fill_keep(keep.data(), g0 * in, group * in, mask);
      if (want_A) {
        dispatch_input(x2.scalar_type(), [&](auto xv, auto) {
          using x_t = decltype(xv);
          apply_keep(x2.const_data_ptr<x_t>() + g0 * in, rows.data(), keep.data(), group * in, mask.scale);
        });
        if (group == kGroup) {
          accumulate_outer4(acc, gs_ptr + g0 * rank, rows.data(), rank, in);
        } else {
          for (int64_t u = 0; u < group; ++u) accumulate_outer(acc, gs_ptr + (g0 + u) * rank, rows.data() + u * in, rank, in);
        }
      }
      if (!want_x) continue;
      for (int64_t u = 0; u < group; ++u) {
        const int64_t t = g0 + u;
        float* target = grad_x_is_float ? grad_x.mutable_data_ptr<float>() + t * in : rows.data() + u * in;
        expand_row(gs_ptr + t * rank, a_ptr, rank, in, target);
        dispatch_input(x.scalar_type(), [&](auto xv, auto) {  // grad of the dropped-out input
          using x_t = decltype(xv);
          apply_keep(target, grad_x.mutable_data_ptr<x_t>() + t * in, keep.data() + u * in, in, mask.scale);
        });
      }
    }
  });
  if (want_A) grad_A = (threads == 1 ? partial_A.select(0, 0) : at::sum(partial_A, {0})).to(lora_A.scalar_type());
  if (want_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_A, grad_B, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("_lora_linear_forward", &lora_linear_forward_cpu);
  m.impl("_lora_linear_forward_", &lora_linear_forward_inplace_cpu);
  m.impl("_lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace torchlora::cpu
