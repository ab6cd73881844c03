// CPU kernels of dora_weight_norm: the GEMMs through ATen (detail/dora_math.cpp), then each
// row's norm from them in a parallel loop. Backward is the ATen statement of the gradient.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../detail/dora_math.h"

namespace torchlora::cpu {
namespace {

template <typename acc_t>
void combine_rows(const detail::DoraNormTerms& t, acc_t s, acc_t* out, int64_t rows, int64_t rank) {
  const acc_t* wa = t.weight_a.const_data_ptr<acc_t>();
  const acc_t* bg = t.b_gram.const_data_ptr<acc_t>();
  const acc_t* b = t.lora_b.const_data_ptr<acc_t>();
  const acc_t* sq = t.sq_norm.const_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, rank));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t cross = 0, lowrank = 0;
      const int64_t o = i * rank;
      for (int64_t j = 0; j < rank; ++j) {
        cross += wa[o + j] * b[o + j];
        lowrank += bg[o + j] * b[o + j];
      }
      // Rounding can take an all but zero row slightly below 0.
      out[i] = std::sqrt(std::max(acc_t(0), sq[i] + 2 * s * cross + s * s * lowrank));
    }
  });
}

at::Tensor dora_weight_norm_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                double scaling, bool fan_in_fan_out, const std::optional<at::Tensor>& weight_sq_norm) {
  const auto terms = detail::dora_norm_terms(weight, lora_A, lora_B, scaling, fan_in_fan_out, weight_sq_norm,
                                             "torchlora.dora_weight_norm");
  const int64_t rows = terms.lora_b.size(0), rank = terms.lora_b.size(1);
  at::Tensor norm = at::empty({rows}, terms.lora_b.options());
  if (norm.scalar_type() == at::kDouble) {
    combine_rows<double>(terms, scaling, norm.mutable_data_ptr<double>(), rows, rank);
  } else {
    combine_rows<float>(terms, static_cast<float>(scaling), norm.mutable_data_ptr<float>(), rows, rank);
  }
  return norm.to(lora_A.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("dora_weight_norm", &dora_weight_norm_cpu);
  m.impl("_dora_weight_norm_backward", &torchlora::detail::dora_weight_norm_backward_aten);
}

}  // namespace torchlora::cpu
