#include "multi_lora_rows.h"

#include <ATen/ops/empty.h>

namespace torchlora::cpu {
namespace {

template <typename cd_t>
void expand_run_dot(at::Tensor& out, const at::Tensor& h, const ExpandOperands& e, const SlotRun& run,
                    int64_t h_first) {
  const int64_t r = e.B.size(2), n = e.B.size(1);
  const cd_t sc = static_cast<cd_t>(e.scale[run.slot]);
  const cd_t* b = e.B.const_data_ptr<cd_t>() + run.slot * n * r;
  const cd_t* bias = e.bias.defined() ? e.bias.const_data_ptr<cd_t>() + run.slot * n : nullptr;
  const cd_t* h0 = h.const_data_ptr<cd_t>();
  cd_t* o0 = out.mutable_data_ptr<cd_t>();
  for (int64_t t = run.begin; t < run.end; ++t) {
    const cd_t* ht = h0 + (t - h_first) * r;
    cd_t* ot = o0 + t * out.stride(0);
    for (int64_t o = 0; o < n; ++o) ot[o] += sc * (dot(b + o * r, ht, r) + (bias ? bias[o] : cd_t(0)));
  }
}

}  // namespace

ExpandOperands expand_operands(at::ScalarType cd, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                               const at::Tensor& scale) {
  ExpandOperands e;
  e.cd = cd;
  // detached: the run products write into views with out= ops, which autograd refuses
  e.B = lora_B.detach().to(cd).contiguous();
  if (lora_bias.has_value() && lora_bias->defined()) e.bias = lora_bias->detach().to(cd).contiguous();
  const at::Tensor s = scale.detach().to(at::kDouble).contiguous();
  e.scale.assign(s.const_data_ptr<double>(), s.const_data_ptr<double>() + s.numel());
  return e;
}

void expand_run(at::Tensor& out, const at::Tensor& h, const ExpandOperands& e, const SlotRun& run, int64_t h_first) {
  if (run.rows() < kGemmMinRows) {
    if (e.cd == at::kDouble) {
      expand_run_dot<double>(out, h, e, run, h_first);
    } else {
      expand_run_dot<float>(out, h, e, run, h_first);
    }
    return;
  }
  const double sc = e.scale[run.slot];
  at::Tensor rows = out.narrow(0, run.begin, run.rows());
  rows.addmm_(h.narrow(0, run.begin - h_first, run.rows()), e.B.select(0, run.slot).t(), 1.0, sc);
  if (e.bias.defined()) rows.add_(e.bias.select(0, run.slot), sc);
}

void expand_run_converted(at::Tensor& out, const at::Tensor& h, const ExpandOperands& e, const SlotRun& run,
                          int64_t h_first) {
  at::Tensor delta = at::mm(h.narrow(0, run.begin - h_first, run.rows()), e.B.select(0, run.slot).t());
  if (e.bias.defined()) delta.add_(e.bias.select(0, run.slot));
  out.narrow(0, run.begin, run.rows()).add_(delta, e.scale[run.slot]);
}

}  // namespace torchlora::cpu
