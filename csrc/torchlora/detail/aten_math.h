// Device-generic implementations of the torchlora forward/backward ops, written with ATen
// calls (BLAS GEMMs, cuDNN/oneDNN convolutions). The CPU and CUDA registrations use them
// where no dedicated kernel exists; they are also the readable statement of the math.
// The dropout mask always comes from the dropout_apply op, so every backend draws the same.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchlora::detail {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// out, shrunk = base_out + scaling * (s @ B^T + bias), s = dropout(x) @ A^T (float32 [T, r])
TensorPair lora_linear_forward_aten(const at::Tensor& x, const at::Tensor& base_out,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    const std::optional<at::Tensor>& lora_bias, double scaling,
                                    double dropout_p, const std::optional<at::Tensor>& seed);

// grad_x, grad_A, grad_B, grad_lora_bias (an empty [0] tensor where not asked for)
TensorQuad lora_linear_backward_aten(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& shrunk, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, bool needs_lora_bias_grad, double scaling,
                                     double dropout_p, const std::optional<at::Tensor>& seed,
                                     std::array<bool, 3> output_mask);

// out, gathered = base_out + scaling * h @ B^T, h = A^T[ids] (float32 [N, r])
TensorPair lora_embedding_forward_aten(const at::Tensor& ids, const at::Tensor& base_out,
                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                       double scaling);

// grad_A, grad_B
TensorPair lora_embedding_backward_aten(const at::Tensor& grad_out, const at::Tensor& ids,
                                        const at::Tensor& gathered, const at::Tensor& lora_A,
                                        const at::Tensor& lora_B, double scaling, int64_t padding_idx,
                                        bool scale_grad_by_freq, std::array<bool, 2> output_mask);

// out, shrunk = base_out + scaling * conv1x1(h, B, bias, groups), h = conv2d(dropout(x), A) (float32)
TensorPair lora_conv2d_forward_aten(const at::Tensor& x, const at::Tensor& base_out,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B,
                                    const std::optional<at::Tensor>& lora_bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    double scaling, double dropout_p, const std::optional<at::Tensor>& seed);

TensorQuad lora_conv2d_backward_aten(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& shrunk, const at::Tensor& lora_A,
                                     const at::Tensor& lora_B, bool needs_lora_bias_grad, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                     double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
                                     std::array<bool, 3> output_mask);

// out = base_out + alpha * delta, in base_out's dtype; the one accumulation rule of all ops.
at::Tensor accumulate_into_base(const at::Tensor& base_out, const at::Tensor& delta, double alpha);

// base_out += scaling * (shrunk @ B^T + bias) in place; shrunk [T, r] and B [out, r] in the
// compute dtype. A contiguous base_out of that dtype takes it as one GEMM (alpha = scaling,
// beta = 1) with no temporary [T, out] tensor.
void expand_into_base_(at::Tensor& base_out, const at::Tensor& shrunk, const at::Tensor& lora_B,
                       const std::optional<at::Tensor>& lora_bias, double scaling);

// The in-place variant of lora_linear_forward_aten: updates base_out, returns the float32 shrunk.
at::Tensor lora_linear_forward_inplace_aten(at::Tensor& base_out, const at::Tensor& x,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            const std::optional<at::Tensor>& lora_bias, double scaling,
                                            double dropout_p, const std::optional<at::Tensor>& seed);

}  // namespace torchlora::detail
