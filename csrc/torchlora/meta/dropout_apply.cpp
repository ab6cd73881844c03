// Meta kernel of dropout_apply: a contiguous tensor of x's shape.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../detail/dropout_checks.h"

namespace torchlora::meta {
namespace {

at::Tensor dropout_apply_meta(const at::Tensor& x, double p, const at::Tensor& seed) {
  detail::check_dropout_apply(x, p, seed);
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, Meta, m) {
  m.impl("dropout_apply", &dropout_apply_meta);
}

}  // namespace torchlora::meta
