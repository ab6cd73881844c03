// CUDA registration of linear_with_lora: the base GEMM (cuBLAS) followed by the lora_linear
// kernels accumulating into its output; backward adds grad_out @ W to their grad_x.
#include <torch/library.h>

#include "../detail/linear_with_lora.h"

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("_linear_with_lora_forward", &torchlora::detail::linear_with_lora_forward_generic);
  m.impl("_linear_with_lora_backward", &torchlora::detail::linear_with_lora_backward_generic);
}
