#include "dora_math.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "dora_checks.h"

namespace torchlora::detail {
namespace {

// Elements of the float copy of one block of weight rows (16 MiB in float32): the most a
// half/bfloat16 weight is ever upcast at once.
constexpr int64_t kBlockElements = int64_t{1} << 22;

int64_t block_rows(const at::Tensor& rows) {
  return std::max<int64_t>(1, kBlockElements / std::max<int64_t>(1, rows.size(1)));
}

// rows [out, K] (any float dtype) @ rhs [K, c] (dtype ct) -> [out, c] in ct.
at::Tensor rows_mm(const at::Tensor& rows, const at::Tensor& rhs) {
  const auto ct = rhs.scalar_type();
  if (rows.scalar_type() == ct) return at::mm(rows, rhs);
  const int64_t out = rows.size(0), step = block_rows(rows);
  at::Tensor result = at::empty({out, rhs.size(1)}, rhs.options());
  for (int64_t r0 = 0; r0 < out; r0 += step) {
    const int64_t len = std::min(step, out - r0);
    at::Tensor slice = result.narrow(0, r0, len);
    at::mm_out(slice, rows.narrow(0, r0, len).to(ct), rhs);
  }
  return result;
}

// lhs [c, out] (dtype ct) @ rows [out, K] (any float dtype) -> [c, K] in ct.
at::Tensor mm_rows(const at::Tensor& lhs, const at::Tensor& rows) {
  const auto ct = lhs.scalar_type();
  if (rows.scalar_type() == ct) return at::mm(lhs, rows);
  const int64_t out = rows.size(0), step = block_rows(rows);
  at::Tensor result = at::zeros({lhs.size(0), rows.size(1)}, lhs.options());
  for (int64_t r0 = 0; r0 < out; r0 += step) {
    const int64_t len = std::min(step, out - r0);
    result.addmm_(lhs.narrow(1, r0, len), rows.narrow(0, r0, len).to(ct));
  }
  return result;
}

// The factors as matrices in the accumulation dtype: A [r, K], B [out, r].
at::Tensor factor_a(const at::Tensor& lora_A, at::ScalarType ct) {
  return lora_A.to(ct).reshape({lora_A.size(0), -1});
}
at::Tensor factor_b(const at::Tensor& lora_B, at::ScalarType ct) {
  return lora_B.to(ct).reshape({lora_B.size(0), -1}).contiguous();
}

// A gradient not asked for: a fresh [0] tensor (outputs of an op must not alias).
at::Tensor none_like(const at::Tensor& t) {
  return at::empty({0}, t.options());
}

}  // namespace

at::Tensor dora_weight_rows(const at::Tensor& weight, bool fan_in_fan_out) {
  if (weight.dim() == 2) return fan_in_fan_out ? weight.t() : weight;
  return weight.reshape({weight.size(0), -1});
}

at::Tensor dora_rows_sq_norm(const at::Tensor& rows, at::ScalarType dtype) {
  const int64_t out = rows.size(0), step = block_rows(rows);
  at::Tensor result = at::empty({out}, rows.options().dtype(dtype));
  for (int64_t r0 = 0; r0 < out; r0 += step) {
    const int64_t len = std::min(step, out - r0);
    const at::Tensor block = rows.narrow(0, r0, len).to(dtype);
    at::Tensor slice = result.narrow(0, r0, len);
    const int64_t reduce[1] = {1};
    at::sum_out(slice, block * block, at::IntArrayRef(reduce));
  }
  return result;
}

DoraNormTerms dora_norm_terms(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              double scaling, bool fan_in_fan_out, const std::optional<at::Tensor>& weight_sq_norm,
                              const char* op) {
  check_dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm, op);
  const auto ct = dora_accumulate_dtype(lora_A.scalar_type());
  const at::Tensor rows = dora_weight_rows(weight, fan_in_fan_out);
  const at::Tensor A = factor_a(lora_A, ct);
  DoraNormTerms terms;
  terms.lora_b = factor_b(lora_B, ct);
  terms.weight_a = rows_mm(rows, A.t()).contiguous();
  terms.b_gram = at::mm(terms.lora_b, at::mm(A, A.t())).contiguous();
  const bool has_sq = weight_sq_norm.has_value() && weight_sq_norm->defined();
  terms.sq_norm = has_sq ? weight_sq_norm->contiguous() : dora_rows_sq_norm(rows, ct);
  return terms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_weight_norm_backward_aten(
    const at::Tensor& grad_norm, const at::Tensor& norm, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, bool fan_in_fan_out, bool has_sq_norm,
    std::array<bool, 4> output_mask) {
  constexpr const char* op = "torchlora._dora_weight_norm_backward";
  check_dora_weight_norm(weight, lora_A, lora_B, scaling, fan_in_fan_out, std::nullopt, op);
  const auto ct = dora_accumulate_dtype(lora_A.scalar_type());
  const int64_t out = lora_B.size(0);
  TORCH_CHECK_VALUE(grad_norm.numel() == out && norm.numel() == out, op, ": grad_norm ", grad_norm.sizes(),
                    " and norm ", norm.sizes(), " must have ", out, " elements");
  const double s = scaling;
  // d n_i / d (n_i^2) = 1 / (2 n_i); rows whose norm is 0 get no gradient.
  const at::Tensor n = norm.to(ct).reshape({out});
  const at::Tensor gq = at::where(n > 0, grad_norm.to(ct).reshape({out}) / (2 * n), 0.0).unsqueeze(1);  // [out, 1]
  const at::Tensor rows = dora_weight_rows(weight, fan_in_fan_out);
  const at::Tensor A = factor_a(lora_A, ct);  // [r, K]
  const at::Tensor B = factor_b(lora_B, ct);  // [out, r]

  at::Tensor grad_w = none_like(weight), grad_a = none_like(lora_A), grad_b = none_like(lora_B);
  at::Tensor grad_sq = at::empty({0}, n.options());
  const at::Tensor gB = gq * B;  // diag(gq) B [out, r]
  if (output_mask[2]) {
    // dB = diag(gq) (2s W A^T + 2s^2 B A A^T)
    const at::Tensor g = rows_mm(rows, A.t()).mul_(2 * s).add_(at::mm(B, at::mm(A, A.t())), 2 * s * s);
    grad_b = (gq * g).reshape(lora_B.sizes()).to(lora_B.scalar_type());
  }
  if (output_mask[1]) {
    // dA = 2s B^T diag(gq) W + 2s^2 (B^T diag(gq) B) A
    const at::Tensor gBt = gB.t().contiguous();
    const at::Tensor g = mm_rows(gBt, rows).mul_(2 * s).add_(at::mm(at::mm(gBt, B), A), 2 * s * s);
    grad_a = g.reshape(lora_A.sizes()).to(lora_A.scalar_type());
  }
  if (output_mask[0]) {
    // dW = diag(gq) (2 W + 2s B A); without the 2 W term when ||W||^2 came in as an input.
    at::Tensor g = at::mm(gB, A).mul_(2 * s);
    if (!has_sq_norm) g.add_(gq * rows.to(ct), 2.0);
    if (weight.dim() == 2 && fan_in_fan_out) g = g.t();
    grad_w = g.reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
  }
  if (output_mask[3]) grad_sq = gq.reshape({out}).clone();
  return {grad_w, grad_a, grad_b, grad_sq};
}

DoraScaleShape dora_scale_shape(const at::Tensor& z, int64_t dim) {
  DoraScaleShape shape{1, z.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) shape.outer *= z.size(d);
  for (int64_t d = dim + 1; d < z.dim(); ++d) shape.inner *= z.size(d);
  return shape;
}

at::Tensor dora_channel_vector(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).reshape({-1}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_scale_vector_grads(
    const at::Tensor& R, const at::Tensor& S, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& bias, std::array<bool, 4> output_mask) {
  const auto ct = R.defined() ? R.scalar_type() : S.scalar_type();
  const at::Tensor m = dora_channel_vector(magnitude, ct), n = dora_channel_vector(weight_norm, ct);
  at::Tensor grad_m = none_like(magnitude), grad_n = none_like(weight_norm);
  at::Tensor grad_bias = bias.has_value() && bias->defined() ? none_like(*bias) : none_like(magnitude);
  if (output_mask[1]) grad_m = (R / n).reshape(magnitude.sizes()).to(magnitude.scalar_type());
  if (output_mask[2]) grad_n = (-R * m / (n * n)).reshape(weight_norm.sizes()).to(weight_norm.scalar_type());
  if (output_mask[3] && bias.has_value() && bias->defined()) {
    grad_bias = (S * (1 - m / n)).reshape(bias->sizes()).to(bias->scalar_type());
  }
  return {grad_m, grad_n, grad_bias};
}

}  // namespace torchlora::detail
