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
#include "slot_runs.h"

namespace torchlora::cpu {
namespace {

constexpr int64_t kRowsPerUnit = 256;

std::vector<double> scale_values(const at::Tensor& scale) {
  const at::Tensor s = scale.to(at::kDouble).contiguous();
  const double* p = s.const_data_ptr<double>();
  return std::vector<double>(p, p + s.numel());
}

struct ExpandOperands {
  at::Tensor h, B, bias;  // in the compute dtype; B [S, out, r] contiguous; bias [S, out] or undefined
  std::vector<double> scale;
  at::ScalarType cd;
};

ExpandOperands expand_operands(const at::Tensor& h, const at::Tensor& lora_B,
                               const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale) {
  ExpandOperands e;
  e.cd = h.scalar_type();
  // detached: the row products write into views with out= ops, which autograd refuses
  e.h = h.detach().contiguous();
  e.B = lora_B.detach().to(e.cd).contiguous();
  if (lora_bias.has_value() && lora_bias->defined()) e.bias = lora_bias->detach().to(e.cd).contiguous();
  e.scale = scale_values(scale.detach());
  return e;
}

template <typename cd_t>
void expand_rows_dot(at::Tensor& out, const ExpandOperands& e, const SlotRun& run) {
  const int64_t r = e.B.size(2), n = e.B.size(1);
  const cd_t sc = static_cast<cd_t>(e.scale[run.slot]);
  const cd_t* b = e.B.const_data_ptr<cd_t>() + run.slot * n * r;
  const cd_t* bias = e.bias.defined() ? e.bias.const_data_ptr<cd_t>() + run.slot * n : nullptr;
  for (int64_t t = run.begin; t < run.end; ++t) {
    const cd_t* ht = e.h.const_data_ptr<cd_t>() + t * r;
    cd_t* ot = out.mutable_data_ptr<cd_t>() + t * out.stride(0);
    for (int64_t o = 0; o < n; ++o) ot[o] += sc * (dot(b + o * r, ht, r) + (bias ? bias[o] : cd_t(0)));
  }
}

// out's rows [run) += scale * (h @ B^T + bias), out in the compute dtype with unit column stride.
void expand_rows(at::Tensor& out, const ExpandOperands& e, const SlotRun& run) {
  if (run.rows() < kGemmMinRows) {
    if (e.cd == at::kDouble) {
      expand_rows_dot<double>(out, e, run);
    } else {
      expand_rows_dot<float>(out, e, run);
    }
    return;
  }
  const double sc = e.scale[run.slot];
  at::Tensor rows = out.narrow(0, run.begin, run.rows());
  rows.addmm_(e.h.narrow(0, run.begin, run.rows()), e.B.select(0, run.slot).t(), 1.0, sc);
  if (e.bias.defined()) rows.add_(e.bias.select(0, run.slot), sc);
}

// The same for an output in another dtype: a delta in the compute dtype, added once.
void expand_rows_converted(at::Tensor& out, const ExpandOperands& e, const SlotRun& run) {
  at::Tensor delta = at::mm(e.h.narrow(0, run.begin, run.rows()), e.B.select(0, run.slot).t());
  if (e.bias.defined()) delta.add_(e.bias.select(0, run.slot));
  out.narrow(0, run.begin, run.rows()).add_(delta, e.scale[run.slot]);
}

void expand_into(at::Tensor& base_out, const at::Tensor& h, const at::Tensor& lora_B,
                 const std::optional<at::Tensor>& lora_bias, const at::Tensor& scale, const at::Tensor& slot_index,
                 int64_t slots, const char* op) {
  const auto runs = slot_runs(slot_index, slots, op);
  const ExpandOperands e = expand_operands(h, lora_B, lora_bias, scale);
  at::Tensor out = base_out.detach();
  const bool direct = out.scalar_type() == e.cd && out.stride(1) == 1;
  at::Tensor target = direct || out.scalar_type() != e.cd ? out : out.contiguous();
  const auto units = split_runs(runs, kRowsPerUnit);
  for_each_unit(static_cast<int64_t>(units.size()), [&](int64_t i) {
    if (target.scalar_type() == e.cd) {
      expand_rows(target, e, units[i]);
    } else {
      expand_rows_converted(target, e, units[i]);
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
  const ExpandOperands e = expand_operands(h, lora_B, lora_bias, scale);
  const bool has_bias = e.bias.defined();
  const bool want_h = output_mask[0], want_B = output_mask[1], want_bias = output_mask[2] && has_bias,
             want_scale = output_mask[3];
  const at::Tensor g = grad_out.detach().to(e.cd);
  const auto opts = e.h.options();
  at::Tensor grad_h = want_h ? at::zeros(e.h.sizes(), opts) : at::Tensor();
  at::Tensor grad_B = want_B ? at::zeros(e.B.sizes(), opts) : at::Tensor();
  at::Tensor grad_bias = want_bias ? at::zeros({slots, d.out_features.expect_int()}, opts) : at::Tensor();
  std::vector<double> grad_scale(static_cast<size_t>(slots), 0.0);
  for_each_unit(static_cast<int64_t>(groups.size()), [&](int64_t gi) {
    for (const auto& run : groups[gi]) {
      const double sc = e.scale[run.slot];
      const at::Tensor g_rows = g.narrow(0, run.begin, run.rows()), h_rows = e.h.narrow(0, run.begin, run.rows());
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
