// The operators under torch.autocast (CPU and CUDA).
//
// Ops that multiply activations by weights run in the autocast dtype, as aten::linear and
// aten::conv2d do: their activation and weight arguments (by name, below) are cast, and the
// per-slot scales, seeds, indices and the float32 [T, r] intermediates are not. An op that
// writes into its first argument casts the other arguments to that tensor's dtype, so the
// result lands where the caller holds it. Every other op (embedding, DoRA norms and scales,
// dropout, the private forward/backward ops) keeps its inputs' dtypes, as aten::embedding and
// the norms do. Either way the kernels run with autocast off: their inner ATen calls see the
// dtypes the op checked (without this, a mm inside a kernel would turn bfloat16 on its own).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string_view>

#include "cpu/thread_scratch.h"

namespace torchlora {
namespace {

// kLowerPrecisionButWeight: as kLowerPrecision, except that a float32 weight is passed as it is:
// CPU linear_with_lora folds W + scaling * B @ A from it into the autocast dtype in one pass
// (the cast would be a pass of its own, and a rounded copy of W kept for backward). Where
// nothing will be differentiated, a float32 x is cast into a per-thread buffer.
enum class Policy { kLowerPrecision, kLowerPrecisionButWeight, kLikeMutated, kKeep };

// The arguments of the linear/conv-like ops that autocast casts: activations and weights.
bool is_cast_argument(std::string_view name) {
  constexpr std::array<std::string_view, 7> kNames{"x", "base_out", "weight", "bias", "lora_A", "lora_B", "lora_bias"};
  return std::find(kNames.begin(), kNames.end(), name) != kNames.end();
}

// Whether autograd will record the op: grad mode on and some tensor argument requiring grad.
bool differentiable(const torch::jit::Stack& stack, size_t first) {
  if (!at::GradMode::is_enabled()) return false;
  for (size_t i = first; i < stack.size(); ++i) {
    if (stack[i].isTensor() && stack[i].toTensor().requires_grad()) return true;
  }
  return false;
}

// A dense CPU tensor with real data: not the fake or functional tensor of a trace.
bool holds_data(const at::Tensor& t) {
  constexpr c10::DispatchKeySet kTraced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                         c10::DispatchKey::Functionalize});
  return t.device().is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(kTraced);
}

// x cast for an op that autograd will not record: the cast lives only while the op runs, so it
// goes into the thread's buffer. A fresh [T, in] tensor per call costs page faults (3-8% of a
// bfloat16 linear layer's forward at T = 2048, d = 1024), which F.linear's own cast pays.
struct CastInputSlot {};
at::Tensor cast_into_scratch(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor buffer = cpu::thread_scratch<CastInputSlot>(x.sizes(), x.options().dtype(dtype));
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return buffer.copy_(x);
}

template <c10::DeviceType kDevice>
void cast_arguments(const c10::OperatorHandle& op, torch::jit::Stack* stack, Policy policy) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  if (policy == Policy::kLikeMutated) {
    const c10::IValue& mutated = (*stack)[first];
    if (!mutated.isTensor() || !mutated.toTensor().is_floating_point()) return;
    dtype = mutated.toTensor().scalar_type();
  }
  const bool scratch_input = kDevice == c10::DeviceType::CPU && policy == Policy::kLowerPrecisionButWeight &&
                             !differentiable(*stack, first);
  for (size_t i = 0; i < args.size(); ++i) {
    const bool is_mutated = args[i].alias_info() != nullptr && args[i].alias_info()->isWrite();
    c10::IValue& value = (*stack)[first + i];
    if (is_mutated || !is_cast_argument(args[i].name()) || !value.isTensor()) continue;
    if (policy == Policy::kLowerPrecisionButWeight && args[i].name() == "weight" &&
        value.toTensor().scalar_type() == at::kFloat) {
      continue;
    }
    const at::Tensor& t = value.toTensor();
    // (a contiguous x only: the buffer is contiguous, and a strided x cast as autocast casts it
    // keeps its strides, which can change a GEMM's order of summation)
    if (scratch_input && args[i].name() == "x" && t.scalar_type() == at::kFloat && dtype != at::kFloat &&
        t.is_contiguous() && holds_data(t)) {
      value = cast_into_scratch(t, dtype);
      continue;
    }
    value = at::autocast::cached_cast(dtype, t, kDevice);
  }
}

template <c10::DeviceType kDevice, Policy kPolicy>
void autocast_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  if constexpr (kPolicy != Policy::kKeep) cast_arguments<kDevice>(op, stack, kPolicy);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  op.callBoxed(stack);
}

constexpr std::array<const char*, 6> kLowerPrecisionOps{
    "lora_linear", "linear_with_lora", "lora_conv2d", "linear_with_multi_lora", "multi_lora_shrink", "multi_lora_expand"};
constexpr std::array<const char*, 2> kInPlaceOps{"lora_linear_", "multi_lora_expand_"};
// Every other op with kernels of its own (the CompositeImplicitAutograd ones decompose into these).
constexpr std::array<const char*, 20> kKeepDtypeOps{
    "lora_embedding", "dora_weight_norm", "dora_scale", "dropout_apply", "multi_lora_row_slots",
    "multi_lora_row_dropout", "_lora_linear_forward", "_lora_linear_backward", "_lora_linear_forward_",
    "_linear_with_lora_forward", "_linear_with_lora_backward", "_lora_embedding_forward",
    "_lora_embedding_backward", "_lora_conv2d_forward", "_lora_conv2d_backward", "_linear_with_multi_lora_forward",
    "_multi_lora_shrink_backward", "_multi_lora_expand_backward", "_dora_weight_norm_backward", "_dora_scale_backward"};

template <c10::DeviceType kDevice>
void register_autocast(torch::Library& m) {
  for (const char* name : kLowerPrecisionOps) {
    if (kDevice == c10::DeviceType::CPU && std::string_view(name) == "linear_with_lora") {
      m.impl(name,
             torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<kDevice, Policy::kLowerPrecisionButWeight>>());
      continue;
    }
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<kDevice, Policy::kLowerPrecision>>());
  }
  for (const char* name : kInPlaceOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<kDevice, Policy::kLikeMutated>>());
  }
  for (const char* name : kKeepDtypeOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autocast_kernel<kDevice, Policy::kKeep>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, AutocastCPU, m) {
  register_autocast<c10::DeviceType::CPU>(m);
}

TORCH_LIBRARY_IMPL(torchlora, AutocastCUDA, m) {
  register_autocast<c10::DeviceType::CUDA>(m);
}

}  // namespace torchlora
