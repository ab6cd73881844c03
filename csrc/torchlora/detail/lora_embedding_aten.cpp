#include "aten_math.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/embedding_dense_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "checks.h"

namespace torchlora::detail {

TensorPair lora_embedding_forward_aten(const at::Tensor& ids, const at::Tensor& base_out,
                                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                                       double scaling) {
  const auto dims = check_lora_embedding(ids, base_out, lora_A, lora_B, scaling);
  const int64_t tokens = dims.tokens.expect_int(), dim = dims.embedding_dim.expect_int();
  const auto cd = compute_dtype(lora_A);
  const at::Tensor gathered = at::embedding(lora_A.to(cd).t(), ids.reshape({-1}));  // [N, r]
  const at::Tensor base2 = base_out.reshape({tokens, dim});
  at::Tensor out2;
  if (base_out.scalar_type() == cd) {
    out2 = at::addmm(base2, gathered, lora_B.to(cd).t(), 1.0, scaling);
  } else {
    out2 = accumulate_into_base(base2, at::mm(gathered, lora_B.to(cd).t()), scaling);
  }
  return {out2.view(base_out.sizes()), gathered.to(intermediate_dtype(lora_A))};
}

TensorPair lora_embedding_backward_aten(const at::Tensor& grad_out, const at::Tensor& ids,
                                        const at::Tensor& gathered, const at::Tensor& lora_A,
                                        const at::Tensor& lora_B, double scaling, int64_t padding_idx,
                                        bool scale_grad_by_freq, std::array<bool, 2> output_mask) {
  check_lora_embedding_backward(grad_out, ids, gathered, lora_A, lora_B, scaling, padding_idx);
  const int64_t vocab = lora_A.size(1), dim = lora_B.size(0);
  const int64_t tokens = ids.numel();
  const auto cd = compute_dtype(lora_A);
  const at::Tensor g2 = grad_out.reshape({tokens, dim}).to(cd);
  // A fresh [0] tensor per output not asked for: outputs of an op must not alias.
  auto none = [&] { return at::empty({0}, lora_A.options()); };
  at::Tensor grad_A = none(), grad_B = none();
  if (output_mask[1]) grad_B = at::mm(g2.t(), gathered.to(cd)).mul_(scaling).to(lora_B.scalar_type());
  if (output_mask[0]) {
    const at::Tensor grad_h = at::mm(g2, lora_B.to(cd)).mul_(scaling);  // [N, r]
    grad_A = at::embedding_dense_backward(grad_h, ids.reshape({-1}), vocab, padding_idx, scale_grad_by_freq)
                 .t()
                 .contiguous()
                 .to(lora_A.scalar_type());
  }
  return {grad_A, grad_B};
}

}  // namespace torchlora::detail
