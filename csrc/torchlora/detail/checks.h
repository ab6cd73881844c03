// Input validation and output shapes of the torchlora operators: one source for the CPU,
// CUDA and Meta kernels so they cannot drift. Sizes are SymInts so the Meta kernels also
// serve torch.compile with dynamic shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <optional>

namespace torchlora::detail {

struct LinearDims {
  c10::SymInt tokens, in_features, rank, out_features;
};

// x [..., in], base_out [..., out], lora_A [r, in], lora_B [out, r], lora_bias [out]
LinearDims check_lora_linear(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed);

// x [..., in], weight [out, in], bias [out], lora_A [r, in], lora_B [out, r], lora_bias [out]:
// the operands of linear_with_lora (the frozen nn.Linear and its adapter in one op).
LinearDims check_linear_with_lora(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed);

struct LinearBackwardDims {
  int64_t tokens, in_features, rank, out_features;
};

// grad_out [..., out] and x [..., in] with T rows each, shrunk [T, r], lora_A [r, in] and
// lora_B [out, r] on x's device and dtype; scaling and the dropout arguments. `op` names the
// backward op in the messages (linear_with_lora's backward shares this check).
LinearBackwardDims check_lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& shrunk, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, double scaling, double dropout_p,
                                              const std::optional<at::Tensor>& seed,
                                              const char* op = "torchlora._lora_linear_backward");

// The operands of _linear_with_lora_backward: those of check_lora_linear_backward, weight
// [out, in] on x's device and dtype, and (with dropout) the forward's dropped bits.
LinearBackwardDims check_linear_with_lora_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& shrunk,
                                                   const at::Tensor& dropped_bits, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scaling, double dropout_p,
                                                   const std::optional<at::Tensor>& seed);

struct EmbeddingDims {
  c10::SymInt tokens, num_embeddings, rank, embedding_dim;
};

// ids [...], base_out [..., D], lora_A [r, V], lora_B [D, r]
EmbeddingDims check_lora_embedding(
    const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling);

// grad_out [..., D] with ids.numel() rows, gathered [N, r], lora_A [r, V], lora_B [D, r];
// padding_idx in [-1, V).
void check_lora_embedding_backward(const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& gathered,
                                   const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                   int64_t padding_idx);

struct Conv2dDims {
  c10::SymInt batch, in_channels, rank, out_channels, out_h, out_w;
};

// x [N, in, H, W], base_out [N, out, H', W'], lora_A [r, in, kh, kw], lora_B [out, r/groups, 1, 1]
Conv2dDims check_lora_conv2d(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed);

// grad_out [N, out, H', W'] and shrunk [N, r, H', W'] of x [N, in, H, W], lora_A [r, in, kh, kw]
// and lora_B [out, r / groups, 1, 1] on x's device and dtype; scaling and the dropout arguments.
void check_lora_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrunk,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                double dropout_p, const std::optional<at::Tensor>& seed);

// dropout_p in [0, 1); when > 0 a one-element int64 seed on the CPU or on `device`.
void check_dropout(double dropout_p, const std::optional<at::Tensor>& seed, const at::Device& device,
                   const char* op);

void check_scaling(double scaling, const char* op);

// The operand checks every op shares; `name`/`ref_name` name the arguments in the message.
bool is_float_type(at::ScalarType t);
void check_float(const at::Tensor& t, const char* op, const char* name);
void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                       const char* name);
void check_same_dtype(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                      const char* name);

// The dtype of the saved low-rank intermediate: float32, or float64 for float64 inputs.
inline at::ScalarType intermediate_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype the math runs in: float32 for float16/bfloat16 on the CPU, else the input's.
at::ScalarType compute_dtype(const at::Tensor& t);

}  // namespace torchlora::detail
