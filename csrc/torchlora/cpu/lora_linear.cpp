// CPU kernels of lora_linear (functional and in-place).
//
// Forward: the shrink s = dropout(x) @ A^T never materialises dropout(x): row blocks of x are
// masked (in parallel, at::parallel_for) into one small buffer and multiplied block by block
// (BLAS, itself multi-threaded; no BLAS call runs inside a parallel region).
// The expand is one GEMM with the scaling folded into alpha and the accumulation into beta,
// writing into base_out itself for the in-place op. The float32 [T, r] s is the only new
// activation kept for backward. Backward regenerates each block's mask once (same Philox
// stream as dropout_apply: element index = row-major index in the [T, in] view) and uses it
// for both grad_A and grad_x. float16/bfloat16 compute in float32.
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

#include "../detail/aten_math.h"
#include "../detail/checks.h"
#include "dropout_draw.h"
#include "dropped_bits.h"

namespace torchlora::cpu {
namespace {

// Rows per block: about 2 MiB of masked float32 rows; few blocks keep the number of parallel
// regions (each a barrier) small, while the buffer stays a fraction of the dropped-out input.
int64_t rows_per_block(int64_t tokens, int64_t in) {
  const int64_t rows = std::max<int64_t>(16, (int64_t{1} << 19) / std::max<int64_t>(in, 1));
  return std::max<int64_t>(1, std::min(rows, tokens));
}

// keep[i] = whether element first + i (row-major index over [T, in]) survives dropout.
void fill_keep(uint8_t* keep, int64_t first, int64_t count, const DropoutDraw& m) {
  if (count <= 0) return;
  const int64_t w0 = first >> 6, w1 = dropped_words(first + count);
  std::vector<uint64_t> words(static_cast<size_t>(w1 - w0));
  fill_dropped_words(words.data(), w0, w1, first + count, m.key, m.threshold);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t e = first + i;
    keep[i] = static_cast<uint8_t>(((words[(e >> 6) - w0] >> (e & 63)) & 1u) ^ 1u);
  }
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

// Parallel over the rows [t0, t0 + rows) of a block: keep bytes of those rows, and (when
// masked_x is defined) x's rows masked and scaled into masked_x [rows, in] (compute dtype).
void mask_block(const at::Tensor& xc, at::Tensor& masked_x, uint8_t* keep, int64_t t0, int64_t rows,
                const DropoutDraw& mask) {
  const int64_t in = xc.size(1);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / in), [&](int64_t r0, int64_t r1) {
    const int64_t offset = r0 * in, count = (r1 - r0) * in;
    fill_keep(keep + offset, (t0 + r0) * in, count, mask);
    if (!masked_x.defined()) return;
    dispatch_input(xc.scalar_type(), [&](auto xv, auto cv) {
      using x_t = decltype(xv);
      using c_t = decltype(cv);
      apply_keep(xc.const_data_ptr<x_t>() + t0 * in + offset, masked_x.mutable_data_ptr<c_t>() + offset,
                 keep + offset, count, mask.scale);
    });
  });
}

// dst = keep ? src * scale : 0 over a block, src in the compute dtype, dst in x's dtype.
void apply_keep_block(const at::Tensor& src, at::Tensor& dst, const uint8_t* keep, float scale) {
  const int64_t n = src.numel();
  at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
    dispatch_input(dst.scalar_type(), [&](auto xv, auto cv) {
      using x_t = decltype(xv);
      using c_t = decltype(cv);
      apply_keep(src.const_data_ptr<c_t>() + i0, dst.mutable_data_ptr<x_t>() + i0, keep + i0, i1 - i0, scale);
    });
  });
}

// s = dropout(x2) @ A^T in the compute dtype; x2 is [T, in], A_cd [r, in].
at::Tensor shrink(const at::Tensor& x2, const at::Tensor& A_cd, double dropout_p,
                  const std::optional<at::Tensor>& seed) {
  const auto cd = A_cd.scalar_type();
  if (dropout_p == 0.0) return at::mm(x2.to(cd), A_cd.t());
  const at::Tensor xc = x2.contiguous();
  const int64_t tokens = xc.size(0), in = xc.size(1), rank = A_cd.size(0);
  const DropoutDraw mask = dropout_draw(dropout_p, *seed, "torchlora.lora_linear");
  at::Tensor shrunk = at::empty({tokens, rank}, A_cd.options());
  if (tokens == 0 || in == 0) return shrunk.zero_();
  const int64_t block = rows_per_block(tokens, in);
  at::Tensor buf = at::empty({block, in}, A_cd.options());
  std::vector<uint8_t> keep(static_cast<size_t>(block * in));
  const at::Tensor At = A_cd.t();
  for (int64_t t0 = 0; t0 < tokens; t0 += block) {
    const int64_t rows = std::min(block, tokens - t0);
    at::Tensor masked = buf.narrow(0, 0, rows);
    mask_block(xc, masked, keep.data(), t0, rows, mask);
    at::Tensor s_block = shrunk.narrow(0, t0, rows);
    at::mm_out(s_block, masked, At);
  }
  return shrunk;
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
  return {out2.view(base_out.sizes()), shrunk.to(detail::intermediate_dtype(x))};
}

at::Tensor lora_linear_forward_inplace_cpu(
    at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto in = prepare(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  const at::Tensor shrunk = shrink(in.x2, in.A_cd, dropout_p, seed);  // before base_out changes (x may alias it)
  detail::expand_into_base_(base_out, shrunk, in.B_cd, lora_bias, scaling);
  return shrunk.to(detail::intermediate_dtype(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrunk, const at::Tensor& lora_A,
    const at::Tensor& lora_B, bool needs_lora_bias_grad, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 3> output_mask) {
  if (dropout_p == 0.0) {
    // Without dropout the ATen path is already one GEMM per gradient.
    return detail::lora_linear_backward_aten(grad_out, x, shrunk, lora_A, lora_B, needs_lora_bias_grad, scaling, dropout_p,
                                             seed, output_mask);
  }
  const auto dims = detail::check_lora_linear_backward(grad_out, x, shrunk, lora_A, lora_B, scaling, dropout_p, seed);
  const int64_t tokens = dims.tokens, in = dims.in_features, rank = dims.rank, out_features = dims.out_features;
  const DropoutDraw mask = dropout_draw(dropout_p, *seed, "torchlora.lora_linear");
  const auto cd = detail::compute_dtype(x);
  const auto cd_opts = x.options().dtype(cd);
  const at::Tensor g2 = grad_out.reshape({tokens, out_features}).to(cd);
  const at::Tensor A_cd = lora_A.to(cd);
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, x.options()); };
  at::Tensor grad_x = none(), grad_A = none(), grad_B = none(), grad_lora_bias = none();

  if (output_mask[2]) grad_B = at::mm(g2.t(), shrunk.to(cd)).mul_(scaling).to(lora_B.scalar_type());
  if (needs_lora_bias_grad) grad_lora_bias = at::sum(g2, {0}).mul_(scaling).to(lora_B.scalar_type());
  if (!(output_mask[0] || output_mask[1])) return {grad_x, grad_A, grad_B, grad_lora_bias};

  const at::Tensor grad_s = at::mm(g2, lora_B.to(cd)).mul_(scaling);  // [T, r]
  const at::Tensor x2 = x.reshape({tokens, in}).contiguous();
  const bool want_x = output_mask[0], want_A = output_mask[1];
  const bool grad_x_in_cd = x.scalar_type() == cd;
  if (want_x) grad_x = at::empty({tokens, in}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor acc_A = want_A ? at::zeros({rank, in}, cd_opts) : at::Tensor();

  if (tokens > 0 && in > 0) {
    const int64_t block = rows_per_block(tokens, in);
    at::Tensor buf = at::empty({block, in}, cd_opts);
    std::vector<uint8_t> keep(static_cast<size_t>(block * in));
    for (int64_t t0 = 0; t0 < tokens; t0 += block) {
      const int64_t rows = std::min(block, tokens - t0);
      at::Tensor buf_block = buf.narrow(0, 0, rows);
      const at::Tensor gs_block = grad_s.narrow(0, t0, rows);
      at::Tensor masked_x = want_A ? buf_block : at::Tensor();
      mask_block(x2, masked_x, keep.data(), t0, rows, mask);  // one mask generation for both grads
      if (want_A) acc_A.addmm_(gs_block.t(), buf_block);
      if (want_x) {
        at::Tensor gx_block = grad_x.narrow(0, t0, rows);
        at::Tensor target = grad_x_in_cd ? gx_block : buf_block;
        at::mm_out(target, gs_block, A_cd);
        apply_keep_block(target, gx_block, keep.data(), mask.scale);  // grad of the dropped-out input
      }
    }
  } else if (want_x) {
    grad_x.zero_();
  }
  if (want_A) grad_A = acc_A.to(lora_A.scalar_type());
  if (want_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_A, grad_B, grad_lora_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("_lora_linear_forward", &lora_linear_forward_cpu);
  m.impl("_lora_linear_forward_", &lora_linear_forward_inplace_cpu);
  m.impl("_lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace torchlora::cpu
