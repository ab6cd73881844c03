// Schemas of the torchlora operators, their plain C++ entry points, and the backend-agnostic
// kernels of the public ops (which run the private forward op and drop what only backward needs).
#include <torchlora/ops.h>

#include <ATen/ops/randint.h>
#include <torch/library.h>

#include "detail/op_handles.h"

namespace torchlora {

// In the backward ops, needs_bias_grad asks for the gradient of the base layer's `bias` and
// needs_lora_bias_grad for that of `lora_bias` (false when it is absent or frozen); a
// gradient not asked for comes back as an empty [0] tensor.
TORCH_LIBRARY(torchlora, m) {
  m.def(
      "lora_linear(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "float scaling, float dropout_p=0., Tensor? seed=None) -> Tensor");
  m.def(
      "_lora_linear_forward(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "float scaling, float dropout_p, Tensor? seed) -> (Tensor out, Tensor shrunk)");
  m.def(
      "_lora_linear_backward(Tensor grad_out, Tensor x, Tensor shrunk, Tensor lora_A, Tensor lora_B, "
      "bool needs_lora_bias_grad, float scaling, float dropout_p, Tensor? seed, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_lora_bias)");
  // In-place variant: accumulates into the base layer's output (no new [T, out] tensor).
  m.def(
      "lora_linear_(Tensor(a!) base_out, Tensor x, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "float scaling, float dropout_p=0., Tensor? seed=None) -> Tensor(a!)",
      {at::Tag::inplace});
  m.def(
      "_lora_linear_forward_(Tensor(a!) base_out, Tensor x, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "float scaling, float dropout_p, Tensor? seed) -> Tensor shrunk");

  // A frozen nn.Linear and one adapter as one op, so the base GEMM and the low-rank path
  // share their passes (CPU: see cpu/linear_with_lora.cpp).
  m.def(
      "linear_with_lora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "float scaling, float dropout_p=0., Tensor? seed=None) -> Tensor");
  m.def(
      "_linear_with_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor? lora_bias, float scaling, float dropout_p, Tensor? seed, bool keep_shrunk) "
      "-> (Tensor out, Tensor shrunk, Tensor dropped_bits)");
  m.def(
      "_linear_with_lora_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor shrunk, Tensor dropped_bits, "
      "Tensor lora_A, "
      "Tensor lora_B, bool needs_bias_grad, bool needs_lora_bias_grad, float scaling, float dropout_p, Tensor? seed, "
      "bool[4] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_A, Tensor grad_B, "
      "Tensor grad_bias, Tensor grad_lora_bias)");

  m.def(
      "lora_embedding(Tensor ids, Tensor base_out, Tensor lora_A, Tensor lora_B, float scaling, "
      "int padding_idx=-1, bool scale_grad_by_freq=False) -> Tensor");
  m.def(
      "_lora_embedding_forward(Tensor ids, Tensor base_out, Tensor lora_A, Tensor lora_B, float scaling) "
      "-> (Tensor out, Tensor gathered)");
  m.def(
      "_lora_embedding_backward(Tensor grad_out, Tensor ids, Tensor gathered, Tensor lora_A, "
      "Tensor lora_B, float scaling, int padding_idx, bool scale_grad_by_freq, bool[2] output_mask) "
      "-> (Tensor grad_A, Tensor grad_B)");

  m.def(
      "lora_conv2d(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float scaling, float dropout_p=0., "
      "Tensor? seed=None) -> Tensor");
  m.def(
      "_lora_conv2d_forward(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float scaling, float dropout_p, "
      "Tensor? seed) -> (Tensor out, Tensor shrunk)");
  m.def(
      "_lora_conv2d_backward(Tensor grad_out, Tensor x, Tensor shrunk, Tensor lora_A, Tensor lora_B, "
      "bool needs_lora_bias_grad, int[2] stride, int[2] padding, int[2] dilation, int groups, float scaling, "
      "float dropout_p, Tensor? seed, bool[3] output_mask) "
      "-> (Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_lora_bias)");

  m.def("dropout_apply(Tensor x, float p, Tensor seed) -> Tensor");

  // The change an adapter makes to its base layer's weight (PEFT's get_delta_weight), for merging.
  // One CompositeImplicitAutograd kernel (composite/lora_delta_weight.cpp) serves every backend.
  m.def(
      "lora_delta_weight(Tensor lora_A, Tensor lora_B, float scaling, bool fan_in_fan_out=False, "
      "ScalarType? dtype=None) -> Tensor");
}

namespace {

at::Tensor lora_linear_composite(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                 double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  return std::get<0>(
      detail::lora_linear_forward_op().call(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed));
}

at::Tensor& lora_linear_inplace_composite(at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                          double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  detail::lora_linear_forward_inplace_op().call(base_out, x, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
  return base_out;
}

at::Tensor linear_with_lora_composite(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                     double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  return std::get<0>(detail::linear_with_lora_forward_op().call(x, weight, bias, lora_A, lora_B, lora_bias, scaling,
                                                                dropout_p, seed, /*keep_shrunk=*/false));
}

at::Tensor lora_embedding_composite(const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
                                    const at::Tensor& lora_B, double scaling, int64_t /*padding_idx*/,
                                    bool /*scale_grad_by_freq*/) {
  return std::get<0>(detail::lora_embedding_forward_op().call(ids, base_out, lora_A, lora_B, scaling));
}

at::Tensor lora_conv2d_composite(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                 int64_t groups, double scaling, double dropout_p,
                                 const std::optional<at::Tensor>& seed) {
  return std::get<0>(detail::lora_conv2d_forward_op().call(x, base_out, lora_A, lora_B, lora_bias, stride,
                                                           padding, dilation, groups, scaling, dropout_p, seed));
}

}  // namespace

// Without autograd (inference mode, or tensors that carry no autograd key) the public ops
// are their forward op.
TORCH_LIBRARY_IMPL(torchlora, CompositeExplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear_composite);
  m.impl("lora_linear_", &lora_linear_inplace_composite);
  m.impl("linear_with_lora", &linear_with_lora_composite);
  m.impl("lora_embedding", &lora_embedding_composite);
  m.impl("lora_conv2d", &lora_conv2d_composite);
}

at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, double scaling,
                       double dropout_p, const std::optional<at::Tensor>& seed) {
  return detail::lora_linear_op().call(x, base_out, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
}

at::Tensor& lora_linear_(at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, double scaling,
                         double dropout_p, const std::optional<at::Tensor>& seed) {
  return detail::lora_linear_inplace_op().call(base_out, x, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
}

at::Tensor linear_with_lora(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  return detail::linear_with_lora_op().call(x, weight, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed);
}

at::Tensor lora_embedding(const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
                          const at::Tensor& lora_B, double scaling, int64_t padding_idx,
                          bool scale_grad_by_freq) {
  return detail::lora_embedding_op().call(ids, base_out, lora_A, lora_B, scaling, padding_idx,
                                          scale_grad_by_freq);
}

at::Tensor lora_conv2d(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups, double scaling, double dropout_p,
                       const std::optional<at::Tensor>& seed) {
  return detail::lora_conv2d_op().call(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation, groups,
                                       scaling, dropout_p, seed);
}

at::Tensor dropout_apply(const at::Tensor& x, double p, const at::Tensor& seed) {
  return detail::dropout_apply_op().call(x, p, seed);
}

at::Tensor lora_delta_weight(const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, bool fan_in_fan_out,
                             std::optional<at::ScalarType> dtype) {
  return detail::lora_delta_weight_op().call(lora_A, lora_B, scaling, fan_in_fan_out, dtype);
}

at::Tensor make_seed(c10::Device device) {
  return at::randint(int64_t{0}, int64_t{1} << 62, {1}, at::TensorOptions().dtype(at::kLong).device(device));
}

}  // namespace torchlora
