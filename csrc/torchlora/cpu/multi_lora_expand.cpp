// CPU kernels of multi_lora_expand (out[t] = base_out[t] + scale[s] * (lora_B[s] @ h[t] + lora_bias[s]),
// s = slot[t]), its in-place variant and its backward.
//
// Run by run as the shrink (slot_runs.h): a long run is one GEMM that accumulates into the
// output rows themselves (alpha = the slot's scale, beta = 1), a short run takes dot products
// against the slot's lora_B. Outputs in float16/bfloat16 get a float32 delta added and rounded once.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "../detail/multi_lora_checks.h"
#include "multi_lora_rows.h"
#include "slot_runs.h"

namespace torchlora::cpu {
namespace {

constexpr int64_t kRowsPerUnit = 256;

void expand_into(at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                 const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale, const at::Tensor& slot_index,
                 int64_t slots, const char* op) {
  const auto runs = slot_runs(slot_index, slots, op);
  const at::Tensor hc = h.detach().contiguous();
  const ExpandOperands e = expand_operands(hc.scalar_type(), lora_B, lora_bias, scale);
  at::Tensor out = base_out.detach();
  const bool direct = out.scalar_type() == e.cd && out.stride(1) == 1;
  at::Tensor target = direct || out.scalar_type() != e.cd ? out : out.contiguous();
  const auto units = split_runs(runs, kRowsPerUnit);
  for_each_unit(static_cast<int64_t>(units.size()), [&](int64_t i) {
    if (target.scalar_type() == e.cd) {
      expand_run(target, hc, e, units[i]);
    } else {
      expand_run_converted(target, hc, e, units[i]);
    }
  });
  if (!target.is_same(out)) out.copy_(target);
}

at::Tensor& multi_lora_expand_inplace_cpu(at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                          const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                          const at::Tensor& slot_index) {
  constexpr const char* op = "torchlora.multi_lora_expand_";
  const auto d = detail::check_multi_lora_expand(base_out, h, lora_B, lora_bias, scale, slot_index, op);
  expand_into(base_out, h, lora_B, lora_bias, scale, slot_index, d.slots.expect_int(), op);
  return base_out;
}

at::Tensor multi_lora_expand_cpu(const at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                                 const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale,
                                 const at::Tensor& slot_index) {
  constexpr const char* op = "torchlora.multi_lora_expand";
  const auto d = detail::check_multi_lora_expand(base_out, h, lora_B, lora_bias, scale, slot_index, op);
  at::Tensor out = base_out.clone(at::MemoryFormat::Contiguous);
  expand_into(out, h, lora_B, lora_bias, scale, slot_index, d.slots.expect_int(), op);
  return out;
}

// With u[t] = B[s]^T g[t]: grad_h[t] = scale[s] u[t], grad_B[s] = scale[s] sum_t g[t] h[t]^T,
// grad_bias[s] = scale[s] sum_t g[t], grad_scale[s] = sum_t u[t].h[t] + g[t].bias[s]. One slot
// per task, so each slot's sums are written by one thread.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_expand_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale, const at::Tensor& slot_index,
    std::array<bool, 4> output_mask) {
  constexpr const char* op = "torchlora._multi_lora_expand_backward";
  const auto d = detail::check_multi_lora_expand(grad_out, h, lora_B, lora_bias, scale, slot_index, op);
  const int64_t slots = d.slots.expect_int();
  const auto groups = runs_by_slot(slot_runs(slot_index, slots, op), slots);
  const at::Tensor hc = h.detach().contiguous();
  const ExpandOperands e = expand_operands(hc.scalar_type(), lora_B, lora_bias, scale);
  const bool has_bias = e.bias.defined();
  const bool want_h = output_mask[0], want_B = output_mask[1], want_bias = output_mask[2] && has_bias,
             want_scale = output_mask[3];
  const at::Tensor g = grad_out.detach().to(e.cd);
  const auto opts = hc.options();
  at::Tensor grad_h = want_h ? at::zeros(hc.sizes(), opts) : at::Tensor();
  at::Tensor grad_B = want_B ? at::zeros(e.B.sizes(), opts) : at::Tensor();
  at::Tensor grad_bias = want_bias ? at::zeros({slots, d.out_features.expect_int()}, opts) : at::Tensor();
  std::vector<double> grad_scale(static_cast<size_t>(slots), 0.0);
  for_each_unit(static_cast<int64_t>(groups.size()), [&](int64_t gi) {
    for (const auto& run : groups[gi]) {
      const double sc = e.scale[run.slot];
      const at::Tensor g_rows = g.narrow(0, run.begin, run.rows()), h_rows = hc.narrow(0, run.begin, run.rows());
      const at::Tensor B_s = e.B.select(0, run.slot);
      if (want_h || want_scale) {
        const at::Tensor u = at::mm(g_rows, B_s);
        if (want_scale) {
          double sum = u.mul(h_rows).sum().item<double>();
          if (has_bias) sum += g_rows.sum(0).dot(e.bias.select(0, run.slot)).item<double>();
          grad_scale[static_cast<size_t>(run.slot)] += sum;
        }
        if (want_h) grad_h.narrow(0, run.begin, run.rows()).copy_(u).mul_(sc);
      }
      if (want_B) grad_B.select(0, run.slot).addmm_(g_rows.t(), h_rows, 1.0, sc);
      if (want_bias) grad_bias.select(0, run.slot).add_(g_rows.sum(0), sc);
    }
  });
  at::Tensor grad_scale_t;
  if (want_scale) {
    grad_scale_t = at::empty({slots}, scale.options().dtype(at::kDouble));
    std::copy(grad_scale.begin(), grad_scale.end(), grad_scale_t.mutable_data_ptr<double>());
    grad_scale_t = grad_scale_t.to(scale.scalar_type());
  }
  auto none = [](const at::TensorOptions& o) { return at::empty({0}, o); };
  return {want_h ? grad_h.to(h.scalar_type()) : none(h.options()),
          want_B ? grad_B.to(lora_B.scalar_type()) : none(lora_B.options()),
          want_bias ? grad_bias.to(lora_B.scalar_type()) : none(lora_B.options()),
          want_scale ? grad_scale_t : none(scale.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("multi_lora_expand", &multi_lora_expand_cpu);
  m.impl("multi_lora_expand_", &multi_lora_expand_inplace_cpu);
  m.impl("_multi_lora_expand_backward", &multi_lora_expand_backward_cpu);
}

}  // namespace torchlora::cpu
