// CPU kernel of dropout_apply: x * keep(seed, i) / (1 - p) over the row-major element index.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../detail/dropout_checks.h"
#include "dropout_draw.h"
#include "dropped_bits.h"

namespace torchlora::cpu {
namespace {

at::Tensor dropout_apply_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  detail::check_dropout_apply(x, p, seed);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const DropoutDraw d = dropout_draw(p, seed, "torchlora.dropout_apply");
  // 64 elements (one word of mask bits, dropped_bits.h) at a time.
  const int64_t words = dropped_words(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "torchlora_dropout_apply_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, words, 64, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        uint64_t dropped = 0;
        fill_dropped_words(&dropped, w, w + 1, n, d.key, d.threshold);
        const int64_t first = 64 * w, last = std::min<int64_t>(first + 64, n);
        for (int64_t i = first; i < last; ++i) {
          dst[i] = ((dropped >> (i - first)) & 1u) ? static_cast<scalar_t>(0)
                                                   : static_cast<scalar_t>(static_cast<acc_t>(src[i]) * d.scale);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("dropout_apply", &dropout_apply_cpu);
}

}  // namespace torchlora::cpu
