// CUDA registration of the in-place lora_linear_: the device-generic ATen path (cuBLAS addmm_
// into base_out, the mask from the CUDA dropout_apply kernel), so the op works on every device.
#include <torch/library.h>

#include "../detail/aten_math.h"

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("_lora_linear_forward_", &torchlora::detail::lora_linear_forward_inplace_aten);
}
