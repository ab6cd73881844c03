// multi_lora_embedding: each token's adapter slot gathers its column of the stacked lora_A
// (PEFT's lora_embedding_A [r, V] per slot) and the expand primitive adds lora_B @ it.
// CompositeImplicitAutograd: the gather's gradient is ATen's (a scatter-add into lora_A).
#include <ATen/core/Tensor.h>
#include <ATen/ops/index.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../detail/checks.h"
#include "../detail/multi_lora_checks.h"
#include "../detail/multi_lora_op_handles.h"

namespace torchlora::composite {
namespace {

at::Tensor multi_lora_embedding_composite(const at::Tensor& ids, const at::Tensor& base_out, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B, const at::Tensor& scale,
                                          const at::Tensor& slot_index, int64_t padding_idx) {
  constexpr const char* op = "torchlora.multi_lora_embedding";
  TORCH_CHECK(ids.defined() && (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt), op,
              ": ids must be an int64 or int32 tensor");
  detail::check_float(lora_A, op, "lora_A");
  TORCH_CHECK(lora_A.dim() == 3, op, ": lora_A must be 3-D [slots, r, num_embeddings], got shape ",
              lora_A.sym_sizes());
  TORCH_CHECK(lora_B.dim() == 3 && lora_B.sym_size(0) == lora_A.sym_size(0) && lora_B.sym_size(2) == lora_A.sym_size(1),
              op, ": lora_B must be [slots, embedding_dim, r] = [", lora_A.sym_size(0), ", D, ", lora_A.sym_size(1),
              "], got shape ", lora_B.sym_sizes());
  detail::check_same_dtype(lora_A, lora_B, op, "lora_A", "lora_B");
  detail::check_same_device(lora_A, ids, op, "lora_A", "ids");
  TORCH_CHECK(base_out.dim() == ids.dim() + 1, op, ": base_out must be [*ids.shape, embedding_dim], got ",
              base_out.sym_sizes(), " for ids of shape ", ids.sym_sizes());
  const c10::SymInt num_embeddings = lora_A.sym_size(2);
  TORCH_CHECK(padding_idx >= -1 && num_embeddings > padding_idx, op, ": padding_idx must be -1 or in [0, ",
              num_embeddings, "), got ", padding_idx);
  const at::Tensor flat = ids.reshape_symint({-1});
  // slots clamped for the gather only: the expand below checks the real values and skips -1 rows
  const at::Tensor slot_rows = slot_index.clamp(0, lora_A.sym_size(0) - 1);
  at::Tensor h = at::index(lora_A, {slot_rows, std::nullopt, flat});  // [T, r]
  h = h.to(detail::multi_intermediate_dtype(lora_A.scalar_type()));
  if (padding_idx >= 0) h = at::where(flat.eq(padding_idx).unsqueeze(1), h.detach(), h);
  const at::Tensor rows = base_out.reshape_symint({-1, base_out.sym_size(-1)});
  const at::Tensor out = detail::multi_lora_expand_op().call(rows, h, lora_B, std::nullopt, scale, slot_index);
  return out.view_symint(base_out.sym_sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CompositeImplicitAutograd, m) {
  m.impl("multi_lora_embedding", &multi_lora_embedding_composite);
}

}  // namespace torchlora::composite
