// CPU kernels of dora_scale: out = g (z - bias) + bias with g = magnitude / weight_norm per
// channel, over z seen as [outer, C, inner] rows of `inner` contiguous elements, in parallel over
// rows. Backward: dz = g grad elementwise, and the per-channel sums R = sum grad (z - bias) and
// S = sum grad, each chunk of rows summing into its own partial vector (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../detail/dora_checks.h"
#include "../detail/dora_math.h"

namespace torchlora::cpu {
namespace {

// Rows per parallel task: about 32k elements.
int64_t row_grain(int64_t inner) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, inner));
}

at::Tensor dora_scale_cpu(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                          const std::optional<at::Tensor>& bias, int64_t dim) {
  const int64_t d = detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, "torchlora.dora_scale");
  const auto shape = detail::dora_scale_shape(z, d);
  const auto ct = detail::dora_accumulate_dtype(z.scalar_type());
  const at::Tensor g = detail::dora_channel_vector(magnitude, ct) / detail::dora_channel_vector(weight_norm, ct);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? detail::dora_channel_vector(*bias, ct) : at::Tensor();
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty(z.sizes(), zc.options());
  const int64_t rows = shape.outer * shape.channels, C = shape.channels, inner = shape.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "torchlora_dora_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(inner), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % C;
        const acc_t gc = gp[c], bc = bp ? bp[c] : acc_t(0);
        const scalar_t* zr = zp + row * inner;
        scalar_t* orow = op + row * inner;
        for (int64_t i = 0; i < inner; ++i) orow[i] = static_cast<scalar_t>(gc * (static_cast<acc_t>(zr[i]) - bc) + bc);
      }
    });
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
  const auto ct = detail::dora_accumulate_dtype(z.scalar_type());
  const at::Tensor g = detail::dora_channel_vector(magnitude, ct) / detail::dora_channel_vector(weight_norm, ct);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? detail::dora_channel_vector(*bias, ct) : at::Tensor();
  const at::Tensor gc = grad_out.to(z.scalar_type()).contiguous();
  const at::Tensor zc = z.contiguous();
  const int64_t rows = shape.outer * shape.channels, C = shape.channels, inner = shape.inner;
  const bool need_r = output_mask[1] || output_mask[2];
  const bool need_s = output_mask[3] && has_bias;

  at::Tensor grad_z = output_mask[0] ? at::empty(z.sizes(), zc.options()) : at::empty({0}, z.options());
  // Per-chunk partial sums [chunks, C]: a fixed split, so the result does not depend on threads.
  const int64_t chunks = (need_r || need_s) ? std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads())) : 0;
  at::Tensor partial_r = need_r ? at::zeros({chunks, C}, g.options()) : at::Tensor();
  at::Tensor partial_s = need_s ? at::zeros({chunks, C}, g.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "torchlora_dora_scale_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp_out = gc.const_data_ptr<scalar_t>();
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : nullptr;
    if (output_mask[0]) {
      scalar_t* dz = grad_z.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(inner), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const acc_t gch = gp[row % C];
          const scalar_t* gr = gp_out + row * inner;
          scalar_t* dr = dz + row * inner;
          for (int64_t i = 0; i < inner; ++i) dr[i] = static_cast<scalar_t>(gch * static_cast<acc_t>(gr[i]));
        }
      });
    }
    if (chunks == 0) return;
    acc_t* pr = need_r ? partial_r.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ps = need_s ? partial_s.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
        for (int64_t row = r0; row < r1; ++row) {
          const int64_t c = row % C;
          const acc_t bc = bp ? bp[c] : acc_t(0);
          const scalar_t* gr = gp_out + row * inner;
          const scalar_t* zr = zp + row * inner;
          acc_t r_sum = 0, s_sum = 0;
          for (int64_t i = 0; i < inner; ++i) {
            const acc_t gv = static_cast<acc_t>(gr[i]);
            r_sum += gv * (static_cast<acc_t>(zr[i]) - bc);
            s_sum += gv;
          }
          if (pr) pr[chunk * C + c] += r_sum;
          if (ps) ps[chunk * C + c] += s_sum;
        }
      }
    });
  });
  const at::Tensor R = need_r ? partial_r.sum(0) : at::Tensor();
  const at::Tensor S = need_s ? partial_s.sum(0) : at::Tensor();
  if (!need_r && !need_s) {
    auto none = [](const at::Tensor& t) { return at::empty({0}, t.options()); };
    return {grad_z, none(magnitude), none(weight_norm), has_bias ? none(*bias) : none(magnitude)};
  }
  auto [grad_m, grad_n, grad_b] = detail::dora_scale_vector_grads(R, S, magnitude, weight_norm, bias, output_mask);
  return {grad_z, grad_m, grad_n, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("dora_scale", &dora_scale_cpu);
  m.impl("_dora_scale_backward", &dora_scale_backward_cpu);
}

}  // namespace torchlora::cpu
