// CUDA registration of lora_linear: the ATen path (cuBLAS GEMMs / cuDNN through ATen, the
// dropout mask from the CUDA dropout_apply kernel).
#include <torch/library.h>

#include "../detail/aten_math.h"

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("_lora_linear_forward", &torchlora::detail::lora_linear_forward_aten);
  m.impl("_lora_linear_backward", &torchlora::detail::lora_linear_backward_aten);
}
