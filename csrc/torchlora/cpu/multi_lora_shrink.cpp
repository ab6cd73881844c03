// CPU kernels of multi_lora_shrink (h[t] = lora_A[slot[t]] @ x[t]) and its backward.
//
// Rows are taken run by run (consecutive rows of one slot, see slot_runs.h), so a prefill
// request is one GEMM against its adapter and x is never gathered or copied. Short runs (decode:
// one row per request) take dot products against the slot's rows of lora_A instead of a BLAS
// call each. float16/bfloat16 compute in float32; h is float32 (float64 for float64).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../detail/multi_lora_checks.h"
#include "multi_lora_rows.h"
#include "slot_runs.h"

namespace torchlora::cpu {
namespace {

constexpr int64_t kRowsPerUnit = 256;

at::Tensor multi_lora_shrink_cpu(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& slot_index) {
  constexpr const char* op = "torchlora.multi_lora_shrink";
  const auto d = detail::check_multi_lora_shrink(x, lora_A, slot_index);
  const int64_t slots = d.slots.expect_int();
  const auto cd = detail::multi_intermediate_dtype(x.scalar_type());
  const auto runs = slot_runs(slot_index, slots, op);
  // detached: the row products write into views with out= ops, which autograd refuses
  const at::Tensor xc = rows_in(x, cd), Ac = lora_A.detach().to(cd).contiguous();
  at::Tensor h = at::zeros({d.tokens.expect_int(), d.rank.expect_int()}, x.options().dtype(cd));
  const auto units = split_runs(runs, kRowsPerUnit);
  for_each_unit(static_cast<int64_t>(units.size()), [&](int64_t i) {
    if (cd == at::kDouble) {
      shrink_run<double>(xc, Ac, h, units[i]);
    } else {
      shrink_run<float>(xc, Ac, h, units[i]);
    }
  });
  return h;
}

// grad_x[t] = grad_h[t] @ A[s] and grad_A[s] = sum_t grad_h[t]^T x[t], one slot per task so no
// two threads add into the same slot.
std::tuple<at::Tensor, at::Tensor> multi_lora_shrink_backward_cpu(const at::Tensor& grad_h, const at::Tensor& x,
                                                                  const at::Tensor& lora_A,
                                                                  const at::Tensor& slot_index,
                                                                  std::array<bool, 2> output_mask) {
  constexpr const char* op = "torchlora._multi_lora_shrink_backward";
  const auto d = detail::check_multi_lora_shrink_backward(grad_h, x, lora_A, slot_index);
  const int64_t slots = d.slots.expect_int();
  const auto cd = detail::multi_intermediate_dtype(x.scalar_type());
  const auto groups = runs_by_slot(slot_runs(slot_index, slots, op), slots);
  const at::Tensor gh = grad_h.detach().to(cd), xc = x.detach().to(cd), Ac = lora_A.detach().to(cd);
  at::Tensor grad_x = output_mask[0] ? at::zeros(xc.sizes(), xc.options()) : at::Tensor();
  at::Tensor grad_A = output_mask[1] ? at::zeros(Ac.sizes(), Ac.options()) : at::Tensor();
  for_each_unit(static_cast<int64_t>(groups.size()), [&](int64_t g) {
    for (const auto& run : groups[g]) {
      const at::Tensor gh_rows = gh.narrow(0, run.begin, run.rows());
      if (output_mask[0]) {
        at::Tensor gx_rows = grad_x.narrow(0, run.begin, run.rows());
        at::mm_out(gx_rows, gh_rows, Ac.select(0, run.slot));
      }
      if (output_mask[1]) {
        grad_A.select(0, run.slot).addmm_(gh_rows.t(), xc.narrow(0, run.begin, run.rows()));
      }
    }
  });
  return {output_mask[0] ? grad_x.to(x.scalar_type()) : at::empty({0}, x.options()),
          output_mask[1] ? grad_A.to(lora_A.scalar_type()) : at::empty({0}, lora_A.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("multi_lora_shrink", &multi_lora_shrink_cpu);
  m.impl("_multi_lora_shrink_backward", &multi_lora_shrink_backward_cpu);
}

}  // namespace torchlora::cpu
