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

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TORCHLORA_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define TORCHLORA_CPU_CLONES
#endif

// The float32 case of apply_keep, written as a select so that it vectorises.
TORCHLORA_CPU_CLONES
void apply_keep_f32(const float* src, float* dst, const uint8_t* keep, int64_t count, float scale) {
  for (int64_t i = 0; i < count; ++i) {
    const float kept = src[i] * scale;
    dst[i] = keep[i] != 0 ? kept : 0.f;
  }
}

template <>
void apply_keep<float, float>(const float* src, float* dst, const uint8_t* keep, int64_t count, float scale) {
  apply_keep_f32(src, dst, keep, count, scale);
}

// Calls fn(scalar_t{}, cd_t{}) for the input dtype and its CPU compute dtype.
template <typename Fn>
void dispatch_input(at::ScalarType dtype, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "torchlora_lora_linear_cpu", [&] {
    using cd_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fn(scalar_t{}, cd_t{});
  });
}


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

// y_u[:] += sum_j c[u * r + j] * M[j, :] for `rows` (<= 4) rows u of y (stride n); M [r, n].
TORCHLORA_CPU_CLONES
void expand_accumulate(float* __restrict y, const float* __restrict c, const float* __restrict M, int64_t rows,
                       int64_t r, int64_t n) {
  if (rows == 4) {
    float* __restrict y0 = y;
    float* __restrict y1 = y + n;
    float* __restrict y2 = y + 2 * n;
    float* __restrict y3 = y + 3 * n;
    for (int64_t j = 0; j < r; ++j) {
      const float c0 = c[j], c1 = c[r + j], c2 = c[2 * r + j], c3 = c[3 * r + j];
      const float* __restrict m = M + j * n;
      for (int64_t i = 0; i < n; ++i) {
        const float mi = m[i];
        y0[i] += c0 * mi;
        y1[i] += c1 * mi;
        y2[i] += c2 * mi;
        y3[i] += c3 * mi;
      }
    }
    return;
  }
  for (int64_t u = 0; u < rows; ++u) {
    for (int64_t j = 0; j < r; ++j) {
      const float cj = c[u * r + j];
      const float* __restrict m = M + j * n;
      float* __restrict yu = y + u * n;
      for (int64_t i = 0; i < n; ++i) yu[i] += cj * m[i];
    }
  }
}

constexpr int64_t kGroup = 4;  // rows handled together: each pass over a weight serves four rows

// Rows per chunk of the one parallel region of each fused kernel (a multiple of kGroup).
int64_t row_grain(int64_t in) {
  return kGroup * std::max<int64_t>(1, 8192 / std::max<int64_t>(in, 1));
}

// Rows [g0, g0 + rows) of x as float32: dropout-masked and scaled into buf (keep filled), or
// converted into buf, or x itself when it is float32 and no dropout applies.
const float* float_rows(const at::Tensor& xc, int64_t g0, int64_t rows, const DropoutMask* mask, uint8_t* keep,
                        float* buf) {
  const int64_t in = xc.size(1);
  if (mask != nullptr) {
    fill_keep(keep, g0 * in, rows * in, *mask);
    dispatch_input(xc.scalar_type(), [&](auto xv, auto) {
      using x_t = decltype(xv);
      apply_keep(xc.const_data_ptr<x_t>() + g0 * in, buf, keep, rows * in, mask->scale);
    });
    return buf;
  }
  if (xc.scalar_type() == at::kFloat) return xc.const_data_ptr<float>() + g0 * in;
  dispatch_input(xc.scalar_type(), [&](auto xv, auto) {
    using x_t = decltype(xv);
    const x_t* src = xc.const_data_ptr<x_t>() + g0 * in;
    for (int64_t i = 0; i < rows * in; ++i) buf[i] = static_cast<float>(src[i]);
  });
  return buf;
}

// The fused float32 forward, one parallel region over rows: s = dropout(x) @ A^T per row from a
// thread-local row buffer, then, when `out` is defined (float32, contiguous [T, out]),
// out = base + scaling * (s @ B^T + bias) written row by row (out may be base itself: in place).
// Returns s [T, r] float32.
at::Tensor fused_forward_float(const at::Tensor& x2, const at::Tensor& A, const at::Tensor& B,
                               const std::optional<at::Tensor>& lora_bias, double scaling,
                               const DropoutMask* mask, const at::Tensor& base, at::Tensor out) {
  const at::Tensor xc = x2.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1), rank = A.size(0);
  const auto f32 = xc.options().dtype(at::kFloat);
  at::Tensor shrunk = at::empty({tokens, rank}, f32);
  if (tokens == 0) return shrunk;
  const at::Tensor At = A.to(at::kFloat).t().contiguous();  // [in, r]
  const bool expand = out.defined();
  const int64_t out_features = B.size(0);
  const at::Tensor Bt = expand ? B.to(at::kFloat).t().contiguous() : at::Tensor();  // [r, out]
  const at::Tensor bias = expand && lora_bias.has_value() && lora_bias->defined()
                              ? lora_bias->to(at::kFloat).mul(scaling).contiguous()
                              : at::Tensor();
  const float* at_ptr = At.const_data_ptr<float>();
  float* s_ptr = shrunk.mutable_data_ptr<float>();
  const float scale = static_cast<float>(scaling);
  at::parallel_for(0, tokens, row_grain(in), [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(static_cast<size_t>(kGroup * in));
    std::vector<uint8_t> keep(mask != nullptr ? static_cast<size_t>(kGroup * in) : 0);
    float scaled[kGroup * 64];
    std::vector<float> scaled_big(rank > 64 ? static_cast<size_t>(kGroup * rank) : 0);
    float* c = rank > 64 ? scaled_big.data() : scaled;
    for (int64_t g0 = t0; g0 < t1; g0 += kGroup) {
      const int64_t rows = std::min(kGroup, t1 - g0);
      const float* xr = float_rows(xc, g0, rows, mask, keep.data(), buf.data());
      for (int64_t u = 0; u < rows; ++u) shrink_row(xr + u * in, at_ptr, in, rank, s_ptr + (g0 + u) * rank);
      if (!expand) continue;
      for (int64_t k = 0; k < rows * rank; ++k) c[k] = scale * s_ptr[g0 * rank + k];
      float* y = out.mutable_data_ptr<float>() + g0 * out_features;
      if (!out.is_same(base)) {
        const float* b = base.const_data_ptr<float>() + g0 * out_features;
        std::copy(b, b + rows * out_features, y);
      }
      if (bias.defined()) {
        const float* bb = bias.const_data_ptr<float>();
        for (int64_t u = 0; u < rows; ++u) {
          for (int64_t i = 0; i < out_features; ++i) y[u * out_features + i] += bb[i];
        }
      }
      expand_accumulate(y, c, Bt.const_data_ptr<float>(), rows, rank, out_features);
    }
  });
  return shrunk;
}

struct LinearInputs {
  int64_t tokens, in, rank, out;
  at::ScalarType cd;
  at::Tensor x2;
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
  return in;
}

bool fusable_output(const at::Tensor& base_out) {
  return base_out.scalar_type() == at::kFloat && base_out.is_contiguous();
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto in = prepare(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  if (in.cd != at::kFloat) {
    return detail::lora_linear_forward_aten(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  }
  std::optional<DropoutMask> mask;
  if (dropout_p > 0.0) mask = make_mask(dropout_p, *seed);
  if (fusable_output(base_out)) {
    at::Tensor out = at::empty(base_out.sizes(), base_out.options().memory_format(at::MemoryFormat::Contiguous));
    const at::Tensor shrunk =
        fused_forward_float(in.x2, lora_A, lora_B, lora_bias, scaling, mask ? &*mask : nullptr,
                            base_out.view({in.tokens, in.out}), out.view({in.tokens, in.out}));
    return {out, shrunk};
  }
  const at::Tensor shrunk = fused_forward_float(in.x2, lora_A, lora_B, lora_bias, scaling, mask ? &*mask : nullptr,
                                                at::Tensor(), at::Tensor());
  at::Tensor delta = at::mm(shrunk, lora_B.to(at::kFloat).t());
  if (lora_bias.has_value() && lora_bias->defined()) delta.add_(lora_bias->to(at::kFloat));
  at::Tensor out2 = detail::accumulate_into_base(base_out.reshape({in.tokens, in.out}), delta, scaling);
  return {out2.view(base_out.sizes()), shrunk};
}

at::Tensor lora_linear_forward_inplace_cpu(
    at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto in = prepare(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  if (in.cd != at::kFloat) {
    return detail::lora_linear_forward_inplace_aten(base_out, x, lora_A, lora_B, lora_bias, scaling, dropout_p,
                                                    seed);
  }
  std::optional<DropoutMask> mask;
  if (dropout_p > 0.0) mask = make_mask(dropout_p, *seed);
  // x may alias base_out: then the shrink must finish before base_out changes.
  const bool fuse = fusable_output(base_out) && !x.is_alias_of(base_out);
  if (fuse) {
    at::Tensor base2 = base_out.view({in.tokens, in.out});
    return fused_forward_float(in.x2, lora_A, lora_B, lora_bias, scaling, mask ? &*mask : nullptr, base2, base2);
  }
  const at::Tensor shrunk = fused_forward_float(in.x2, lora_A, lora_B, lora_bias, scaling, mask ? &*mask : nullptr,
                                                at::Tensor(), at::Tensor());
  detail::expand_into_base_(base_out, shrunk, lora_B.to(at::kFloat), lora_bias, scaling);
  return shrunk;
}

// The fused float32 backward, one parallel region over rows (groups of four): per group,
// grad_s = scaling * g @ B, grad_B^T and grad_bias partial sums, the mask regenerated once for
// both grad_A (partial sums over dropout(x)) and grad_x (= mask * grad_s @ A). Per-thread
// partial sums are added up in thread order afterwards (deterministic for a thread count).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrunk, const at::Tensor& lora_A,
    const at::Tensor& lora_B, bool has_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 3> output_mask) {
  if (detail::compute_dtype(x) != at::kFloat) {
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
  std::optional<DropoutMask> mask;
  if (dropout_p > 0.0) mask = make_mask(dropout_p, *seed);
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor g2 = grad_out.reshape({tokens, out_features}).to(at::kFloat).contiguous();
  const at::Tensor s2 = shrunk.to(at::kFloat).contiguous();
  const at::Tensor A = lora_A.to(at::kFloat).contiguous();  // [r, in]
  const at::Tensor B = lora_B.to(at::kFloat).contiguous();  // [out, r]
  const at::Tensor x2 = x.reshape({tokens, in}).contiguous();
  const bool want_x = output_mask[0], want_A = output_mask[1], want_B = output_mask[2];
  const at::Tensor none = at::empty({0}, x.options());
  at::Tensor grad_x = none, grad_A = none, grad_B = none, grad_bias = none;
  if (want_x) grad_x = at::empty({tokens, in}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const bool need_gs = want_x || want_A;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor part_A = want_A ? at::zeros({threads, rank, in}, f32) : at::Tensor();
  at::Tensor part_Bt = want_B ? at::zeros({threads, rank, out_features}, f32) : at::Tensor();
  at::Tensor part_bias = has_bias ? at::zeros({threads, out_features}, f32) : at::Tensor();
  const float* g_ptr = g2.const_data_ptr<float>();
  const float* s_ptr = s2.const_data_ptr<float>();
  const float scale = static_cast<float>(scaling);
  const bool grad_x_is_float = x.scalar_type() == at::kFloat;

  if (tokens > 0) {
    at::parallel_for(0, tokens, row_grain(std::max(in, out_features)), [&](int64_t t0, int64_t t1) {
      const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
      std::vector<float> buf(static_cast<size_t>(kGroup * in));
      std::vector<float> gx_buf(grad_x_is_float ? 0 : static_cast<size_t>(kGroup * in));
      std::vector<uint8_t> keep(mask ? static_cast<size_t>(kGroup * in) : 0);
      std::vector<float> gs(static_cast<size_t>(kGroup * rank));
      float* acc_A = want_A ? part_A.mutable_data_ptr<float>() + tid * rank * in : nullptr;
      float* acc_Bt = want_B ? part_Bt.mutable_data_ptr<float>() + tid * rank * out_features : nullptr;
      float* acc_bias = has_bias ? part_bias.mutable_data_ptr<float>() + tid * out_features : nullptr;
      for (int64_t g0 = t0; g0 < t1; g0 += kGroup) {
        const int64_t rows = std::min(kGroup, t1 - g0);
        const float* g = g_ptr + g0 * out_features;
        if (want_B) {
          if (rows == kGroup) {
            accumulate_outer4(acc_Bt, s_ptr + g0 * rank, g, rank, out_features);
          } else {
            for (int64_t u = 0; u < rows; ++u) {
              accumulate_outer(acc_Bt, s_ptr + (g0 + u) * rank, g + u * out_features, rank, out_features);
            }
          }
        }
        if (has_bias) {
          for (int64_t u = 0; u < rows; ++u) {
            for (int64_t i = 0; i < out_features; ++i) acc_bias[i] += g[u * out_features + i];
          }
        }
        if (!need_gs) continue;
        for (int64_t u = 0; u < rows; ++u) {
          shrink_row(g + u * out_features, B.const_data_ptr<float>(), out_features, rank, gs.data() + u * rank);
        }
        for (int64_t k = 0; k < rows * rank; ++k) gs[k] *= scale;
        // one mask generation per row serves grad_A and grad_x
        const float* xr = (want_A || mask) ? float_rows(x2, g0, rows, mask ? &*mask : nullptr, keep.data(), buf.data())
                                           : nullptr;
        if (want_A) {
          if (rows == kGroup) {
            accumulate_outer4(acc_A, gs.data(), xr, rank, in);
          } else {
            for (int64_t u = 0; u < rows; ++u) accumulate_outer(acc_A, gs.data() + u * rank, xr + u * in, rank, in);
          }
        }
        if (!want_x) continue;
        float* target = grad_x_is_float ? grad_x.mutable_data_ptr<float>() + g0 * in : gx_buf.data();
        std::fill(target, target + rows * in, 0.f);
        expand_accumulate(target, gs.data(), A.const_data_ptr<float>(), rows, rank, in);
        if (mask || !grad_x_is_float) {
          dispatch_input(x.scalar_type(), [&](auto xv, auto) {  // grad of the dropped-out input
            using x_t = decltype(xv);
            x_t* dst = grad_x.mutable_data_ptr<x_t>() + g0 * in;
            if (mask) {
              apply_keep(target, dst, keep.data(), rows * in, mask->scale);
            } else {
              for (int64_t i = 0; i < rows * in; ++i) dst[i] = static_cast<x_t>(target[i]);
            }
          });
        }
      }
    });
  } else if (want_x) {
    grad_x.zero_();
  }
  auto reduce = [&](const at::Tensor& parts) { return threads == 1 ? parts.select(0, 0) : at::sum(parts, {0}); };
  if (want_A) grad_A = reduce(part_A).to(lora_A.scalar_type());
  if (want_B) grad_B = reduce(part_Bt).t().mul(scaling).to(lora_B.scalar_type()).contiguous();
  if (has_bias) grad_bias = reduce(part_bias).mul(scaling).to(lora_B.scalar_type());
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
