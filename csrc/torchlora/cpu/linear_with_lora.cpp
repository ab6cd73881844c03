// CPU kernels of linear_with_lora for float32, float64 and, with AVX-512, bfloat16 and float16.
//
// The base GEMM and the low-rank path share their passes over memory:
// - with dropout the expand lands in the output before the base GEMM accumulates into it
//   (beta = 1), so there is no separate pass that adds the adapter's term;
// - without dropout, where it costs fewer flops, the adapter is folded into the weight for one
//   GEMM: W' = W + scaling * B @ A (out x in x r) instead of T x (in + out) x r, in inference,
//   in the training forward and for grad_x. The fold is one kernel pass (read W, write W' into
//   a reused buffer);
// - grad_x is one GEMM chain: the low-rank part first, the base GEMM accumulating into it.
// Dropout: the mask is drawn once in forward and kept as bits (T * in of them, set = dropped)
// for backward. With AVX-512 (float32) the low-rank kernels load x under the keep
// bits (masked_lowrank.h); otherwise the GEMMs run on the full x and the dropped elements'
// terms are subtracted (about p * in per row). No masked copy of x exists either way; the
// [T, r] shrink and the bits are all that is saved beyond F.linear's x.
// bfloat16/float16 (autocast's dtypes): the kernels read the 16-bit rows and keep the low-rank
// path in float32 (the [T, r] intermediates, the factors, the sums), rounding each result once;
// the base GEMMs are ATen's 16-bit ones. The folded weight W + scaling * B @ A is summed in
// float32 and rounded once, as merging does: its rounding error is that of the 16-bit W itself,
// and it saves the [T, out] expand in the forward and in grad_x (without dropout, as for float32).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../detail/checks.h"
#include "../detail/linear_with_lora.h"
#include "dropout_draw.h"
#include "dropped_bits.h"
#include "lowrank_factor.h"
#include "masked_lowrank.h"
#include "thread_scratch.h"

namespace torchlora::cpu {
namespace {

bool is_16bit(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
}

bool use_masked_kernels(const at::Tensor& x) {
  return (x.scalar_type() == at::kFloat || is_16bit(x)) && masked::available();
}

bool has_fused_kernel(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || (is_16bit(x) && masked::available());
}

// Calls fn with a null pointer of the kernels' element type for x's dtype.
template <typename Fn>
decltype(auto) with_row_type(const at::Tensor& x, Fn&& fn) {
  switch (x.scalar_type()) {
    case at::kBFloat16:
      return fn(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf:
      return fn(static_cast<c10::Half*>(nullptr));
    default:
      return fn(static_cast<float*>(nullptr));
  }
}

template <typename Row>
const Row* rows(const at::Tensor& t) {
  return reinterpret_cast<const Row*>(t.const_data_ptr());
}

template <typename Row>
Row* mutable_rows(at::Tensor& t) {
  return reinterpret_cast<Row*>(t.mutable_data_ptr());
}

constexpr int64_t kBlock = 64;  // rows whose [T, r] values stay in L1 across the kernels
static_assert(kBlock % detail::kDroppedBitsPerWord == 0, "a block of rows starts a word of dropout bits");

// Whether Row's kernels take the vdpbf16ps variants: bfloat16 rows on a CPU with AVX512_BF16.
template <typename Row>
bool bf16_pairs() {
  return std::is_same_v<Row, c10::BFloat16> && masked::bf16_dot_available();
}

// The shrink of Row rows by a [rank, features] factor: vdpbf16ps on bfloat16 rows where the CPU
// has it (the same products, twice per instruction), else the float32 kernel.
template <typename Row>
class RowShrink {
 public:
  explicit RowShrink(const at::Tensor& factor) : rank_(factor.size(0)), features_(factor.size(1)) {
    if (use_pairs()) {
      padded_ = pad_factor_bf16(factor);
      pairs_ = masked::PairFactor{padded_.const_data_ptr<c10::BFloat16>(), rank_, features_, padded_.size(0),
                                  padded_.size(1)};
    } else {
      padded_ = pad_factor(factor);
      floats_ = factor_view(padded_, rank_, features_);
    }
  }

  void operator()(const Row* x, const masked::Mask& mask, float scale, float* s, int64_t t0, int64_t t1) const {
    if constexpr (std::is_same_v<Row, c10::BFloat16>) {
      if (use_pairs()) return masked::shrink_bf16_pairs(pairs_, x, mask, scale, s, t0, t1);
    }
    masked::shrink<Row>(floats_, x, mask, scale, s, t0, t1);
  }

 private:
  static bool use_pairs() {
    return bf16_pairs<Row>();
  }
  int64_t rank_, features_;
  at::Tensor padded_;
  masked::Factor floats_{};
  masked::PairFactor pairs_{};
};

// expand of Row rows by a [rank, features] factor: vdpbf16ps over pairs of ranks on bfloat16
// rows where the CPU has it, else the float32 kernel.
template <typename Row>
class RowExpand {
 public:
  explicit RowExpand(const at::Tensor& factor) : rank_(factor.size(0)), features_(factor.size(1)) {
    if (use_pairs()) {
      padded_ = pack_rank_pairs(factor);
      pairs_ = masked::RankPairFactor{reinterpret_cast<const uint32_t*>(padded_.const_data_ptr<int32_t>()), rank_,
                                      features_, padded_.size(1)};
    } else {
      padded_ = pad_factor(factor);
      floats_ = factor_view(padded_, rank_, features_);
    }
  }

  void operator()(const float* gT, int64_t ldg, const Row* init, const float* bias, const masked::Mask& mask,
                  float scale, Row* out, int64_t t0, int64_t t1) const {
    run(gT, ldg, init, bias, mask, scale, out, t0, t1);
  }
  // the same with float32 initial values: a float32 weight folded into 16-bit rows
  void from_float32(const float* gT, int64_t ldg, const float* init, const float* bias, const masked::Mask& mask,
                    float scale, Row* out, int64_t t0, int64_t t1) const {
    run(gT, ldg, init, bias, mask, scale, out, t0, t1);
  }

 private:
  static bool use_pairs() {
    return bf16_pairs<Row>();
  }
  template <typename Init>
  void run(const float* gT, int64_t ldg, const Init* init, const float* bias, const masked::Mask& mask, float scale,
           Row* out, int64_t t0, int64_t t1) const {
    if constexpr (std::is_same_v<Row, c10::BFloat16>) {
      if (use_pairs()) return masked::expand_bf16_pairs<Init>(pairs_, gT, ldg, init, bias, mask, scale, out, t0, t1);
    }
    masked::expand<Row, Init>(floats_, gT, ldg, init, bias, mask, scale, out, t0, t1);
  }
  int64_t rank_, features_;
  at::Tensor padded_;
  masked::Factor floats_{};
  masked::RankPairFactor pairs_{};
};

// accumulate of Row rows: vdpbf16ps over pairs of rows on bfloat16 rows where the CPU has it
// (which also fetch `ahead` into cache).
template <typename Row>
void accumulate_rows(const masked::Factor& shape, const float* gs, const Row* x, const masked::Mask& mask, float* acc,
                     int64_t t0, int64_t t1, masked::Ahead ahead = {}) {
  if constexpr (std::is_same_v<Row, c10::BFloat16>) {
    if (bf16_pairs<Row>()) return masked::accumulate_bf16_pairs(shape, gs, x, mask, acc, t0, t1, ahead);
  }
  masked::accumulate<Row>(shape, gs, x, mask, acc, t0, t1);
}

// The [r, kBlock] transpose of rows [t, e) of a [T, r] matrix: expand reads its coefficients so.
void transpose_block(const float* s, int64_t rank, int64_t t, int64_t e, float* sT) {
  for (int64_t i = t; i < e; ++i) {
    for (int64_t k = 0; k < rank; ++k) sT[k * kBlock + (i - t)] = s[i * rank + k];
  }
}

bool defined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The mask of x's [T, in] elements as packed bits: [dropped_words(T * in)] int64 (read as uint64).
at::Tensor draw_dropped_bits(int64_t tokens, int64_t in, const DropoutDraw& d) {
  const int64_t count = tokens * in, words = dropped_words(count);
  at::Tensor bits = at::empty({words}, at::TensorOptions().dtype(at::kLong));
  auto* p = reinterpret_cast<uint64_t*>(bits.mutable_data_ptr<int64_t>());
  at::parallel_for(0, words, 256, [&](int64_t w0, int64_t w1) {
    fill_dropped_words(p + w0, w0, w1, count, d.key, d.threshold);
  });
  return bits;
}

const uint64_t* bits_data(const at::Tensor& bits) {
  return reinterpret_cast<const uint64_t*>(bits.const_data_ptr<int64_t>());
}

masked::Mask mask_view(const at::Tensor& bits) {
  return masked::Mask{bits_data(bits), bits.numel()};
}

// Calls fn(row, dropped_column) for every dropped element of rows [r0, r1), then row_done(row).
template <typename RowFn, typename ElemFn>
void for_each_dropped(const uint64_t* bits, int64_t r0, int64_t r1, int64_t in, RowFn&& row_done, ElemFn&& fn) {
  for (int64_t t = r0; t < r1; ++t) {
    for_each_dropped_in(bits, t * in, (t + 1) * in, [&](int64_t j) { fn(t, j); });
    row_done(t);
  }
}

int64_t row_grain(int64_t in, int64_t rank) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, in + rank));
}

// [T, r] float32 = scale * (keep * x) @ A^T over rows in parallel, x contiguous [T, in] of
// float32 or (with AVX-512) a 16-bit type.
at::Tensor kernel_shrink(const at::Tensor& x, const at::Tensor& lora_A, const masked::Mask& mask, double scale) {
  const int64_t tokens = x.size(0), in = x.size(1), rank = lora_A.size(0);
  at::Tensor s = at::empty({tokens, rank}, x.options().dtype(at::kFloat));
  with_row_type(x, [&](auto* row) {
    using Row = std::remove_pointer_t<decltype(row)>;
    const RowShrink<Row> shrink_by_A(lora_A);
    at::parallel_for(0, tokens, row_grain(in, rank), [&](int64_t r0, int64_t r1) {
      shrink_by_A(rows<Row>(x), mask, static_cast<float>(scale), s.mutable_data_ptr<float>(), r0, r1);
    });
  });
  return s;
}

// s = dropout(x2) @ A^T, [T, r], for x2 contiguous and the mask's bits: the GEMM on the full x,
// then per row the dropped elements' terms subtracted.
at::Tensor shrink_with_corrections(const at::Tensor& x2, const at::Tensor& lora_A, const at::Tensor& bits,
                                   const DropoutDraw& d) {
  const int64_t tokens = x2.size(0), in = x2.size(1), rank = lora_A.size(0);
  at::Tensor s = at::mm(x2, lora_A.t());
  if (tokens == 0 || in == 0) return s;
  const at::Tensor At = lora_A.t().contiguous();  // [in, r]: a dropped column's terms are contiguous
  AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "torchlora_shrink_with_corrections", [&] {
    const scalar_t* xp = x2.const_data_ptr<scalar_t>();
    const scalar_t* ap = At.const_data_ptr<scalar_t>();
    scalar_t* sp = s.mutable_data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(static_cast<double>(d.scale));
    at::parallel_for(0, tokens, row_grain(in, rank), [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> dropped(static_cast<size_t>(rank));
      for_each_dropped(
          bits_data(bits), r0, r1, in,
          [&](int64_t t) {
            scalar_t* row = sp + t * rank;
            for (int64_t k = 0; k < rank; ++k) {
              row[k] = (row[k] - dropped[k]) * scale;
              dropped[k] = 0;
            }
          },
          [&](int64_t t, int64_t j) {
            const scalar_t v = xp[t * in + j];
            const scalar_t* a = ap + j * rank;
            for (int64_t k = 0; k < rank; ++k) dropped[k] += v * a[k];
          });
    });
  });
  return s;
}

// Whether folding scaling * B @ A into the weight (out x in x r flops) beats applying the
// factors to `tokens` rows of the `via_features`-wide side (tokens x via x r).
bool fold_into_weight(int64_t tokens, int64_t out, int64_t in, int64_t via_features) {
  return out * in < tokens * via_features;
}

// The folded weight lives only for one GEMM: a per-thread buffer, not a fresh tensor per call.
struct FoldSlot {};
at::Tensor fold_scratch(const at::Tensor& weight, at::ScalarType dtype) {
  return thread_scratch<FoldSlot>(weight.sizes(), weight.options().dtype(dtype));
}

// detail::weight_like_x in the per-thread scratch: a float32 weight rounded for one GEMM
// (under autocast, where the adapter is not folded into it). A fresh weight-sized tensor each
// time measured 4-6% of a bfloat16 training step slower at 2 threads and no slower at 1 (the
// page faults of a fresh block, as for the fold's buffer).
at::Tensor rounded_weight(const at::Tensor& weight, const at::Tensor& x) {
  if (weight.scalar_type() == x.scalar_type()) return weight;
  return fold_scratch(weight, x.scalar_type()).copy_(weight);
}

// W + scaling * B @ A in the factors' dtype: with the kernels one pass that reads W and writes
// the sum (BLAS's addmm copies W into the result first and then reads and writes it again). A
// float32 W with 16-bit factors (autocast's frozen weight) is read as it is and rounded once
// with the adapter: no rounded copy of W is made.
at::Tensor folded_weight(const at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& lora_A,
                         double scaling) {
  const at::ScalarType dtype = lora_A.scalar_type();
  if (!use_masked_kernels(lora_A) || !weight.is_contiguous() || weight.numel() == 0) {
    return at::addmm(weight.to(dtype), lora_B, lora_A, 1.0, scaling);
  }
  const int64_t out_features = weight.size(0), in = weight.size(1), rank = lora_A.size(0);
  const at::Tensor Bt = padded_floats(lora_B.t(), rank, out_features);  // [r, out]: each row of W's coefficients
  at::Tensor merged = fold_scratch(weight, dtype);
  with_row_type(lora_A, [&](auto* row) {
    using Row = std::remove_pointer_t<decltype(row)>;
    const RowExpand<Row> expand_by_A(lora_A);
    const bool same_dtype = weight.scalar_type() == dtype;
    at::parallel_for(0, out_features, row_grain(in, rank), [&](int64_t o0, int64_t o1) {
      const float* coefficients = Bt.const_data_ptr<float>() + o0;
      if (same_dtype) {
        expand_by_A(coefficients, out_features, rows<Row>(weight), nullptr, no_mask(), static_cast<float>(scaling),
                    mutable_rows<Row>(merged), o0, o1);
      } else {
        expand_by_A.from_float32(coefficients, out_features, rows<float>(weight), nullptr, no_mask(),
                                 static_cast<float>(scaling), mutable_rows<Row>(merged), o0, o1);
      }
    });
  });
  return merged;
}

// 16-bit rows: per block of rows the dropout bits (when drawn), the shrink of x under them into
// the float32 [T, r] intermediate, then its expand with the bias into the output, rounded once;
// the base GEMM then accumulates into the output. Each block draws its own bits just before
// its kernels read them, not in a pass of their own: the forward op measured 0.3-0.5% faster,
// bit for bit the same. Blocks start at multiples of kBlock rows, so their bits are whole words.
// A float32 weight is rounded only at the end, so that its pass does not push x out of cache
// before the shrink reads it.
template <typename Row>
at::Tensor forward_16bit(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& fused_bias,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                         const std::optional<DropoutDraw>& d, at::Tensor& bits, at::Tensor& shrunk) {
  const int64_t tokens = x2.size(0), in = x2.size(1), rank = lora_A.size(0), out_features = weight.size(0);
  const int64_t count = tokens * in;
  uint64_t* words = nullptr;
  if (d) {
    bits = at::empty({dropped_words(count)}, at::TensorOptions().dtype(at::kLong));
    words = reinterpret_cast<uint64_t*>(bits.mutable_data_ptr<int64_t>());
  }
  const masked::Mask mask = d ? mask_view(bits) : no_mask();
  const float keep_scale = d ? d->scale : 1.0f;
  const at::Tensor xc = x2.contiguous();
  const RowShrink<Row> shrink_by_A(lora_A);
  const RowExpand<Row> expand_by_Bt(lora_B.t());
  const at::Tensor bias = fused_bias.defined() ? fused_bias.to(at::kFloat).contiguous() : at::Tensor();
  shrunk = at::empty({tokens, rank}, x2.options().dtype(at::kFloat));
  at::Tensor out = at::empty({tokens, out_features}, x2.options());
  const int64_t blocks = (tokens + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> sT(static_cast<size_t>(rank * kBlock));
    float* s = shrunk.mutable_data_ptr<float>();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t = b * kBlock, e = std::min(t + kBlock, tokens);
      if (d) {
        // kBlock is a multiple of 64, so t * in starts a word
        const int64_t w0 = t * in / detail::kDroppedBitsPerWord, w1 = dropped_words(e * in);
        fill_dropped_words(words + w0, w0, w1, count, d->key, d->threshold);
      }
      shrink_by_A(rows<Row>(xc), mask, keep_scale, s, t, e);
      transpose_block(s, rank, t, e, sT.data());
      expand_by_Bt(sT.data(), kBlock, nullptr, bias.defined() ? bias.const_data_ptr<float>() : nullptr, no_mask(),
                   static_cast<float>(scaling), mutable_rows<Row>(out), t, e);
    }
  });
  return out.addmm_(x2, rounded_weight(weight, x2).t());
}

detail::LinearWithLoraOutputs linear_with_lora_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, bool keep_shrunk) {
  if (!has_fused_kernel(x)) {
    return detail::linear_with_lora_forward_generic(x, weight, bias, lora_A, lora_B, lora_bias, scaling,
                                                    dropout_p, seed, keep_shrunk);
  }
  const auto dims = detail::check_linear_with_lora(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  const int64_t tokens = dims.tokens.expect_int(), in = dims.in_features.expect_int();
  const int64_t out_features = dims.out_features.expect_int();
  const at::Tensor x2 = x.reshape({tokens, in});

  // bias + scaling * lora_bias, both optional, in `dtype`: float32 for the 16-bit kernels, which
  // add it before rounding, and x's dtype for a GEMM's bias (a 16-bit bias alone is then taken as
  // it is: two small conversions cost about 25 us per call)
  auto fused_bias_in = [&](at::ScalarType dtype) {
    at::Tensor fused;
    if (defined(bias)) fused = bias->to(dtype);
    if (defined(lora_bias)) {
      const at::Tensor term = lora_bias->to(is_16bit(x) ? at::kFloat : dtype);
      fused = fused.defined() ? fused.to(term.scalar_type()).add(term, scaling).to(dtype) : term.mul(scaling).to(dtype);
    }
    return fused;
  };

  at::Tensor shrunk, out, bits;
  // Without dropout the adapter can be folded into the weight for one GEMM; training still
  // needs the shrink for backward, which then costs T x in x r on top of the fold.
  const int64_t lowrank_features = keep_shrunk ? out_features : in + out_features;
  if (dropout_p == 0.0 && fold_into_weight(tokens, out_features, in, lowrank_features)) {
    // backward's float32 [T, r] shrink: the kernel's for 16-bit rows, BLAS's (as fast) for float32;
    // first, while x (just written by the layer before, or by autocast's cast) is in cache: after
    // the fold and the GEMM it measured 0.24-0.27 ms per thread against 0.21 ms
    if (keep_shrunk) shrunk = is_16bit(x) ? kernel_shrink(x2.contiguous(), lora_A, no_mask(), 1.0) : at::mm(x2, lora_A.t());
    const at::Tensor merged = folded_weight(weight, lora_B, lora_A, scaling);
    const at::Tensor gemm_bias = fused_bias_in(x.scalar_type());
    out = gemm_bias.defined() ? at::addmm(gemm_bias, x2, merged.t()) : at::mm(x2, merged.t());
  } else {
    std::optional<DropoutDraw> d;
    if (dropout_p > 0.0) d = dropout_draw(dropout_p, *seed, "torchlora.linear_with_lora");
    if (is_16bit(x)) {
      out = with_row_type(x, [&](auto* row) {
        using Row = std::remove_pointer_t<decltype(row)>;
        return forward_16bit<Row>(x2, weight, fused_bias_in(at::kFloat), lora_A, lora_B, scaling, d, bits, shrunk);
      });
    } else {
      if (d) bits = draw_dropped_bits(tokens, in, *d);
      // Without dropout BLAS's own GEMM is the fastest shrink; with it the kernels read x under
      // the keep bits, and the generic fallback subtracts the dropped elements' terms.
      if (!d) {
        shrunk = at::mm(x2, lora_A.t());
      } else if (use_masked_kernels(x) && tokens > 0) {
        shrunk = kernel_shrink(x2.contiguous(), lora_A, mask_view(bits), static_cast<double>(d->scale));
      } else {
        shrunk = shrink_with_corrections(x2.contiguous(), lora_A, bits, *d);
      }
      const at::Tensor fused_bias = fused_bias_in(x.scalar_type());
      out = fused_bias.defined() ? at::addmm(fused_bias, shrunk, lora_B.t(), 1.0, scaling)
                                 : at::mm(shrunk, lora_B.t().mul(scaling));
      out.addmm_(x2, rounded_weight(weight, x).t());
    }
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  if (!keep_shrunk) {
    shrunk = at::empty({0}, x.options().dtype(detail::intermediate_dtype(x)));
    bits = at::Tensor();
  }
  if (!bits.defined()) bits = at::empty({0}, x.options().dtype(at::kLong));
  return {out.view(out_shape), shrunk, bits};
}

// scale * the sum over slots of per-thread accumulators [slots, rank_pad, stride], cut to
// [rank, features] (or its transpose), rounded once to dtype.
at::Tensor sum_of_slots(const at::Tensor& partial, int64_t rank, int64_t features, double scale,
                        at::ScalarType dtype, bool transpose) {
  const int64_t slots = partial.size(0), slot_size = partial.size(1) * partial.size(2), stride = partial.size(2);
  at::Tensor sum = at::empty(transpose ? at::IntArrayRef{features, rank} : at::IntArrayRef{rank, features},
                             partial.options().dtype(dtype));
  const float* p = partial.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "torchlora_sum_of_slots", [&] {
    scalar_t* o = sum.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < rank; ++k) {
      for (int64_t j = 0; j < features; ++j) {
        float v = 0;
        for (int64_t s = 0; s < slots; ++s) v += p[s * slot_size + k * stride + j];
        o[transpose ? j * rank + k : k * features + j] = static_cast<scalar_t>(v * static_cast<float>(scale));
      }
    }
  });
  return sum;
}

// Which per-thread accumulator a parallel_for chunk adds into. Inside another parallel region
// parallel_for runs inline on the calling thread, so a single accumulator serves.
struct ThreadSlots {
  bool nested = at::in_parallel_region();
  int64_t count = nested ? 1 : at::get_num_threads();
  int64_t current() const {
    return nested ? 0 : std::min<int64_t>(at::get_thread_num(), count - 1);
  }
};

// Backward with the masked kernels (AVX-512; float32 or 16-bit rows). One parallel pass over
// row blocks computes grad_B and grad_A (x read under the keep bits) and, where grad_x is not
// taken from the folded weight, the low-rank part of grad_x while grad_s's rows are in cache.
// grad_s = scaling * g @ B is the first kernel of the block, so grad_out is read from memory
// once (grad_B re-reads the block from L2); a BLAS GEMM for it would be a pass of its own.
template <typename Row>
detail::LinearWithLoraGrads backward_with_kernels(const at::Tensor& g2, const at::Tensor& x2,
                                                  const at::Tensor& weight, const at::Tensor& shrunk,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  const at::Tensor& bits, double scaling, double dropout_p,
                                                  const std::optional<at::Tensor>& seed,
                                                  std::array<bool, 4> output_mask) {
  const int64_t tokens = x2.size(0), in = x2.size(1), rank = lora_A.size(0), out_features = weight.size(0);
  const bool want_x = output_mask[0], want_A = output_mask[2], want_B = output_mask[3];
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x2.options()); };
  at::Tensor grad_x = none(), grad_A = none(), grad_B = none();
  if (!(want_x || want_A || want_B)) return {grad_x, none(), grad_A, grad_B, none(), none()};

  std::optional<DropoutDraw> d;
  if (dropout_p > 0.0) d = dropout_draw(dropout_p, *seed, "torchlora.linear_with_lora");
  const masked::Mask mask = d ? mask_view(bits) : no_mask();
  const double keep_scale = d ? static_cast<double>(d->scale) : 1.0;
  // Without dropout, folding the adapter into the weight is cheaper for grad_x when out < T.
  // With dropout the masked expand measured faster than the folded weight followed by a
  // subtraction at the dropped elements.
  const bool fold_x = want_x && !d && fold_into_weight(tokens, out_features, in, in);
  const bool expand_x = want_x && !fold_x;
  const bool need_s = want_A || expand_x;

  const at::Tensor gc = want_B || need_s ? g2.contiguous() : at::Tensor();
  const at::Tensor xc = want_A ? x2.contiguous() : at::Tensor();
  at::Tensor grad_s;  // [T, r] float32, d(loss)/d(shrunk)
  std::optional<RowShrink<Row>> shrink_by_Bt;
  if (need_s) {
    grad_s = at::empty({tokens, rank}, x2.options().dtype(at::kFloat));
    shrink_by_Bt.emplace(lora_B.t());
  }
  std::optional<RowExpand<Row>> expand_by_A;
  if (expand_x) expand_by_A.emplace(lora_A);
  const masked::Factor B_shape{nullptr, rank, out_features, masked::accumulate_ranks(rank),
                               masked::round16(out_features), masked::accumulate_stride(out_features)};
  const masked::Factor A_shape{nullptr, rank, in, masked::accumulate_ranks(rank), masked::round16(in),
                               masked::accumulate_stride(in)};
  const ThreadSlots slots;
  const auto f32 = x2.options().dtype(at::kFloat);
  at::Tensor partial_B = want_B ? zeroed({slots.count, B_shape.rank_pad, B_shape.stride}, f32) : at::Tensor();
  at::Tensor partial_A = want_A ? zeroed({slots.count, A_shape.rank_pad, A_shape.stride}, f32) : at::Tensor();
  if (expand_x) grad_x = at::empty({tokens, in}, x2.options());

  at::parallel_for(0, tokens, std::max<int64_t>(kBlock, row_grain(in + out_features, rank)), [&](int64_t r0, int64_t r1) {
    const int64_t slot = slots.current();
    float* gs = need_s ? grad_s.mutable_data_ptr<float>() : nullptr;
    std::vector<float> gs_t(expand_x ? static_cast<size_t>(rank * kBlock) : 0);
    for (int64_t t = r0; t < r1; t += kBlock) {
      const int64_t e = std::min(t + kBlock, r1);
      if (need_s) {
        (*shrink_by_Bt)(rows<Row>(gc), no_mask(), static_cast<float>(scaling), gs, t, e);
      }
      // grad_B's reduction reads the block of grad_out from L2, and fetches the block of x that
      // grad_A reads next; grad_A's fetches the next block of grad_out (the backward op measured
      // 1-1.5% faster, bfloat16 at T = 2048, d = 1024)
      if (want_B) {
        const masked::Ahead x_block = want_A ? masked::Ahead{rows<Row>(xc) + t * in, rows<Row>(xc) + e * in}
                                             : masked::Ahead{};
        accumulate_rows<Row>(B_shape, shrunk.const_data_ptr<float>(), rows<Row>(gc), no_mask(),
                             partial_B.mutable_data_ptr<float>() + slot * B_shape.rank_pad * B_shape.stride, t, e,
                             x_block);
      }
      if (want_A) {
        const int64_t next_end = std::min(e + kBlock, r1);
        const masked::Ahead next_g = gc.defined() && e < r1
                                         ? masked::Ahead{rows<Row>(gc) + e * out_features,
                                                         rows<Row>(gc) + next_end * out_features}
                                         : masked::Ahead{};
        accumulate_rows<Row>(A_shape, gs, rows<Row>(xc), mask,
                             partial_A.mutable_data_ptr<float>() + slot * A_shape.rank_pad * A_shape.stride, t, e,
                             next_g);
      }
      if (expand_x) {
        transpose_block(gs, rank, t, e, gs_t.data());
        (*expand_by_A)(gs_t.data(), kBlock, nullptr, nullptr, mask, static_cast<float>(keep_scale),
                       mutable_rows<Row>(grad_x), t, e);
      }
    }
  });
  if (want_B) grad_B = sum_of_slots(partial_B, rank, out_features, scaling, x2.scalar_type(), /*transpose=*/true);
  if (want_A) grad_A = sum_of_slots(partial_A, rank, in, keep_scale, x2.scalar_type(), /*transpose=*/false);
  if (fold_x) grad_x = at::mm(g2, folded_weight(weight, lora_B, lora_A, scaling));
  if (expand_x) grad_x.addmm_(g2, rounded_weight(weight, x2));
  return {grad_x, none(), grad_A, grad_B, none(), none()};
}

// Backward with BLAS GEMMs on the full x and corrections at the dropped elements.
detail::LinearWithLoraGrads backward_with_corrections(const at::Tensor& g2, const at::Tensor& x2,
                                                      const at::Tensor& weight, const at::Tensor& shrunk,
                                                      const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                      const at::Tensor& bits, double scaling, double dropout_p,
                                                      const std::optional<at::Tensor>& seed,
                                                      std::array<bool, 4> output_mask) {
  const int64_t tokens = x2.size(0), in = x2.size(1), rank = lora_A.size(0), out_features = weight.size(0);
  const bool want_x = output_mask[0], want_A = output_mask[2], want_B = output_mask[3];
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x2.options()); };
  at::Tensor grad_x = none(), grad_A = none(), grad_B = none();
  if (want_B) grad_B = at::mm(g2.t(), shrunk).mul_(scaling);
  if (!(want_x || want_A)) return {grad_x, none(), grad_A, grad_B, none(), none()};
  // the weight in x's dtype, rounded only on the paths that do not fold the adapter into it
  auto rounded = [&] { return rounded_weight(weight, x2); };
  const at::Tensor grad_s = at::mm(g2, lora_B.mul(scaling));  // [T, r], d(loss)/d(shrunk)
  if (dropout_p == 0.0) {
    if (want_A) grad_A = at::mm(grad_s.t(), x2);
    if (want_x) {
      grad_x = fold_into_weight(tokens, out_features, in, in) ? at::mm(g2, folded_weight(weight, lora_B, lora_A, scaling))
                                                              : at::mm(grad_s, lora_A).addmm_(g2, rounded());
    }
    return {grad_x, none(), grad_A, grad_B, none(), none()};
  }
  // The low-rank part of grad_x is keep * (grad_s @ A) / (1 - p): folded into the weight and
  // corrected at the dropped elements, or computed, zeroed there and accumulated into.
  // grad_A = (grad_s^T @ x - the dropped elements' terms) / (1 - p).
  const DropoutDraw d = dropout_draw(dropout_p, *seed, "torchlora.linear_with_lora");
  const bool folded = want_x && fold_into_weight(tokens, out_features, in, in);
  if (want_x) {
    grad_x = folded ? at::mm(g2, at::addmm(rounded(), lora_B, lora_A, 1.0, scaling * static_cast<double>(d.scale)))
                    : at::mm(grad_s, lora_A).mul_(static_cast<double>(d.scale));
  }
  const at::Tensor xc = want_A ? x2.contiguous() : at::Tensor();
  const ThreadSlots slots;
  // Per-thread sums of the dropped terms of grad_A^T ([in, r] each), reduced after the loop.
  at::Tensor dropped_A = want_A ? at::zeros({slots.count, in, rank}, x2.options()) : at::Tensor();
  if (tokens > 0 && in > 0) {
    const at::Tensor At = lora_A.t().contiguous();
    AT_DISPATCH_FLOATING_TYPES(x2.scalar_type(), "torchlora_linear_with_lora_backward", [&] {
      const scalar_t* gs = grad_s.const_data_ptr<scalar_t>();
      const scalar_t* ap = At.const_data_ptr<scalar_t>();
      const scalar_t* xp = want_A ? xc.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* gx = want_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* da_all = want_A ? dropped_A.mutable_data_ptr<scalar_t>() : nullptr;
      const auto keep_scale = static_cast<scalar_t>(static_cast<double>(d.scale));
      at::parallel_for(0, tokens, row_grain(in, rank), [&](int64_t r0, int64_t r1) {
        scalar_t* da = want_A ? da_all + slots.current() * in * rank : nullptr;
        for_each_dropped(
            bits_data(bits), r0, r1, in, [](int64_t) {},
            [&](int64_t t, int64_t j) {
              const scalar_t* g = gs + t * rank;
              if (want_A) {
                const scalar_t v = xp[t * in + j];
                scalar_t* acc = da + j * rank;
                for (int64_t k = 0; k < rank; ++k) acc[k] += g[k] * v;
              }
              if (!want_x) return;
              if (folded) {
                const scalar_t* a = ap + j * rank;
                scalar_t dot = 0;
                for (int64_t k = 0; k < rank; ++k) dot += g[k] * a[k];
                gx[t * in + j] -= dot * keep_scale;
              } else {
                gx[t * in + j] = 0;
              }
            });
      });
    });
  }
  if (want_x && !folded) grad_x.addmm_(g2, rounded());
  if (want_A) grad_A = at::addmm(dropped_A.sum(0).t(), grad_s.t(), x2, -static_cast<double>(d.scale), static_cast<double>(d.scale));
  return {grad_x, none(), grad_A, grad_B, none(), none()};
}

detail::LinearWithLoraGrads linear_with_lora_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shrunk,
    const at::Tensor& dropped_bits, const at::Tensor& lora_A, const at::Tensor& lora_B, bool needs_bias_grad,
    bool needs_lora_bias_grad, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    std::array<bool, 4> output_mask) {
  if (!has_fused_kernel(x)) {
    return detail::linear_with_lora_backward_generic(grad_out, x, weight, shrunk, dropped_bits, lora_A, lora_B,
                                                     needs_bias_grad, needs_lora_bias_grad, scaling, dropout_p, seed, output_mask);
  }
  const auto dims = detail::check_linear_with_lora_backward(grad_out, x, weight, shrunk, dropped_bits, lora_A, lora_B,
                                                            scaling, dropout_p, seed);
  const int64_t tokens = dims.tokens, in = dims.in_features, out_features = dims.out_features;
  const at::Tensor bits = dropped_bits.contiguous();
  const at::Tensor g2 = grad_out.reshape({tokens, out_features});
  const at::Tensor x2 = x.reshape({tokens, in});
  auto grads = use_masked_kernels(x) && (tokens > 0 || is_16bit(x))
                   ? with_row_type(x, [&](auto* row) {
                       using Row = std::remove_pointer_t<decltype(row)>;
                       return backward_with_kernels<Row>(g2, x2, weight, shrunk, lora_A, lora_B, bits, scaling,
                                                         dropout_p, seed, output_mask);
                     })
                   : backward_with_corrections(g2, x2, weight, shrunk, lora_A, lora_B, bits, scaling, dropout_p,
                                               seed, output_mask);
  auto& [grad_x, grad_w, grad_A, grad_B, grad_bias, grad_lora_bias] = grads;
  if (output_mask[0]) grad_x = grad_x.view(x.sizes());
  if (output_mask[1]) grad_w = at::mm(g2.t(), x2).to(weight.scalar_type());
  if (needs_bias_grad || needs_lora_bias_grad) {
    // summed in float32 for 16-bit grad_out, rounded once
    const at::Tensor column_sum = at::sum(g2, {0}, false, is_16bit(x) ? at::kFloat : x.scalar_type());
    if (needs_bias_grad) grad_bias = column_sum.to(x.scalar_type());
    if (needs_lora_bias_grad) grad_lora_bias = column_sum.mul(scaling).to(x.scalar_type());
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("_linear_with_lora_forward", &linear_with_lora_forward_cpu);
  m.impl("_linear_with_lora_backward", &linear_with_lora_backward_cpu);
}

}  // namespace torchlora::cpu
