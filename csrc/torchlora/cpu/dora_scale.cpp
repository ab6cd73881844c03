// CPU kernels of dora_scale: out = g (z - bias) + bias with g = magnitude / weight_norm per
// channel, in parallel over rows. Backward: dz = g grad and the per-channel sums
// R = sum grad (z - bias) and S = sum grad in one pass, each chunk of rows summing into its own
// partial vector (deterministic).
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
#include <utility>

#include "../detail/dora_checks.h"
#include "../detail/dora_math.h"

namespace torchlora::cpu {
namespace {

// z seen as [outer, C, inner]. Linear and embedding outputs have inner == 1: their rows are
// whole [C] channel vectors, walked with contiguous (vectorisable) loops over c; conv outputs
// [N, C, H*W] have one channel per row of `inner` elements.
struct Rows {
  int64_t count, length;  // rows of `length` contiguous elements
  bool channel_rows;      // a row holds all C channels (inner == 1)
};

Rows rows_of(const detail::DoraScaleShape& shape) {
  if (shape.inner == 1) return {shape.outer, shape.channels, true};
  return {shape.outer * shape.channels, shape.inner, false};
}

// Rows per parallel task: about 32k elements.
int64_t row_grain(int64_t length) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, length));
}

// The per-channel gain g = m / n and bias (zeros when absent) in the accumulation dtype.
std::pair<at::Tensor, at::Tensor> gain_and_bias(const at::Tensor& magnitude, const at::Tensor& weight_norm,
                                                const std::optional<at::Tensor>& bias, at::ScalarType ct) {
  at::Tensor g = detail::dora_channel_vector(magnitude, ct) / detail::dora_channel_vector(weight_norm, ct);
  at::Tensor b = bias.has_value() && bias->defined() ? detail::dora_channel_vector(*bias, ct)
                                                     : at::zeros({g.numel()}, g.options());
  return {g.contiguous(), b.contiguous()};
}

at::Tensor dora_scale_cpu(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                          const std::optional<at::Tensor>& bias, int64_t dim) {
  const int64_t d = detail::check_dora_scale(z, magnitude, weight_norm, bias, dim, "torchlora.dora_scale");
  const auto shape = detail::dora_scale_shape(z, d);
  const auto [g, b] = gain_and_bias(magnitude, weight_norm, bias, detail::dora_accumulate_dtype(z.scalar_type()));
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty(z.sizes(), zc.options());
  const Rows rows = rows_of(shape);
  const int64_t C = shape.channels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "torchlora_dora_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    at::parallel_for(0, rows.count, row_grain(rows.length), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* zr = zp + row * rows.length;
        scalar_t* orow = op + row * rows.length;
        if (rows.channel_rows) {
          for (int64_t c = 0; c < C; ++c) {
            orow[c] = static_cast<scalar_t>(gp[c] * (static_cast<acc_t>(zr[c]) - bp[c]) + bp[c]);
          }
        } else {
          const acc_t gc = gp[row % C], bc = bp[row % C];
          for (int64_t i = 0; i < rows.length; ++i) {
            orow[i] = static_cast<scalar_t>(gc * (static_cast<acc_t>(zr[i]) - bc) + bc);
          }
        }
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
  const auto [g, b] = gain_and_bias(magnitude, weight_norm, bias, detail::dora_accumulate_dtype(z.scalar_type()));
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor gc = grad_out.to(z.scalar_type()).contiguous();
  const at::Tensor zc = z.contiguous();
  const Rows rows = rows_of(shape);
  const int64_t C = shape.channels;
  const bool need_dz = output_mask[0];
  const bool need_r = output_mask[1] || output_mask[2];
  const bool need_s = output_mask[3] && has_bias;

  at::Tensor grad_z = need_dz ? at::empty(z.sizes(), zc.options()) : at::empty({0}, z.options());
  // dz and the per-channel sums in one pass over grad and z, in a fixed split into chunks whose
  // partial sums [chunks, C] are added afterwards: the result does not depend on the threads.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows.count, 4 * at::get_num_threads()));
  at::Tensor partial_r = need_r ? at::zeros({chunks, C}, g.options()) : at::Tensor();
  at::Tensor partial_s = need_s ? at::zeros({chunks, C}, g.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "torchlora_dora_scale_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp_out = gc.const_data_ptr<scalar_t>();
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    scalar_t* dz = need_dz ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* pr = need_r ? partial_r.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ps = need_s ? partial_s.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t chunk = cb; chunk < ce; ++chunk) {
        const int64_t r0 = rows.count * chunk / chunks, r1 = rows.count * (chunk + 1) / chunks;
        acc_t* rsum = pr ? pr + chunk * C : nullptr;
        acc_t* ssum = ps ? ps + chunk * C : nullptr;
        for (int64_t row = r0; row < r1; ++row) {
          const scalar_t* gr = gp_out + row * rows.length;
          const scalar_t* zr = zp + row * rows.length;
          scalar_t* dr = dz ? dz + row * rows.length : nullptr;
          if (rows.channel_rows) {
            if (dr) {
              for (int64_t c = 0; c < C; ++c) dr[c] = static_cast<scalar_t>(gp[c] * static_cast<acc_t>(gr[c]));
            }
            if (rsum) {
              for (int64_t c = 0; c < C; ++c) rsum[c] += static_cast<acc_t>(gr[c]) * (static_cast<acc_t>(zr[c]) - bp[c]);
            }
            if (ssum) {
              for (int64_t c = 0; c < C; ++c) ssum[c] += static_cast<acc_t>(gr[c]);
            }
            continue;
          }
          const int64_t c = row % C;
          const acc_t gch = gp[c], bc = bp[c];
          acc_t r_acc = 0, s_acc = 0;
          for (int64_t i = 0; i < rows.length; ++i) {
            const acc_t gv = static_cast<acc_t>(gr[i]);
            if (dr) dr[i] = static_cast<scalar_t>(gch * gv);
            r_acc += gv * (static_cast<acc_t>(zr[i]) - bc);
            s_acc += gv;
          }
          if (rsum) rsum[c] += r_acc;
          if (ssum) ssum[c] += s_acc;
        }
      }
    });
  });
  if (!need_r && !need_s) {
    auto none = [](const at::Tensor& t) { return at::empty({0}, t.options()); };
    return {grad_z, none(magnitude), none(weight_norm), has_bias ? none(*bias) : none(magnitude)};
  }
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
