// CPU kernels of lora_linear (functional and in-place).
//
// Forward: the shrink s = dropout(x) @ A^T never materialises dropout(x): row blocks of x are
// masked into a small per-thread buffer and multiplied block by block under at::parallel_for.
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
#include "../detail/philox_dropout.h"

namespace torchlora::cpu {
namespace {

// Rows per block: a 64 x 1024 float32 block (256 KiB) stays in L2 between masking and GEMM.
constexpr int64_t kRowBlock = 64;

struct DropoutMask {
  uint64_t key;
  uint64_t threshold;
  double p;
  float scale;
};

DropoutMask make_mask(double p, const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu(), "torchlora.lora_linear: the seed for a CPU input must be on the CPU");
  return DropoutMask{static_cast<uint64_t>(seed.item<int64_t>()), detail::dropout_threshold(p), p,
                     static_cast<float>(1.0 / (1.0 - p))};
}

// keep[i] = whether element first + i (row-major index over [T, in]) survives dropout.
void fill_keep(uint8_t* keep, int64_t first, int64_t count, const DropoutMask& m) {
  int64_t i = 0;
  while (i < count) {
    const uint64_t e = static_cast<uint64_t>(first + i);
    const int lane = static_cast<int>(e & 3u);
    const uint32_t bits = detail::keep_bits4(m.key, e >> 2, m.threshold);
    const int64_t n = std::min<int64_t>(4 - lane, count - i);
    for (int64_t j = 0; j < n; ++j) keep[i + j] = static_cast<uint8_t>((bits >> (lane + j)) & 1u);
    i += n;
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

// Calls fn(scalar_t{}, cd_t{}) for the input dtype and its CPU compute dtype.
template <typename Fn>
void dispatch_input(at::ScalarType dtype, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "torchlora_lora_linear_cpu", [&] {
    using cd_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fn(scalar_t{}, cd_t{});
  });
}

int64_t num_blocks(int64_t tokens) { return (tokens + kRowBlock - 1) / kRowBlock; }

// s = dropout(x2) @ A^T in the compute dtype; x2 is [T, in] contiguous, A_cd [r, in].
at::Tensor shrink(const at::Tensor& x2, const at::Tensor& A_cd, double dropout_p,
                  const std::optional<at::Tensor>& seed) {
  const auto cd = A_cd.scalar_type();
  if (dropout_p == 0.0) return at::mm(x2.to(cd), A_cd.t());
  const at::Tensor xc = x2.contiguous();
  const int64_t tokens = x2.size(0), in = x2.size(1), rank = A_cd.size(0);
  const DropoutMask mask = make_mask(dropout_p, *seed);
  at::Tensor shrunk = at::empty({tokens, rank}, A_cd.options());
  if (tokens == 0 || in == 0) return shrunk.zero_();
  const at::Tensor At = A_cd.t();
  at::parallel_for(0, num_blocks(tokens), 1, [&](int64_t b0, int64_t b1) {
    at::Tensor buf = at::empty({std::min(kRowBlock, tokens), in}, A_cd.options());
    std::vector<uint8_t> keep(static_cast<size_t>(buf.numel()));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * kRowBlock, rows = std::min(kRowBlock, tokens - t0);
      fill_keep(keep.data(), t0 * in, rows * in, mask);
      dispatch_input(xc.scalar_type(), [&](auto xv, auto cv) {
        using x_t = decltype(xv);
        using c_t = decltype(cv);
        apply_keep(xc.const_data_ptr<x_t>() + t0 * in, buf.mutable_data_ptr<c_t>(), keep.data(), rows * in,
                   mask.scale);
      });
      at::Tensor s_block = shrunk.narrow(0, t0, rows);
      at::mm_out(s_block, buf.narrow(0, 0, rows), At);
    }
  });
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
  if (dropout_p == 0.0) {
    // Without dropout the ATen path is already one GEMM per gradient.
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
  const auto cd = detail::compute_dtype(x);
  const auto cd_opts = x.options().dtype(cd);
  const at::Tensor g2 = grad_out.reshape({tokens, out_features}).to(cd);
  const at::Tensor A_cd = lora_A.to(cd);
  const at::Tensor none = at::empty({0}, x.options());
  at::Tensor grad_x = none, grad_A = none, grad_B = none, grad_bias = none;

  if (output_mask[2]) grad_B = at::mm(g2.t(), shrunk.to(cd)).mul_(scaling).to(lora_B.scalar_type());
  if (has_bias) grad_bias = at::sum(g2, {0}).mul_(scaling).to(lora_B.scalar_type());
  if (!(output_mask[0] || output_mask[1])) return {grad_x, grad_A, grad_B, grad_bias};

  const at::Tensor grad_s = at::mm(g2, lora_B.to(cd)).mul_(scaling);  // [T, r]
  const at::Tensor x2 = x.reshape({tokens, in}).contiguous();
  const bool want_x = output_mask[0], want_A = output_mask[1];
  const bool grad_x_in_cd = x.scalar_type() == cd;
  if (want_x) grad_x = at::empty({tokens, in}, x.options().memory_format(at::MemoryFormat::Contiguous));
  // One [r, in] partial sum of grad_A per thread, added up in thread order (deterministic).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor partial_A = want_A ? at::zeros({threads, rank, in}, cd_opts) : at::Tensor();

  if (tokens > 0 && in > 0) {
    at::parallel_for(0, num_blocks(tokens), 1, [&](int64_t b0, int64_t b1) {
      const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
      at::Tensor buf = at::empty({std::min(kRowBlock, tokens), in}, cd_opts);
      std::vector<uint8_t> keep(static_cast<size_t>(buf.numel()));
      at::Tensor acc_A = want_A ? partial_A.select(0, tid) : at::Tensor();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b * kRowBlock, rows = std::min(kRowBlock, tokens - t0), count = rows * in;
        fill_keep(keep.data(), t0 * in, count, mask);
        const at::Tensor gs_block = grad_s.narrow(0, t0, rows);
        at::Tensor buf_block = buf.narrow(0, 0, rows);
        if (want_A) {
          dispatch_input(x.scalar_type(), [&](auto xv, auto cv) {
            using x_t = decltype(xv);
            using c_t = decltype(cv);
            apply_keep(x2.const_data_ptr<x_t>() + t0 * in, buf.mutable_data_ptr<c_t>(), keep.data(), count,
                       mask.scale);
          });
          acc_A.addmm_(gs_block.t(), buf_block);
        }
        if (want_x) {
          at::Tensor gx_block = grad_x.narrow(0, t0, rows);
          // grad of the dropped-out input, masked with the same keep bits
          at::Tensor target = grad_x_in_cd ? gx_block : buf_block;
          at::mm_out(target, gs_block, A_cd);
          dispatch_input(x.scalar_type(), [&](auto xv, auto cv) {
            using x_t = decltype(xv);
            using c_t = decltype(cv);
            apply_keep(target.const_data_ptr<c_t>(), gx_block.mutable_data_ptr<x_t>(), keep.data(), count,
                       mask.scale);
          });
        }
      }
    });
  } else if (want_x) {
    grad_x.zero_();
  }
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
