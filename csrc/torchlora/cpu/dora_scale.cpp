// CPU kernels of dora_scale: out = g (z - bias) + bias with g = magnitude / weight_norm per
// channel, over z seen as [outer, C, inner], in parallel over rows; the loops are plain
// contiguous array loops the compiler vectorises. Backward: dz = g grad elementwise, and the
// per-channel sums R = sum grad (z - bias) and S = sum grad, each chunk of rows summing into its
// own partial vector (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "../detail/dora_checks.h"
#include "../detail/dora_math.h"

namespace torchlora::cpu {
namespace {

// Rows per parallel task: about 32k elements.
int64_t row_grain(int64_t inner) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, inner));
}

// The per-channel vectors in the accumulation dtype: g = magnitude / weight_norm and the bias
// (zeros when absent, so the loops have no branch).
std::pair<at::Tensor, at::Tensor> channel_vectors(const at::Tensor& magnitude, const at::Tensor& weight_norm,
                                                  const std::optional<at::Tensor>& bias, at::ScalarType ct) {
  const at::Tensor g = detail::dora_channel_vector(magnitude, ct) / detail::dora_channel_vector(weight_norm, ct);
  const at::Tensor b = bias.has_value() && bias->defined() ? detail::dora_channel_vector(*bias, ct) : at::zeros_like(g);
  return {g, b};
}

// out = g (in - b) + b per channel (b null: out = g in). Two layouts: channels innermost
// (linear outputs, dim = -1: rows of C contiguous channels, the inner loop runs over channels)
// and channels outside rows of `inner` contiguous elements (conv outputs).
template <typename scalar_t>
void channel_affine(const scalar_t* in, scalar_t* out, const at::opmath_type<scalar_t>* g,
                    const at::opmath_type<scalar_t>* b, const detail::DoraScaleShape& shape) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels, inner = shape.inner;
  if (inner == 1) {
    at::parallel_for(0, shape.outer, row_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        const scalar_t* ir = in + o * C;
        scalar_t* orow = out + o * C;
        if (b) {
          for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(g[c] * (static_cast<acc_t>(ir[c]) - b[c]) + b[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(g[c] * static_cast<acc_t>(ir[c]));
        }
      }
    });
    return;
  }
  at::parallel_for(0, shape.outer * C, row_grain(inner), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C;
      const acc_t gc = g[c], bc = b ? b[c] : acc_t(0);
      const scalar_t* ir = in + row * inner;
      scalar_t* orow = out + row * inner;
      for (int64_t i = 0; i < inner; ++i) orow[i] = static_cast<scalar_t>(gc * (static_cast<acc_t>(ir[i]) - bc) + bc);
    }
  });
}

// partial_r[k, c] += sum grad (z - b), partial_s[k, c] += sum grad over chunk k of the rows; a
// fixed split into `chunks`, so the sums do not depend on the thread count.
template <typename scalar_t>
void channel_sums(const scalar_t* grad, const scalar_t* z, const at::opmath_type<scalar_t>* b,
                  at::opmath_type<scalar_t>* partial_r, at::opmath_type<scalar_t>* partial_s,
                  const detail::DoraScaleShape& shape, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = shape.channels, inner = shape.inner;
  const int64_t rows = inner == 1 ? shape.outer : shape.outer * C;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
      acc_t* pr = partial_r ? partial_r + chunk * C : nullptr;
      acc_t* ps = partial_s ? partial_s + chunk * C : nullptr;
      for (int64_t row = r0; row < r1; ++row) {
        if (inner == 1) {  // a row of C channels: elementwise into the partial vectors
          const scalar_t* gr = grad + row * C;
          const scalar_t* zr = z + row * C;
          if (pr) {
            for (int64_t c = 0; c < C; ++c) pr[c] += static_cast<acc_t>(gr[c]) * (static_cast<acc_t>(zr[c]) - b[c]);
          }
          if (ps) {
            for (int64_t c = 0; c < C; ++c) ps[c] += static_cast<acc_t>(gr[c]);
          }
          continue;
        }
        const int64_t c = row % C;
        const scalar_t* gr = grad + row * inner;
        const scalar_t* zr = z + row * inner;
        acc_t r_sum = 0, s_sum = 0;
        for (int64_t i = 0; i < inner; ++i) {
          const acc_t gv = static_cast<acc_t>(gr[i]);
          r_sum += gv * (static_cast<acc_t>(zr[i]) - b[c]);
          s_sum += gv;
        }
        if (pr) pr[c] += r_sum;
        if (ps) ps[c] += s_sum;
      }
    }
  });
}

at::Tensor dora_scale_cpu(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                          const std::optional<at::Tensor>& bias, int64_t dim) {
  const int64_t d = detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, "torchlora.dora_scale");
  const auto shape = detail::dora_scale_shape(z, d);
  const auto [g, b] = channel_vectors(magnitude, weight_norm, bias, detail::dora_accumulate_dtype(z.scalar_type()));
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty(z.sizes(), zc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "torchlora_dora_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_affine<scalar_t>(zc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
                             has_bias ? b.const_data_ptr<acc_t>() : nullptr, shape);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_scale_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& bias, int64_t dim, std::array<bool, 4> output_mask) {
  constexpr const char* op = "torchlora._dora_scale_backward";
  const int64_t d = detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, op);
  TORCH_CHECK_VALUE(grad_out.sizes() == z.sizes(), op, ": grad_out ", grad_out.sizes(), " must match z ", z.sizes());
  const auto shape = detail::dora_scale_shape(z, d);
  const auto [g, b] = channel_vectors(magnitude, weight_norm, bias, detail::dora_accumulate_dtype(z.scalar_type()));
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor gc = grad_out.to(z.scalar_type()).contiguous();
  const bool need_r = output_mask[1] || output_mask[2];
  const bool need_s = output_mask[3] && has_bias;
  auto none = [](const at::Tensor& t) { return at::empty({0}, t.options()); };

  at::Tensor grad_z = output_mask[0] ? at::empty(z.sizes(), gc.options()) : none(z);
  const int64_t rows = shape.inner == 1 ? shape.outer : shape.outer * shape.channels;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  at::Tensor partial_r = need_r ? at::zeros({chunks, shape.channels}, g.options()) : at::Tensor();
  at::Tensor partial_s = need_s ? at::zeros({chunks, shape.channels}, g.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "torchlora_dora_scale_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (output_mask[0]) {  // dz = g grad
      channel_affine<scalar_t>(gc.const_data_ptr<scalar_t>(), grad_z.mutable_data_ptr<scalar_t>(),
                               g.const_data_ptr<acc_t>(), nullptr, shape);
    }
    if (need_r || need_s) {
      const at::Tensor zc = z.contiguous();
      channel_sums<scalar_t>(gc.const_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(), b.const_data_ptr<acc_t>(),
                             need_r ? partial_r.mutable_data_ptr<acc_t>() : nullptr,
                             need_s ? partial_s.mutable_data_ptr<acc_t>() : nullptr, shape, chunks);
    }
  });
  if (!need_r && !need_s) return {grad_z, none(magnitude), none(weight_norm), has_bias ? none(*bias) : none(magnitude)};
  const at::Tensor R = need_r ? partial_r.sum(0) : at::Tensor();
  const at::Tensor S = need_s ? partial_s.sum(0) : at::Tensor();
  auto [grad_m, grad_n, grad_b] = detail::dora_scale_vector_grads(R, S, magnitude, weight_norm, bias, output_mask);
  return {grad_z, grad_m, grad_n, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("dora_scale", &dora_scale_cpu);
  m.impl("_dora_scale_backward", &dora_scale_backward_cpu);
}

}  // namespace torchlora::cpu
