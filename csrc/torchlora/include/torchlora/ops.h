// Public C++ entry points of the torchlora operators. Each one calls the PyTorch dispatcher,
// so C++ callers get autograd, device selection and the same kernels as Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

#include <torchlora/export.h>

namespace torchlora {

// out = base_out + scaling * (dropout_p(x) @ lora_A^T) @ lora_B^T (+ scaling * lora_bias)
//   x         [..., in]      lora_A [r, in]      lora_B [out, r]     lora_bias [out]
//   base_out  [..., out]     (the frozen layer's output; its gradient passes through)
//   seed      int64 tensor with one element; required when dropout_p > 0. The dropout mask
//             is a function of (seed, element index), so backward regenerates it.
TORCHLORA_API at::Tensor lora_linear(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, double scaling,
    double dropout_p = 0.0, const std::optional<at::Tensor>& seed = std::nullopt);

// In-place lora_linear: base_out += scaling * (dropout_p(x) @ lora_A^T) @ lora_B^T (+ scaling *
// lora_bias), returning base_out. Saves the [..., out] tensor and the pass that writes it. Under
// autograd base_out must not be a leaf that requires grad, and nothing else may have saved it
// for backward (autograd's version check reports it); a frozen nn.Linear's output qualifies.
TORCHLORA_API at::Tensor& lora_linear_(
    at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, double scaling, double dropout_p = 0.0,
    const std::optional<at::Tensor>& seed = std::nullopt);

// out = x @ weight^T + bias + scaling * (dropout_p(x) @ lora_A^T) @ lora_B^T (+ scaling * lora_bias):
// a (frozen) nn.Linear and one adapter in a single op, so the base GEMM and the low-rank path
// share their passes over memory. Shapes as lora_linear, with weight [out, in], bias [out].
TORCHLORA_API at::Tensor linear_with_lora(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    double scaling, double dropout_p = 0.0, const std::optional<at::Tensor>& seed = std::nullopt);

// out = base_out + scaling * embedding(ids, lora_A^T) @ lora_B^T
//   ids [...] (int64/int32)   lora_A [r, num_embeddings]   lora_B [embedding_dim, r]
//   base_out [..., embedding_dim]. padding_idx < 0 means none (already normalised).
TORCHLORA_API at::Tensor lora_embedding(
    const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, int64_t padding_idx = -1,
    bool scale_grad_by_freq = false);

// out = base_out + scaling * conv1x1(conv2d(dropout_p(x), lora_A, stride, padding, dilation),
//                                     lora_B, lora_bias, groups)
//   x [N, in, H, W]   lora_A [r, in, kh, kw]   lora_B [out, r / groups, 1, 1]
//   base_out [N, out, H', W']
TORCHLORA_API at::Tensor lora_conv2d(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    double scaling, double dropout_p = 0.0, const std::optional<at::Tensor>& seed = std::nullopt);

// The inverted-dropout multiplier that the ops above apply: x * mask / (1 - p) where the mask
// comes from (seed, row-major element index). Exposed for tests and custom kernels.
TORCHLORA_API at::Tensor dropout_apply(const at::Tensor& x, double p, const at::Tensor& seed);

// The change a LoRA adapter makes to its base layer's weight, in that weight's layout: PEFT's
// get_delta_weight, the one definition that merging (Python and C++ layers, adapter files) uses.
//   2-D factors lora_A [r, in], lora_B [out, r]                -> scaling * B @ A      [out, in]
//     fan_in_fan_out (a base weight stored [in, out])          -> (scaling * B @ A)^T  [in, out]
//       transformers Conv1D; nn.Embedding too: lora_A [r, V], lora_B [D, r] -> [V, D]
//   4-D factors lora_A [r, in, kh, kw], lora_B [out, r, 1, 1]  -> [out, in, kh, kw]: PEFT's
//     squeezed matmul (1x1 kernels) and conv2d(A^T, B)^T (k x k), which lora_B's 1x1 kernel makes
//     the same product B[:, :, 0, 0] @ A.flatten(1). A conv adapter with groups > 1 (lora_B
//     [out, r / groups, 1, 1]) raises NotImplementedError: its delta has no place in the grouped
//     base weight (PEFT cannot merge it either).
// Precision: float16/bfloat16 factors are multiplied in float32 on every device (PEFT does so on
// the CPU only), so the delta is rounded once and is the same wherever it is computed; float64
// stays float64. The result is contiguous, in `dtype`, by default the factors' dtype (PEFT's).
// lora_A and lora_B must share dtype and device. Differentiable in lora_A and lora_B.
TORCHLORA_API at::Tensor lora_delta_weight(
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, bool fan_in_fan_out = false,
    std::optional<at::ScalarType> dtype = std::nullopt);

// A fresh seed tensor for the ops above, drawn from the default generator of `device`.
TORCHLORA_API at::Tensor make_seed(c10::Device device);

// ---- DoRA (weight-decomposed LoRA) -------------------------------------------------------------
// The one definition of DoRA's weight norm: the L2 norm of every output row of W + scaling * B @ A,
// computed without forming that matrix, from
//   ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T.
//   weight        [out, in] (fan_in_fan_out: stored [in, out], as transformers Conv1D and, for
//                 DoRA, nn.Embedding's [num_emb, dim] whose "rows" are its dim columns), or a conv
//                 kernel [out, in, kh, kw] (read as [out, in * kh * kw]); any float dtype
//   lora_A        [r, in] or [r, in, kh, kw]      lora_B [out, r] or [out, r, 1, 1]
//   weight_sq_norm  optional cached ||W_i||^2 [out] float32 (float64 for float64 factors), from
//                 dora_weight_sq_norm; computed when absent
// Returns [out] in lora_A's dtype, accumulated in float32 (float64 for float64). A quantized base
// passes its dequantized weight a block of rows at a time (with the matching rows of lora_B and
// weight_sq_norm): rows are independent. Differentiable in lora_A, lora_B and weight (the
// gradient of the norm of W + s B A); DoRA itself detaches it. Given weight_sq_norm, the norm
// reads weight only in the cross term, so weight's own 2 W part of the gradient flows through
// weight_sq_norm (d n / d weight_sq_norm = 1 / (2 n)) and dora_weight_sq_norm. Half/bfloat16
// weights are upcast a block of rows at a time; a conv with groups > 1 raises NotImplementedError.
TORCHLORA_API at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                          double scaling, bool fan_in_fan_out = false,
                                          const std::optional<at::Tensor>& weight_sq_norm = std::nullopt);

// ||W_i||^2 per output row, [out] float32 (float64 for float64): the part of dora_weight_norm that
// is fixed while the base weight is frozen, cached by the layers. Layouts as dora_weight_norm.
TORCHLORA_API at::Tensor dora_weight_sq_norm(const at::Tensor& weight, bool fan_in_fan_out = false);

// DoRA's output from the adapted layer's output without DoRA:
//   out = (magnitude / weight_norm) * (z - bias) + bias
// along dimension `dim` of z (size out; -1 for linear and embedding outputs [..., out], 1 for conv
// outputs [N, out, H, W]). z = base_out + scaling * lora_out (what lora_linear / linear_with_lora /
// lora_embedding / lora_conv2d return), bias the base layer's bias (absent: zero). This is PEFT's
// base + (m / n - 1) * (base - bias) + (m / n) * scaling * lora. magnitude and weight_norm have
// `out` elements (any shape: PEFT's conv magnitude is [1, out, 1, 1]). Computed in float32 (float64
// for float64); the result has z's dtype. Differentiable in z, magnitude, weight_norm and bias.
TORCHLORA_API at::Tensor dora_scale(const at::Tensor& z, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                                    const std::optional<at::Tensor>& bias = std::nullopt, int64_t dim = -1);

// ---- Many adapters in one batch ------------------------------------------------------------
// S adapters stacked in slots, zero-padded to one rank r (padding adds nothing to the result):
//   lora_A [S, r, in]   lora_B [S, out, r]   lora_bias [S, out] (optional)   scale [S] (float)
// slot_index [T] (int32 or int64) picks each row's slot; -1 means no adapter (base_out alone).
// The scale is a tensor so that changing a request's scale costs nothing and recompiles nothing.
// Slot values out of [-1, S) raise on the CPU; on CUDA they trip a device-side assert (the
// kernels never wait for the host, so the ops can be captured in CUDA graphs).
// Autograd reaches x, lora_A, lora_B, lora_bias and scale: several adapters train in one batch,
// each row's gradient going to its own slot. float16/bfloat16 keep the [T, r] intermediate in float32.

// h[t] = lora_A[slot[t]] @ x[t]: x [T, in] -> h [T, r] float32 (float64 for float64); rows
// with slot -1 are zero.
TORCHLORA_API at::Tensor multi_lora_shrink(const at::Tensor& x, const at::Tensor& lora_A,
                                           const at::Tensor& slot_index);

// out[t] = base_out[t] + scale[slot[t]] * (lora_B[slot[t]] @ h[t] + lora_bias[slot[t]]), base_out [T, out]
// in any float dtype (the result keeps it); h [T, r] from multi_lora_shrink.
TORCHLORA_API at::Tensor multi_lora_expand(const at::Tensor& base_out, const at::Tensor& h,
                                           const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                           const at::Tensor& scale, const at::Tensor& slot_index);

// multi_lora_expand into base_out itself (no new [T, out] tensor); returns base_out.
TORCHLORA_API at::Tensor& multi_lora_expand_(at::Tensor& base_out, const at::Tensor& h,
                                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                             const at::Tensor& scale, const at::Tensor& slot_index);

// A mixed batch through a linear layer's adapters: multi_lora_expand(base_out, multi_lora_shrink(x)).
//   x [..., in] with T rows, base_out [..., out], slot_index [T].
TORCHLORA_API at::Tensor multi_lora_linear(const at::Tensor& x, const at::Tensor& base_out,
                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                           const at::Tensor& slot_index);

// multi_lora_linear accumulating into base_out (the base layer's own output); returns base_out.
TORCHLORA_API at::Tensor& multi_lora_linear_(at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_A,
                                             const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                             const at::Tensor& scale, const at::Tensor& slot_index);

// x @ weight^T + bias with every row's adapter added into that output in place.
TORCHLORA_API at::Tensor linear_with_multi_lora(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                                const at::Tensor& scale, const at::Tensor& slot_index);

// out[t] = base_out[t] + scale[slot[t]] * lora_B[slot[t]] @ lora_A[slot[t]][:, ids[t]]
//   ids [...] with T entries, base_out [..., D], lora_A [S, r, V] (PEFT's lora_embedding_A
//   stacked), lora_B [S, D, r]. padding_idx >= 0: that id's column of lora_A gets no gradient.
TORCHLORA_API at::Tensor multi_lora_embedding(const at::Tensor& ids, const at::Tensor& base_out,
                                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                                              const at::Tensor& scale, const at::Tensor& slot_index,
                                              int64_t padding_idx = -1);

// lora_conv2d with a slot per sample: x [N, in, H, W], base_out [N, out, H', W'],
// lora_A [S, r, in, kh, kw], lora_B [S, out, r / groups, 1, 1], lora_bias [S, out], slot_index [N].
TORCHLORA_API at::Tensor multi_lora_conv2d(const at::Tensor& x, const at::Tensor& base_out,
                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                           const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                           const at::Tensor& slot_index, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// DoRA in a mixed batch: out[t] = factor[slot[t]] * (z[t] - bias) + bias along dimension `dim` of
// z (size out; not 0, the rows), rows with slot -1 unchanged. z [T, ...] (what the multi-adapter
// ops return), factor [S, out] (a served DoRA adapter's magnitude / dora_weight_norm, 1 for
// plain-LoRA and empty slots), bias [out] the base layer's (absent: zero), slot_index [T].
// Computed in float32 (float64 for float64); the result has z's dtype. Differentiable in z,
// factor and bias.
TORCHLORA_API at::Tensor multi_dora_scale(const at::Tensor& z, const at::Tensor& factor,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& slot_index,
                                          int64_t dim = -1);

}  // namespace torchlora
