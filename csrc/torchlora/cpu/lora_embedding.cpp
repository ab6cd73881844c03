// CPU kernels of lora_embedding: gather of A's columns and the expand GEMM with the scaling
// and accumulation folded in; backward through ATen's dense embedding backward.
#include <torch/library.h>

#include "../detail/aten_math.h"

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("_lora_embedding_forward", &torchlora::detail::lora_embedding_forward_aten);
  m.impl("_lora_embedding_backward", &torchlora::detail::lora_embedding_backward_aten);
}
