// Schemas and C++ entry points of the DoRA operators (weight-decomposed LoRA): the weight norm
// ||W + s B A|| per output row without forming that matrix, its frozen part ||W||^2, and the
// rescaling of an adapted layer's output by magnitude / norm.
//
// dora_weight_norm and dora_scale have CPU, CUDA and Meta kernels and an Autograd kernel that
// calls a private backward op; dora_weight_sq_norm is one composite of ATen ops.
#include <torchlora/ops.h>

#include <torch/library.h>

#include "detail/dora_op_handles.h"

namespace torchlora {

TORCH_LIBRARY_FRAGMENT(torchlora, m) {
  m.def(
      "dora_weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, bool fan_in_fan_out=False, "
      "Tensor? weight_sq_norm=None) -> Tensor");
  // output_mask: weight, lora_A, lora_B, weight_sq_norm. has_sq_norm: the forward was given
  // weight_sq_norm, so the norm depends on weight only through the cross term. A gradient not
  // asked for is an empty [0] tensor.
  m.def(
      "_dora_weight_norm_backward(Tensor grad_norm, Tensor norm, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling, bool fan_in_fan_out, bool has_sq_norm, bool[4] output_mask) "
      "-> (Tensor grad_weight, Tensor grad_A, Tensor grad_B, Tensor grad_sq_norm)");
  m.def("dora_weight_sq_norm(Tensor weight, bool fan_in_fan_out=False) -> Tensor");
  m.def("dora_scale(Tensor z, Tensor magnitude, Tensor weight_norm, Tensor? bias=None, int dim=-1) -> Tensor");
  // output_mask: z, magnitude, weight_norm, bias.
  m.def(
      "_dora_scale_backward(Tensor grad_out, Tensor z, Tensor magnitude, Tensor weight_norm, Tensor? bias, int dim, "
      "bool[4] output_mask) -> (Tensor grad_z, Tensor grad_magnitude, Tensor grad_weight_norm, Tensor grad_bias)");
}

at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            double scaling, bool fan_in_fan_out, const std::optional<at::Tensor>& weight_sq_norm) {
  return detail::dora_weight_norm_op().call(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm);
}

at::Tensor dora_weight_sq_norm(const at::Tensor& weight, bool fan_in_fan_out) {
  return detail::dora_weight_sq_norm_op().call(weight, fan_in_fan_out);
}

at::Tensor dora_scale(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                      const std::optional<at::Tensor>& bias, int64_t dim) {
  return detail::dora_scale_op().call(z, magnitude, weight_norm, bias, dim);
}

}  // namespace torchlora
