// CUDA registration of lora_conv2d: the ATen path (cuBLAS GEMMs / cuDNN through ATen, the
// dropout mask from the CUDA dropout_apply kernel).
#include <torch/library.h>

#include "../detail/aten_math.h"

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("_lora_conv2d_forward", &torchlora::detail::lora_conv2d_forward_aten);
  m.impl("_lora_conv2d_backward", &torchlora::detail::lora_conv2d_backward_aten);
}
