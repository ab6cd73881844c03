// The per-run products of the multi-adapter CPU kernels, shared by the shrink, the expand and
// the fused linear_with_multi_lora: a run of at least kGemmMinRows rows is one BLAS GEMM on
// views, a shorter one takes dot products on raw rows (no tensor views: decode batches are
// runs of one row). h may be a buffer holding rows [h_first, ...) only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <vector>

#include "slot_runs.h"

namespace torchlora::cpu {

// t in the compute dtype with unit column stride (the row stride may be anything).
inline at::Tensor rows_in(const at::Tensor& t, at::ScalarType cd) {
  at::Tensor c = t.detach().to(cd);
  return c.stride(-1) == 1 ? c : c.contiguous();
}

// h[t - h_first] = A[slot] @ x[t] for the run's rows; x [T, in] (unit column stride),
// A [S, r, in] contiguous, h contiguous rows of r, all in cd_t.
template <typename cd_t>
void shrink_run(const at::Tensor& x, const at::Tensor& A, at::Tensor& h, const SlotRun& run, int64_t h_first = 0) {
  const int64_t in = x.size(1), r = A.size(1);
  if (run.rows() >= kGemmMinRows) {
    at::Tensor h_rows = h.narrow(0, run.begin - h_first, run.rows());
    at::mm_out(h_rows, x.narrow(0, run.begin, run.rows()), A.select(0, run.slot).t());
    return;
  }
  const cd_t* a = A.const_data_ptr<cd_t>() + run.slot * r * in;
  const cd_t* x0 = x.const_data_ptr<cd_t>();
  cd_t* h0 = h.mutable_data_ptr<cd_t>();
  for (int64_t t = run.begin; t < run.end; ++t) {
    const cd_t* xt = x0 + t * x.stride(0);
    cd_t* ht = h0 + (t - h_first) * r;
    for (int64_t j = 0; j < r; ++j) ht[j] = dot(xt, a + j * in, in);
  }
}

// What the expand reads, in the compute dtype: B [S, out, r] contiguous, bias [S, out] or
// undefined, and the scales as host values (free to read on the CPU).
struct ExpandOperands {
  at::Tensor B, bias;
  std::vector<double> scale;
  at::ScalarType cd;
};

ExpandOperands expand_operands(at::ScalarType cd, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                               const at::Tensor& scale);

// out[t] += scale[slot] * (B[slot] @ h[t - h_first] + bias[slot]) for the run's rows; out in the
// compute dtype with unit column stride.
void expand_run(at::Tensor& out, const at::Tensor& h, const ExpandOperands& e, const SlotRun& run,
                int64_t h_first = 0);

// The same for an output in another dtype: the delta in the compute dtype, added and rounded once.
void expand_run_converted(at::Tensor& out, const at::Tensor& h, const ExpandOperands& e, const SlotRun& run,
                          int64_t h_first = 0);

}  // namespace torchlora::cpu
