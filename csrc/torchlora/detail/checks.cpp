#include "checks.h"

#include "dropped_bits_format.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace torchlora::detail {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

void check_same_dtype(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                      const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), " (cast the adapter or the input)");
}

namespace {

// A, B and lora_bias on x's device and dtype; base_out on x's device; lora_bias of shape [out].
void check_adapter_operands(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                            const c10::SymInt& out, const char* op) {
  check_same_device(x, base_out, op, "x", "base_out");
  check_same_device(x, lora_A, op, "x", "lora_A");
  check_same_device(x, lora_B, op, "x", "lora_B");
  check_same_dtype(x, lora_A, op, "x", "lora_A");
  check_same_dtype(x, lora_B, op, "x", "lora_B");
  if (lora_bias.has_value() && lora_bias->defined()) {
    check_float(*lora_bias, op, "lora_bias");
    TORCH_CHECK(lora_bias->dim() == 1 && lora_bias->sym_size(0) == out, op, ": lora_bias must be [", out,
                "], got shape ", lora_bias->sym_sizes());
    check_same_device(x, *lora_bias, op, "x", "lora_bias");
    check_same_dtype(x, *lora_bias, op, "x", "lora_bias");
  }
}

// linear_with_lora's frozen weight: x's dtype, or float32 with 16-bit x (see weight_like_x).
void check_linear_weight_dtype(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  const bool x_16bit = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || (x_16bit && weight.scalar_type() == at::kFloat), op,
              ": weight has dtype ", weight.scalar_type(), " but x has dtype ", x.scalar_type(),
              " (the weight must have x's dtype, or be float32 with bfloat16 or float16 x)");
}

void check_floats(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, const char* op) {
  check_float(x, op, "x");
  check_float(base_out, op, "base_out");
  check_float(lora_A, op, "lora_A");
  check_float(lora_B, op, "lora_B");
}

}  // namespace

void check_scaling(double scaling, const char* op) {
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
}

void check_dropout(double dropout_p, const std::optional<at::Tensor>& seed, const at::Device& device,
                   const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(seed.has_value() && seed->defined(), op, ": dropout_p=", dropout_p,
              " needs a seed tensor (torchlora.ops.make_seed)");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->sym_numel() == 1, op,
              ": seed must be an int64 tensor with one element, got ", seed->scalar_type(), " with ",
              seed->sym_numel(), " elements");
  TORCH_CHECK(seed->device().is_cpu() || seed->device() == device || device.is_meta(), op,
              ": seed is on ", seed->device(), " but the input is on ", device);
}

at::ScalarType compute_dtype(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  if (t.device().is_cpu() && (dt == at::kHalf || dt == at::kBFloat16)) return at::kFloat;
  return dt;
}

namespace {
// What every backward takes besides its shapes: one device, the adapter in x's dtype, a valid
// scaling and dropout.
void check_backward_operands(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrunk,
                             const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                             const std::optional<at::Tensor>& seed, const char* op) {
  check_same_device(x, grad_out, op, "x", "grad_out");
  check_same_device(x, shrunk, op, "x", "shrunk");
  check_same_device(x, lora_A, op, "x", "lora_A");
  check_same_device(x, lora_B, op, "x", "lora_B");
  check_same_dtype(x, lora_A, op, "x", "lora_A");
  check_same_dtype(x, lora_B, op, "x", "lora_B");
  check_scaling(scaling, op);
  check_dropout(dropout_p, seed, x.device(), op);
}
}  // namespace

LinearDims check_lora_linear(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "torchlora.lora_linear";
  check_floats(x, base_out, lora_A, lora_B, op);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK(lora_A.dim() == 2, op, ": lora_A must be 2-D [r, in_features], got shape ", lora_A.sym_sizes());
  TORCH_CHECK(lora_B.dim() == 2, op, ": lora_B must be 2-D [out_features, r], got shape ", lora_B.sym_sizes());
  const c10::SymInt in = x.sym_size(-1), r = lora_A.sym_size(0), out = lora_B.sym_size(0);
  TORCH_CHECK(r > 0, op, ": the rank (lora_A.size(0)) must be positive");
  TORCH_CHECK(lora_A.sym_size(1) == in, op, ": lora_A is ", lora_A.sym_sizes(), " but x has ", in,
              " input features (last dimension)");
  TORCH_CHECK(lora_B.sym_size(1) == r, op, ": lora_B is ", lora_B.sym_sizes(), " but lora_A has rank ", r);
  TORCH_CHECK(base_out.dim() == x.dim(), op, ": base_out has ", base_out.dim(), " dimensions but x has ",
              x.dim());
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    TORCH_CHECK(base_out.sym_size(d) == x.sym_size(d), op, ": base_out ", base_out.sym_sizes(),
                " does not match the leading dimensions of x ", x.sym_sizes());
  }
  TORCH_CHECK(base_out.sym_size(-1) == out, op, ": base_out has ", base_out.sym_size(-1),
              " output features but lora_B has ", out, " rows");
  check_adapter_operands(x, base_out, lora_A, lora_B, lora_bias, out, op);
  check_scaling(scaling, op);
  check_dropout(dropout_p, seed, x.device(), op);
  const c10::SymInt tokens = in == 0 ? c10::SymInt(0) : x.sym_numel() / in;
  return LinearDims{tokens, in, r, out};
}

LinearDims check_linear_with_lora(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "torchlora.linear_with_lora";
  check_floats(x, weight, lora_A, lora_B, op);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
              weight.sym_sizes());
  TORCH_CHECK(lora_A.dim() == 2, op, ": lora_A must be 2-D [r, in_features], got shape ", lora_A.sym_sizes());
  TORCH_CHECK(lora_B.dim() == 2, op, ": lora_B must be 2-D [out_features, r], got shape ", lora_B.sym_sizes());
  const c10::SymInt in = x.sym_size(-1), r = lora_A.sym_size(0), out = weight.sym_size(0);
  TORCH_CHECK(weight.sym_size(1) == in, op, ": weight is ", weight.sym_sizes(), " but x has ", in,
              " input features (last dimension)");
  TORCH_CHECK(r > 0, op, ": the rank (lora_A.size(0)) must be positive");
  TORCH_CHECK(lora_A.sym_size(1) == in, op, ": lora_A is ", lora_A.sym_sizes(), " but x has ", in,
              " input features (last dimension)");
  TORCH_CHECK(lora_B.sym_size(1) == r, op, ": lora_B is ", lora_B.sym_sizes(), " but lora_A has rank ", r);
  TORCH_CHECK(lora_B.sym_size(0) == out, op, ": lora_B has ", lora_B.sym_size(0),
              " rows but weight has ", out, " output features");
  check_same_device(x, weight, op, "x", "weight");
  check_linear_weight_dtype(x, weight, op);
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == out, op, ": bias must be [", out, "], got shape ",
                bias->sym_sizes());
    check_same_device(x, *bias, op, "x", "bias");
    check_same_dtype(x, *bias, op, "x", "bias");
  }
  check_adapter_operands(x, weight, lora_A, lora_B, lora_bias, out, op);
  check_scaling(scaling, op);
  check_dropout(dropout_p, seed, x.device(), op);
  const c10::SymInt tokens = in == 0 ? c10::SymInt(0) : x.sym_numel() / in;
  return LinearDims{tokens, in, r, out};
}

LinearBackwardDims check_lora_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& shrunk, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, double scaling, double dropout_p,
                                              const std::optional<at::Tensor>& seed, const char* op) {
  check_float(grad_out, op, "grad_out");
  check_float(x, op, "x");
  check_float(shrunk, op, "shrunk");
  check_float(lora_A, op, "lora_A");
  check_float(lora_B, op, "lora_B");
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2 && lora_B.size(1) == lora_A.size(0), op,
              ": lora_A must be [r, in] and lora_B [out, r], got ", lora_A.sizes(), " and ", lora_B.sizes());
  const int64_t in = lora_A.size(1), rank = lora_A.size(0), out_features = lora_B.size(0);
  TORCH_CHECK(shrunk.dim() == 2 && shrunk.size(1) == rank, op, ": shrunk must be [T, ", rank, "], got ",
              shrunk.sizes());
  const int64_t tokens = shrunk.size(0);
  TORCH_CHECK(grad_out.numel() == tokens * out_features, op, ": grad_out has ", grad_out.numel(),
              " elements, expected ", tokens, " x ", out_features);
  TORCH_CHECK(x.numel() == tokens * in, op, ": x has ", x.numel(), " elements, expected ", tokens, " x ", in);
  check_backward_operands(grad_out, x, shrunk, lora_A, lora_B, scaling, dropout_p, seed, op);
  return LinearBackwardDims{tokens, in, rank, out_features};
}

LinearBackwardDims check_linear_with_lora_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& shrunk,
                                                   const at::Tensor& dropped_bits, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scaling, double dropout_p,
                                                   const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "torchlora._linear_with_lora_backward";
  const auto dims = check_lora_linear_backward(grad_out, x, shrunk, lora_A, lora_B, scaling, dropout_p, seed, op);
  check_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dims.out_features && weight.size(1) == dims.in_features, op,
              ": weight must be [", dims.out_features, ", ", dims.in_features, "], got ", weight.sizes());
  check_same_device(x, weight, op, "x", "weight");
  check_linear_weight_dtype(x, weight, op);
  if (dropout_p > 0.0) {
    const int64_t words = dropped_words(dims.tokens * dims.in_features);
    TORCH_CHECK(dropped_bits.defined() && dropped_bits.scalar_type() == at::kLong && dropped_bits.dim() == 1 &&
                    dropped_bits.size(0) == words && dropped_bits.device() == x.device(),
                op, ": dropped_bits must be the forward's int64 [", words, "] mask on ", x.device(), ", got ",
                dropped_bits.scalar_type(), " ", dropped_bits.sizes(), " on ", dropped_bits.device());
  }
  return dims;
}

void check_lora_embedding_backward(const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& gathered,
                                   const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                   int64_t padding_idx) {
  constexpr const char* op = "torchlora._lora_embedding_backward";
  check_float(grad_out, op, "grad_out");
  check_float(gathered, op, "gathered");
  check_float(lora_A, op, "lora_A");
  check_float(lora_B, op, "lora_B");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK(lora_A.dim() == 2 && lora_B.dim() == 2 && lora_B.size(1) == lora_A.size(0), op,
              ": lora_A must be [r, num_embeddings] and lora_B [embedding_dim, r], got ", lora_A.sizes(), " and ",
              lora_B.sizes());
  const int64_t rank = lora_A.size(0), vocab = lora_A.size(1), dim = lora_B.size(0);
  const int64_t tokens = ids.numel();
  TORCH_CHECK(gathered.dim() == 2 && gathered.size(0) == tokens && gathered.size(1) == rank, op,
              ": gathered must be [", tokens, ", ", rank, "], got ", gathered.sizes());
  TORCH_CHECK(grad_out.numel() == tokens * dim, op, ": grad_out has ", grad_out.numel(),
              " elements, expected ", tokens, " x ", dim);
  TORCH_CHECK(padding_idx >= -1 && padding_idx < vocab, op, ": padding_idx ", padding_idx,
              " is outside [-1, ", vocab, ")");
  check_same_device(lora_A, grad_out, op, "lora_A", "grad_out");
  check_same_device(lora_A, ids, op, "lora_A", "ids");
  check_same_device(lora_A, gathered, op, "lora_A", "gathered");
  check_same_device(lora_A, lora_B, op, "lora_A", "lora_B");
  check_same_dtype(lora_A, lora_B, op, "lora_A", "lora_B");
  check_scaling(scaling, op);
}

void check_lora_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& shrunk,
                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "torchlora._lora_conv2d_backward";
  check_float(grad_out, op, "grad_out");
  check_float(x, op, "x");
  check_float(shrunk, op, "shrunk");
  check_float(lora_A, op, "lora_A");
  check_float(lora_B, op, "lora_B");
  TORCH_CHECK(x.dim() == 4 && lora_A.dim() == 4 && lora_B.dim() == 4, op,
              ": x, lora_A and lora_B must be 4-D, got ", x.sizes(), ", ", lora_A.sizes(), " and ", lora_B.sizes());
  TORCH_CHECK(shrunk.dim() == 4 && shrunk.size(0) == x.size(0) && shrunk.size(1) == lora_A.size(0), op,
              ": shrunk must be [N, r, H', W'] with N=", x.size(0), " and r=", lora_A.size(0), ", got ",
              shrunk.sizes());
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == shrunk.size(0) && grad_out.size(1) == lora_B.size(0) &&
                  grad_out.size(2) == shrunk.size(2) && grad_out.size(3) == shrunk.size(3),
              op, ": grad_out ", grad_out.sizes(), " does not match shrunk ", shrunk.sizes());
  check_backward_operands(grad_out, x, shrunk, lora_A, lora_B, scaling, dropout_p, seed, op);
}

EmbeddingDims check_lora_embedding(
    const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling) {
  constexpr const char* op = "torchlora.lora_embedding";
  TORCH_CHECK(ids.defined(), op, ": ids is undefined");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, op,
              ": ids must be int64 or int32, got ", ids.scalar_type());
  check_float(base_out, op, "base_out");
  check_float(lora_A, op, "lora_A");
  check_float(lora_B, op, "lora_B");
  TORCH_CHECK(lora_A.dim() == 2, op, ": lora_A must be 2-D [r, num_embeddings], got shape ", lora_A.sym_sizes());
  TORCH_CHECK(lora_B.dim() == 2, op, ": lora_B must be 2-D [embedding_dim, r], got shape ", lora_B.sym_sizes());
  const c10::SymInt r = lora_A.sym_size(0), vocab = lora_A.sym_size(1), dim = lora_B.sym_size(0);
  TORCH_CHECK(r > 0, op, ": the rank (lora_A.size(0)) must be positive");
  TORCH_CHECK(lora_B.sym_size(1) == r, op, ": lora_B is ", lora_B.sym_sizes(), " but lora_A has rank ", r);
  TORCH_CHECK(base_out.dim() == ids.dim() + 1, op, ": base_out must be ids.shape + [embedding_dim], got ",
              base_out.sym_sizes(), " for ids ", ids.sym_sizes());
  for (int64_t d = 0; d < ids.dim(); ++d) {
    TORCH_CHECK(base_out.sym_size(d) == ids.sym_size(d), op, ": base_out ", base_out.sym_sizes(),
                " does not match ids ", ids.sym_sizes());
  }
  TORCH_CHECK(base_out.sym_size(-1) == dim, op, ": base_out has embedding_dim ", base_out.sym_size(-1),
              " but lora_B has ", dim, " rows");
  check_same_device(base_out, ids, op, "base_out", "ids");
  check_same_device(base_out, lora_A, op, "base_out", "lora_A");
  check_same_device(base_out, lora_B, op, "base_out", "lora_B");
  check_same_dtype(lora_A, lora_B, op, "lora_A", "lora_B");
  check_scaling(scaling, op);
  return EmbeddingDims{ids.sym_numel(), vocab, r, dim};
}

Conv2dDims check_lora_conv2d(
    const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "torchlora.lora_conv2d";
  check_floats(x, base_out, lora_A, lora_B, op);
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sym_sizes());
  TORCH_CHECK(base_out.dim() == 4, op, ": base_out must be 4-D [N, C_out, H', W'], got shape ",
              base_out.sym_sizes());
  TORCH_CHECK(lora_A.dim() == 4, op, ": lora_A must be 4-D [r, C_in, kh, kw], got shape ", lora_A.sym_sizes());
  TORCH_CHECK(lora_B.dim() == 4 && lora_B.sym_size(2) == 1 && lora_B.sym_size(3) == 1, op,
              ": lora_B must be [C_out, r / groups, 1, 1], got shape ", lora_B.sym_sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have two values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] > 0, op, ": stride must be positive, got ", stride);
    TORCH_CHECK(padding[i] >= 0, op, ": padding must be non-negative, got ", padding);
    TORCH_CHECK(dilation[i] > 0, op, ": dilation must be positive, got ", dilation);
  }
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  const c10::SymInt n = x.sym_size(0), cin = x.sym_size(1), r = lora_A.sym_size(0), cout = lora_B.sym_size(0);
  TORCH_CHECK(r > 0, op, ": the rank (lora_A.size(0)) must be positive");
  TORCH_CHECK(lora_A.sym_size(1) == cin, op, ": lora_A is ", lora_A.sym_sizes(), " but x has ", cin, " channels");
  TORCH_CHECK(r % groups == 0, op, ": the rank ", r, " must be divisible by groups=", groups);
  TORCH_CHECK(cout % groups == 0, op, ": the output channels ", cout, " must be divisible by groups=", groups);
  TORCH_CHECK(lora_B.sym_size(1) * groups == r, op, ": lora_B is ", lora_B.sym_sizes(), " but rank ", r,
              " with groups=", groups, " needs ", r / groups, " input channels per group");
  const c10::SymInt kh = lora_A.sym_size(2), kw = lora_A.sym_size(3);
  const c10::SymInt ho = (x.sym_size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const c10::SymInt wo = (x.sym_size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(ho > 0 && wo > 0, op, ": the kernel ", kh, "x", kw, " does not fit the padded input ",
              x.sym_sizes());
  TORCH_CHECK(base_out.sym_size(0) == n && base_out.sym_size(1) == cout && base_out.sym_size(2) == ho &&
                  base_out.sym_size(3) == wo,
              op, ": base_out is ", base_out.sym_sizes(), " but the low-rank path gives [", n, ", ", cout, ", ",
              ho, ", ", wo, "]");
  check_adapter_operands(x, base_out, lora_A, lora_B, lora_bias, cout, op);
  check_scaling(scaling, op);
  check_dropout(dropout_p, seed, x.device(), op);
  return Conv2dDims{n, cin, r, cout, ho, wo};
}

}  // namespace torchlora::detail
