// Schema and C++ entry point of torchlora.lora_conv3d. Its one kernel is a composition of ATen
// convolutions (composite/lora_conv3d.cpp), so it has no per-backend files.
#include <torchlora/conv3d_ops.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace torchlora {

TORCH_LIBRARY_FRAGMENT(torchlora, m) {
  m.def(
      "lora_conv3d(Tensor x, Tensor base_out, Tensor lora_A, Tensor lora_B, Tensor? lora_bias, "
      "int[3] stride, int[3] padding, int[3] dilation, int groups, float scaling, float dropout_p=0., "
      "Tensor? seed=None) -> Tensor");
}

namespace {
using Conv3dFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                            int64_t, double, double, const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<Conv3dFn>& lora_conv3d_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchlora::lora_conv3d", "").typed<Conv3dFn>();
  return handle;
}
}  // namespace

at::Tensor lora_conv3d(const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  return lora_conv3d_op().call(x, base_out, lora_A, lora_B, lora_bias, stride, padding, dilation, groups, scaling,
                               dropout_p, seed);
}

}  // namespace torchlora
