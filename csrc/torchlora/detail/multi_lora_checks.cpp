#include "multi_lora_checks.h"

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace torchlora::detail {
namespace {

// slot_index: a 1-D int32/int64 tensor of T entries on `device`.
void check_slot_index(const at::Tensor& slot_index, const c10::SymInt& tokens, const at::Device& device,
                      const char* op) {
  TORCH_CHECK(slot_index.defined(), op, ": slot_index is undefined");
  TORCH_CHECK(slot_index.scalar_type() == at::kInt || slot_index.scalar_type() == at::kLong, op,
              ": slot_index must be int32 or int64, got ", slot_index.scalar_type());
  TORCH_CHECK(slot_index.dim() == 1, op, ": slot_index must be 1-D [T] (one slot per row), got shape ",
              slot_index.sym_sizes());
  TORCH_CHECK(slot_index.sym_size(0) == tokens, op, ": slot_index has ", slot_index.sym_size(0),
              " entries but there are ", tokens, " rows");
  TORCH_CHECK(slot_index.device() == device || device.is_meta() || slot_index.device().is_meta(), op,
              ": slot_index is on ", slot_index.device(), " but the rows are on ", device);
}

void check_rows(const at::Tensor& t, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", layout, ", got shape ", t.sym_sizes());
}

}  // namespace

MultiShrinkDims check_multi_lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& slot_index,
                                        const char* op) {
  check_float(x, op, "x");
  check_float(lora_A, op, "lora_A");
  check_rows(x, op, "x", "[T, in_features]");
  TORCH_CHECK(lora_A.dim() == 3, op, ": lora_A must be 3-D [slots, r, in_features], got shape ", lora_A.sym_sizes());
  check_same_device(x, lora_A, op, "x", "lora_A");
  check_same_dtype(x, lora_A, op, "x", "lora_A");
  MultiShrinkDims d{x.sym_size(0), x.sym_size(1), lora_A.sym_size(1), lora_A.sym_size(0)};
  TORCH_CHECK(d.slots > 0 && d.rank > 0, op, ": lora_A must hold at least one slot of rank >= 1, got shape ",
              lora_A.sym_sizes());
  TORCH_CHECK(lora_A.sym_size(2) == d.in_features, op, ": lora_A is ", lora_A.sym_sizes(), " but x has ",
              d.in_features, " input features");
  check_slot_index(slot_index, d.tokens, x.device(), op);
  return d;
}

MultiShrinkDims check_multi_lora_shrink_backward(const at::Tensor& grad_h, const at::Tensor& x,
                                                 const at::Tensor& lora_A, const at::Tensor& slot_index) {
  constexpr const char* op = "torchlora._multi_lora_shrink_backward";
  const auto d = check_multi_lora_shrink(x, lora_A, slot_index, op);
  check_float(grad_h, op, "grad_h");
  check_same_device(x, grad_h, op, "x", "grad_h");
  TORCH_CHECK(grad_h.dim() == 2 && grad_h.sym_size(0) == d.tokens && grad_h.sym_size(1) == d.rank, op,
              ": grad_h must be [", d.tokens, ", ", d.rank, "], got shape ", grad_h.sym_sizes());
  return d;
}

MultiExpandDims check_multi_lora_expand(const at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                        const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                        const at::Tensor& slot_index, const char* op) {
  check_float(base_out, op, "base_out");
  check_float(h, op, "h");
  check_float(lora_B, op, "lora_B");
  check_float(scale, op, "scale");
  check_rows(base_out, op, "base_out", "[T, out_features]");
  check_rows(h, op, "h", "[T, r]");
  TORCH_CHECK(lora_B.dim() == 3, op, ": lora_B must be 3-D [slots, out_features, r], got shape ", lora_B.sym_sizes());
  check_same_device(base_out, h, op, "base_out", "h");
  check_same_device(base_out, lora_B, op, "base_out", "lora_B");
  check_same_device(base_out, scale, op, "base_out", "scale");
  const auto want_h = multi_intermediate_dtype(lora_B.scalar_type());
  TORCH_CHECK(h.scalar_type() == want_h, op, ": h must be ", want_h, " for ", lora_B.scalar_type(),
              " adapters (the shrink's output), got ", h.scalar_type());
  MultiExpandDims d{base_out.sym_size(0), h.sym_size(1), base_out.sym_size(1), lora_B.sym_size(0)};
  TORCH_CHECK(d.slots > 0 && d.rank > 0, op, ": lora_B must hold at least one slot of rank >= 1, got shape ",
              lora_B.sym_sizes());
  TORCH_CHECK(h.sym_size(0) == d.tokens, op, ": h has ", h.sym_size(0), " rows but base_out has ", d.tokens);
  TORCH_CHECK(lora_B.sym_size(1) == d.out_features && lora_B.sym_size(2) == d.rank, op, ": lora_B is ",
              lora_B.sym_sizes(), " but base_out has ", d.out_features, " features and h has rank ", d.rank);
  TORCH_CHECK(scale.dim() == 1 && scale.sym_size(0) == d.slots, op, ": scale must be [", d.slots,
              "] (one per slot), got shape ", scale.sym_sizes());
  if (lora_bias.has_value() && lora_bias->defined()) {
    check_float(*lora_bias, op, "lora_bias");
    check_same_device(base_out, *lora_bias, op, "base_out", "lora_bias");
    check_same_dtype(lora_B, *lora_bias, op, "lora_B", "lora_bias");
    TORCH_CHECK(lora_bias->dim() == 2 && lora_bias->sym_size(0) == d.slots &&
                    lora_bias->sym_size(1) == d.out_features,
                op, ": lora_bias must be [", d.slots, ", ", d.out_features, "], got shape ", lora_bias->sym_sizes());
  }
  check_slot_index(slot_index, d.tokens, base_out.device(), op);
  return d;
}

void check_slot_values(const at::Tensor& slot_index, int64_t slots, const char* op) {
  if (!slot_index.device().is_cpu()) return;
  const at::Tensor idx = slot_index.contiguous();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "torchlora_check_slot_values", [&] {
    const index_t* p = idx.const_data_ptr<index_t>();
    for (int64_t t = 0, n = idx.numel(); t < n; ++t) {
      TORCH_CHECK_VALUE(p[t] >= -1 && p[t] < slots, op, ": slot_index[", t, "] = ", p[t],
                        " is out of range: the stack has ", slots, " slots (valid: -1 for no adapter, 0..",
                        slots - 1, ")");
    }
  });
}

}  // namespace torchlora::detail
