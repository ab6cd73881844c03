// DoRA in the C++ LoRA layers, with PEFT's semantics: for adapter output z = base + s * lora,
//   out = g * (z - bias) + bias,  g = magnitude / ||W + s B A|| (the norm detached),
// several active adapters in turn, each on the previous result; merging rescales W + delta by
// g with the norm from the unmerged weight, kept to unmerge. The norm and the scale are
// torchlora::dora_weight_norm and torchlora::dora_scale.
#include <torchlora/nn/lora_layer.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <torchlora/ops.h>

namespace torchlora::nn {
namespace {

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The dtype dora_weight_norm accumulates in for factors of `dtype`.
at::ScalarType norm_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::vector<at::Tensor> LoraLayer::all_adapter_parameters(const std::string& name) const {
  auto out = adapter_parameters(name);
  if (!lora_magnitude_vector.is_empty() && lora_magnitude_vector->contains(name)) out.push_back(magnitude(name));
  return out;
}

at::Tensor LoraLayer::magnitude(const std::string& name) const {
  TORCH_CHECK_VALUE(uses_dora(name) && !lora_magnitude_vector.is_empty() && lora_magnitude_vector->contains(name),
                    "torchlora: adapter '", name, "' does not use DoRA; it has no magnitude");
  return (*lora_magnitude_vector)[name]->named_parameters(/*recurse=*/false)["weight"];
}

at::Tensor LoraLayer::weight_sq_norm() {
  const auto w = base_weight();
  auto& c = sq_norm_cache_;
  if (!c.sq_norm.defined() || c.impl != w.unsafeGetTensorImpl() || c.data != w.const_data_ptr() ||
      c.version != static_cast<uint32_t>(w._version()) || c.sq_norm.device() != w.device()) {
    at::NoGradGuard no_grad;
    c.sq_norm = torchlora::dora_weight_sq_norm(w.detach(), dora_fan_in_fan_out());
    c.impl = w.unsafeGetTensorImpl();
    c.data = w.const_data_ptr();
    c.version = static_cast<uint32_t>(w._version());
  }
  return c.sq_norm;
}

at::Tensor LoraLayer::dora_weight_norm(const std::string& name) {
  TORCH_CHECK_VALUE(uses_dora(name), "torchlora: adapter '", name, "' does not use DoRA");
  at::NoGradGuard no_grad;
  const auto f = stack_factors(name);
  const auto sq = weight_sq_norm();
  const bool cached_fits = sq.scalar_type() == norm_dtype(f.lora_A.scalar_type());
  return torchlora::dora_weight_norm(base_weight().detach(), f.lora_A.detach(), f.lora_B.detach(), scaling(name),
                                     dora_fan_in_fan_out(), cached_fits ? std::optional<at::Tensor>(sq) : std::nullopt);
}

void LoraLayer::init_dora(const std::string& name) {
  const auto& options = adapter_options(name);
  const bool has = !lora_magnitude_vector.is_empty() && lora_magnitude_vector->contains(name);
  if (has) lora_magnitude_vector->pop(name);
  if (!options.use_dora()) return;
  TORCH_CHECK_VALUE(!options.lora_bias(), "torchlora: lora_bias=true is not supported for DoRA (use_dora=true)");
  check_dora(options);
  if (lora_magnitude_vector.is_empty()) {
    lora_magnitude_vector = register_module("lora_magnitude_vector", torch::nn::ModuleDict());
  }
  // PEFT starts the magnitude at the norm of the initial W + s B A (||W|| when B is zero).
  const auto norm = dora_weight_norm(name);
  const auto dtype = stack_factors(name).lora_A.scalar_type();
  auto holder = std::make_shared<torch::nn::Module>("torchlora::nn::DoraMagnitude");
  holder->register_parameter("weight", norm.to(dtype).reshape(magnitude_shape(norm.numel())).clone());
  lora_magnitude_vector->update(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{{name, holder}});
}

at::Tensor LoraLayer::dora_update(const std::string& name, const at::Tensor& x, const at::Tensor& result) {
  const double p = dropout_p(name);
  // PEFT recomputes the base output from the dropped-out input in that case; the fused ops here
  // draw their mask internally, so the two would not see the same mask.
  TORCH_CHECK_NOT_IMPLEMENTED(p == 0.0, "torchlora: DoRA adapter '", name, "' has lora_dropout=", p,
                              ", which the C++ modules do not apply with DoRA in training mode; set lora_dropout=0 "
                              "or call eval()");
  const auto z = lora_update(name, x, result);
  return torchlora::dora_scale(z, magnitude(name), dora_weight_norm(name), optional_tensor(base_bias()),
                               dora_output_dim(z));
}

at::Tensor LoraLayer::own_dora_factors(const std::vector<std::string>& names) {
  int64_t features = -1;
  at::TensorOptions options;
  for (const auto& name : names) {
    if (!uses_dora(name)) continue;
    TORCH_CHECK_NOT_IMPLEMENTED(dropout_p(name) == 0.0, "torchlora: DoRA adapter '", name, "' has lora_dropout=",
                                dropout_p(name), ", which mixed batches do not apply with DoRA in training mode");
    const auto m = magnitude(name);
    features = m.numel();
    options = m.options().dtype(norm_dtype(m.scalar_type()));
  }
  if (features < 0) return {};
  const auto ones = at::ones({1, features}, options);
  std::vector<at::Tensor> rows;
  for (const auto& name : names) {
    // g = magnitude / norm, as dora_scale applies it (differentiable in the magnitude)
    rows.push_back(uses_dora(name) ? torchlora::dora_scale(ones, magnitude(name), dora_weight_norm(name)).squeeze(0)
                                   : ones.squeeze(0));
  }
  return at::stack(rows);
}

at::Tensor LoraLayer::apply_slot_dora(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& out) {
  if (!stack.dora_factor.defined()) return out;
  TORCH_CHECK_VALUE(out.dim() >= 2, "torchlora: DoRA slots need a batched input (one slot per sample)");
  return torchlora::multi_dora_scale(out, stack.dora_factor.to(out.device()), optional_tensor(base_bias()),
                                     sample_slots, dora_output_dim(out));
}

at::Tensor LoraLayer::unmerged_weight() {
  auto w = base_weight().detach().clone();
  for (auto it = merged_.rbegin(); it != merged_.rend(); ++it) w = unmerged_weight_of(*it, w, /*pop_norm=*/false);
  return w;
}

at::Tensor LoraLayer::merged_weight(const std::string& name, const at::Tensor& weight, const at::Tensor& unmerged) {
  const auto dw = get_delta_weight(name).to(weight.scalar_type());
  if (!uses_dora(name)) return weight + dw;
  const auto f = stack_factors(name);
  const auto norm = torchlora::dora_weight_norm(unmerged, f.lora_A.detach(), f.lora_B.detach(), scaling(name),
                                                dora_fan_in_fan_out());
  merged_dora_norms_[name] = norm;
  return torchlora::dora_scale(weight + dw, magnitude(name).detach(), norm, std::nullopt, dora_weight_dim());
}

at::Tensor LoraLayer::unmerged_weight_of(const std::string& name, const at::Tensor& weight, bool pop_norm) {
  const auto dw = get_delta_weight(name).to(weight.scalar_type());
  if (!uses_dora(name)) return weight - dw;
  const auto it = merged_dora_norms_.find(name);
  TORCH_CHECK(it != merged_dora_norms_.end(), "torchlora: DoRA adapter '", name, "' has no weight norm from its merge");
  const auto norm = it->second;
  if (pop_norm) merged_dora_norms_.erase(it);
  // W / g: dora_scale with magnitude and norm swapped multiplies by norm / magnitude.
  return torchlora::dora_scale(weight, norm, magnitude(name).detach(), std::nullopt, dora_weight_dim()) - dw;
}

}  // namespace torchlora::nn
