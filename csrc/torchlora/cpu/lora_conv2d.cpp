// CPU kernels of lora_conv2d: the ATen path (BLAS GEMMs with the scaling and accumulation folded
// into the expand), computing float16/bfloat16 in float32.
#include <torch/library.h>

#include "../detail/aten_math.h"

TORCH_LIBRARY_IMPL(torchlora, CPU, m) {
  m.impl("_lora_conv2d_forward", &torchlora::detail::lora_conv2d_forward_aten);
  m.impl("_lora_conv2d_backward", &torchlora::detail::lora_conv2d_backward_aten);
}
