// Schemas and C++ entry points of the multi-adapter operators: one batch, many adapters, each
// row choosing a slot of a stacked adapter (BGMV/SGMV in Punica's and vLLM's terms).
//
// Two primitives carry the kernels (CPU, CUDA, Meta) and their autograd:
//   multi_lora_shrink:  h[t] = lora_A[slot[t]] @ x[t]                                   [T, r] float32
//   multi_lora_expand:  out[t] = base_out[t] + scale[slot[t]] * (lora_B[slot[t]] @ h[t] + lora_bias[slot[t]])
// (rows with slot -1 keep base_out). The layer-shaped ops (linear, in place, fused with the base
// linear, embedding, conv2d) are compositions of them and ATen ops, so they run and
// differentiate on every backend without a kernel of their own (composite/multi_lora_*.cpp).
#include <torchlora/ops.h>

#include <torch/library.h>

#include "detail/multi_lora_op_handles.h"

namespace torchlora {

TORCH_LIBRARY_FRAGMENT(torchlora, m) {
  m.def("multi_lora_shrink(Tensor x, Tensor lora_A, Tensor slot_index) -> Tensor");
  m.def(
      "_multi_lora_shrink_backward(Tensor grad_h, Tensor x, Tensor lora_A, Tensor slot_index, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor grad_A)");
  m.def(
      "multi_lora_expand(Tensor base_out, Tensor h, Tensor lora_B, Tensor? lora_bias, Tensor scale, "
      "Tensor slot_index) -> Tensor");
  m.def(
      "multi_lora_expand_(Tensor(a!) base_out, Tensor h, Tensor lora_B, Tensor? lora_bias, Tensor scale, "
      "Tensor slot_index) -> Tensor(a!)",
      {at::Tag::inplace});
  // output_mask: h, lora_B, lora_bias, scale. A gradient not asked for is an empty [0] tensor.
  m.def(
      "_multi_lora_expand_backward(Tensor grad_out, Tensor h, Tensor lora_B, Tensor? lora_bias, Tensor scale, "
      "Tensor slot_index, bool[4] output_mask) "
      "-> (Tensor grad_h, Tensor grad_B, Tensor grad_lora_bias, Tensor grad_scale)");

  m.def(
      "multi_lora_linear(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "Tensor scale, Tensor slot_index) -> Tensor");
  m.def(
      "multi_lora_linear_(Tensor(a!) base_out, Tensor x, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "Tensor scale, Tensor slot_index) -> Tensor(a!)",
      {at::Tag::inplace});
  m.def(
      "linear_with_multi_lora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor? lora_bias, Tensor scale, Tensor slot_index) -> Tensor");
  // linear_with_multi_lora when nothing needs a gradient, on the CPU: the base GEMM and the adapters
  // chunk by chunk while the rows are in cache (cpu/linear_with_multi_lora.cpp). x is [T, in].
  m.def(
      "_linear_with_multi_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor? lora_bias, Tensor scale, Tensor slot_index) -> Tensor");
  m.def(
      "multi_lora_embedding(Tensor ids, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor scale, "
      "Tensor slot_index, int padding_idx=-1) -> Tensor");
  m.def(
      "multi_lora_conv2d(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "Tensor scale, Tensor slot_index, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // DoRA's per-row output scale for served adapters (composite/multi_dora_scale.cpp).
  m.def("multi_dora_scale(Tensor z, Tensor factor, Tensor? bias, Tensor slot_index, int dim=-1) -> Tensor");
}

at::Tensor multi_lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& slot_index) {
  return detail::multi_lora_shrink_op().call(x, lora_A, slot_index);
}

at::Tensor multi_lora_expand(const at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                             const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                             const at::Tensor& slot_index) {
  return detail::multi_lora_expand_op().call(base_out, h, lora_B, lora_bias, scale, slot_index);
}

at::Tensor& multi_lora_expand_(at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                               const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                               const at::Tensor& slot_index) {
  return detail::multi_lora_expand_inplace_op().call(base_out, h, lora_B, lora_bias, scale, slot_index);
}

at::Tensor multi_lora_linear(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                             const at::Tensor& scale, const at::Tensor& slot_index) {
  return detail::multi_lora_linear_op().call(x, base_out, lora_A, lora_B, lora_bias, scale, slot_index);
}

at::Tensor& multi_lora_linear_(at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A,
                               const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                               const at::Tensor& scale, const at::Tensor& slot_index) {
  return detail::multi_lora_linear_inplace_op().call(base_out, x, lora_A, lora_B, lora_bias, scale, slot_index);
}

at::Tensor linear_with_multi_lora(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                  const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                  const at::Tensor& scale, const at::Tensor& slot_index) {
  return detail::linear_with_multi_lora_op().call(x, weight, bias, lora_A, lora_B, lora_bias, scale, slot_index);
}

at::Tensor multi_lora_embedding(const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
                                const at::Tensor& lora_B, const at::Tensor& scale, const at::Tensor& slot_index,
                                int64_t padding_idx) {
  return detail::multi_lora_embedding_op().call(ids, base_out, lora_A, lora_B, scale, slot_index, padding_idx);
}

at::Tensor multi_lora_conv2d(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                             const at::Tensor& scale, const at::Tensor& slot_index, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return detail::multi_lora_conv2d_op().call(x, base_out, lora_A, lora_B, lora_bias, scale, slot_index, stride,
                                             padding, dilation, groups);
}

at::Tensor multi_dora_scale(const at::Tensor& z, const at::Tensor& factor, const std::optional<at::Tensor>& bias,
                            const at::Tensor& slot_index, int64_t dim) {
  return detail::multi_dora_scale_op().call(z, factor, bias, slot_index, dim);
}

}  // namespace torchlora
