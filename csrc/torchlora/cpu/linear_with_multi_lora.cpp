// CPU kernel of _linear_with_multi_lora_forward: out = x @ W^T + bias with every row's adapter
// added, for inference (linear_with_multi_lora takes it when nothing needs a gradient).
//
// For a long batch and a weight that fits in cache the rows go in chunks: each chunk's base GEMM,
// then its runs' shrink and expand while the chunk's x and out rows are still in cache, so the
// adapters add no pass over [T, out] or [T, in] of their own. A short batch (decode) or a large
// weight runs the base GEMM over all rows (BLAS threads it) and then the runs in parallel. float32 and float64 (other dtypes take the
// composite path).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../detail/checks.h"
#include "../detail/multi_lora_checks.h"
#include "multi_lora_rows.h"
#include "slot_runs.h"

namespace torchlora::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 256;
// Chunks re-read the whole base weight: worth it while the weight stays in cache. A larger one
// takes one threaded GEMM over all rows (which tiles the weight itself) and then the adapters.
constexpr int64_t kChunkedWeightBytes = int64_t{4} << 20;

// out_rows = x_rows @ W^T + bias (a chunk of rows, or all of them)
void base_rows(at::Tensor out_rows, const at::Tensor& x_rows, const at::Tensor& weight, const at::Tensor& bias) {
  if (bias.defined()) {
    out_rows.copy_(bias.expand_as(out_rows));
    out_rows.addmm_(x_rows, weight.t());
  } else {
    at::mm_out(out_rows, x_rows, weight.t());
  }
}

// The runs clipped to chunks of kRowsPerChunk rows, one list per chunk.
std::vector<std::vector<SlotRun>> runs_per_chunk(const std::vector<SlotRun>& runs, int64_t tokens) {
  std::vector<std::vector<SlotRun>> chunks(static_cast<size_t>((tokens + kRowsPerChunk - 1) / kRowsPerChunk));
  for (const auto& run : split_runs(runs, kRowsPerChunk)) {
    for (int64_t b = run.begin; b < run.end;) {
      const int64_t c = b / kRowsPerChunk, e = std::min(run.end, (c + 1) * kRowsPerChunk);
      chunks[static_cast<size_t>(c)].push_back({b, e, run.slot});
      b = e;
    }
  }
  return chunks;
}

at::Tensor linear_with_multi_lora_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                              const at::Tensor& scale, const at::Tensor& slot_index) {
  constexpr const char* op = "torchlora._linear_with_multi_lora_forward";
  const auto d = detail::check_multi_lora_shrink(x, lora_A, slot_index, op);
  detail::check_float(weight, op, "weight");
  detail::check_same_dtype(x, weight, op, "x", "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.sym_size(1) == d.in_features, op, ": weight must be [out_features, ",
              d.in_features, "], got shape ", weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    detail::check_same_dtype(x, *bias, op, "x", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be [", weight.size(0),
                "], got shape ", bias->sizes());
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the fused CPU kernel takes float32 or float64, got ", x.scalar_type());
  const int64_t tokens = d.tokens.expect_int(), slots = d.slots.expect_int();
  const auto cd = x.scalar_type();
  at::Tensor out = at::empty({tokens, weight.size(0)}, x.options());
  at::Tensor h = at::empty({tokens, d.rank.expect_int()}, x.options());
  detail::check_multi_lora_expand(out, h, lora_B, lora_bias, scale, slot_index, op);
  const auto runs = slot_runs(slot_index, slots, op);
  const at::Tensor xc = rows_in(x, cd), Ac = lora_A.detach().to(cd).contiguous(), W = weight.detach();
  const at::Tensor b = has_bias ? bias->detach() : at::Tensor();
  const ExpandOperands e = expand_operands(cd, lora_B, lora_bias, scale);
  auto adapter_run = [&](const SlotRun& run) {
    if (cd == at::kDouble) {
      shrink_run<double>(xc, Ac, h, run);
    } else {
      shrink_run<float>(xc, Ac, h, run);
    }
    expand_run(out, h, e, run);
  };
  if (tokens < 2 * kRowsPerChunk || W.numel() * W.element_size() > kChunkedWeightBytes) {
    base_rows(out, xc, W, b);
    const auto units = split_runs(runs, kRowsPerChunk);
    for_each_unit(static_cast<int64_t>(units.size()), [&](int64_t i) { adapter_run(units[i]); });
    return out;
  }
  const auto chunks = runs_per_chunk(runs, tokens);
  for_each_unit(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const int64_t c0 = c * kRowsPerChunk, rows = std::min(kRowsPerChunk, tokens - c0);
    base_rows(out.narrow(0, c0, rows), xc.narrow(0, c0, rows), W, b);
    for (const auto& run : chunks[static_cast<size_t>(c)]) adapter_run(run);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("_linear_with_multi_lora_forward", &linear_with_multi_lora_forward_cpu);
}

}  // namespace torchlora::cpu
