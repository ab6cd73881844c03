#include <torchlora/nn/lora_layer.h>

#include <torchlora/peft/scaling.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

namespace torchlora::nn {
namespace {

std::string join(const std::vector<std::string>& names) {
  std::ostringstream s;
  for (size_t i = 0; i < names.size(); ++i) {
    s << (i ? ", " : "") << "'" << names[i] << "'";
  }
  return "[" + s.str() + "]";
}

bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

double AdapterOptions::scaling() const { return peft::lora_scaling(lora_alpha_, r_, use_rslora_); }

void LoraLayer::check_adapter_name(const std::string& name) {
  TORCH_CHECK(!name.empty(), "torchlora: an adapter name must not be empty");
  TORCH_CHECK(name.find('.') == std::string::npos, "torchlora: adapter name '", name, "' must not contain '.'");
  TORCH_CHECK(name != peft::kBaseAdapterName, "torchlora: '", peft::kBaseAdapterName, "' is reserved for the base layer");
}

void LoraLayer::check_options(const AdapterOptions& o) {
  peft::check_rank(o.r());
  peft::check_alpha(o.lora_alpha());
  TORCH_CHECK(o.lora_dropout() >= 0.0 && o.lora_dropout() < 1.0, "torchlora: lora_dropout must be in [0, 1), got ",
              o.lora_dropout());
}

void LoraLayer::register_adapter(const std::string& name, const AdapterOptions& options) {
  if (!has_adapter(name)) {
    order_.push_back(name);
  }
  adapters_[name] = options;
  ++stack_changes_;
}

const AdapterOptions& LoraLayer::adapter_options(const std::string& name) const {
  auto it = adapters_.find(name);
  TORCH_CHECK(it != adapters_.end(), "torchlora: adapter '", name, "' does not exist in this layer; it has ",
              join(order_));
  return it->second;
}

double LoraLayer::scaling(const std::string& name) const { return adapter_options(name).scaling(); }

double LoraLayer::dropout_p(const std::string& name) const {
  return is_training() ? adapter_options(name).lora_dropout() : 0.0;
}

void LoraLayer::move_adapter_to_base(const std::string& name) {
  const auto weight = base_weight();
  for (auto p : all_adapter_parameters(name)) {
    at::NoGradGuard no_grad;
    const auto dtype = at::isFloatingType(weight.scalar_type()) ? weight.scalar_type() : p.scalar_type();
    p.set_data(p.to(weight.device(), dtype));
  }
}

void LoraLayer::set_adapter(const std::vector<std::string>& names, bool inference_mode) {
  for (const auto& adapter : order_) {
    const bool trainable = contains(names, adapter) && !inference_mode;
    for (auto p : all_adapter_parameters(adapter)) {
      p.requires_grad_(trainable);
    }
  }
  active_ = names;
}

void LoraLayer::enable_adapters(bool enabled) {
  if (enabled) {
    set_adapter(active_);
    disabled_ = false;
  } else {
    for (const auto& adapter : order_) {
      for (auto p : all_adapter_parameters(adapter)) {
        p.requires_grad_(false);
      }
    }
    disabled_ = true;
  }
}

void LoraLayer::delete_adapter(const std::string& name) {
  adapter_options(name);  // raises for unknown names
  TORCH_CHECK(!contains(merged_, name), "torchlora: adapter '", name, "' is merged; unmerge it before deleting it");
  remove_adapter_parameters(name);
  if (!lora_magnitude_vector.is_empty() && lora_magnitude_vector->contains(name)) lora_magnitude_vector->pop(name);
  adapters_.erase(name);
  ++stack_changes_;
  order_.erase(std::find(order_.begin(), order_.end(), name));
  if (contains(active_, name)) {
    std::vector<std::string> remaining;
    for (const auto& a : active_) {
      if (a != name) remaining.push_back(a);
    }
    if (remaining.empty() && !order_.empty()) {
      remaining.push_back(order_.front());
    }
    set_adapter(remaining);
  }
}

void LoraLayer::merge(bool safe_merge, const std::vector<std::string>& names) {
  const auto requested = names.empty() ? active_ : names;
  for (const auto& name : requested) {
    adapter_options(name);
  }
  std::vector<std::string> todo;
  for (const auto& name : requested) {
    if (contains(merged_, name)) {
      TORCH_WARN("torchlora: adapter '", name, "' is already merged; it is not merged again");
    } else {
      todo.push_back(name);
    }
  }
  at::NoGradGuard no_grad;
  auto weight = base_weight();
  auto bias = base_bias();
  // DoRA's norms come from the base weight without any merged adapter, as in forward.
  const bool any_dora = std::any_of(todo.begin(), todo.end(), [&](const std::string& n) { return uses_dora(n); });
  const at::Tensor unmerged = any_dora ? unmerged_weight() : at::Tensor();
  for (const auto& name : todo) {
    check_mergeable(name);
    auto db = delta_bias(name);
    TORCH_CHECK(!db.defined() || bias.defined(),
                "torchlora: Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.");
    if (db.defined()) {
      db = db.to(bias.scalar_type());
    }
    const auto new_w = merged_weight(name, weight, unmerged);
    if (safe_merge) {
      const auto new_b = db.defined() ? bias + db : at::Tensor();
      const bool finite = at::isfinite(new_w).all().item<bool>() && (!new_b.defined() || at::isfinite(new_b).all().item<bool>());
      if (!finite) merged_dora_norms_.erase(name);
      TORCH_CHECK_VALUE(finite, "torchlora: NaNs detected in the merged weights. The adapter ", name,
                        " seems to be broken");
      weight.copy_(new_w);
      if (new_b.defined()) bias.copy_(new_b);
    } else {
      weight.copy_(new_w);
      if (db.defined()) bias.add_(db);
    }
    merged_.push_back(name);
  }
}

void LoraLayer::unmerge() {
  if (!merged()) {
    TORCH_WARN("torchlora: Already unmerged. Nothing to do.");
    return;
  }
  at::NoGradGuard no_grad;
  auto weight = base_weight();
  auto bias = base_bias();
  while (!merged_.empty()) {
    const auto name = merged_.back();
    merged_.pop_back();
    weight.copy_(unmerged_weight_of(name, weight, /*pop_norm=*/true));
    const auto db = delta_bias(name);
    if (db.defined()) bias.sub_(db.to(bias.scalar_type()));
  }
}

void LoraLayer::bind_slots(AdapterStack stack, at::Tensor sample_slots) {
  TORCH_CHECK_VALUE(!merged(), "torchlora: slots cannot be bound to a layer whose adapters are merged (its base "
                    "weight holds them); unmerge first");
  TORCH_CHECK(stacks_adapters(), "torchlora: this layer cannot serve slots with its base layer options");
  TORCH_CHECK_TYPE(sample_slots.defined() && sample_slots.dim() == 1 &&
                       (sample_slots.scalar_type() == at::kInt || sample_slots.scalar_type() == at::kLong),
                   "torchlora: bound sample slots must be a 1-D int32 or int64 tensor");
  TORCH_CHECK_VALUE(stack.lora_A.defined() && stack.lora_B.defined() && stack.scale.defined() &&
                        stack.scale.size(0) == stack.lora_A.size(0),
                    "torchlora: bound slots need lora_A, lora_B and one scale per slot");
  TORCH_CHECK_VALUE(!stack.dora_factor.defined() ||
                        (stack.dora_factor.dim() == 2 && stack.dora_factor.size(0) == stack.scale.size(0)),
                    "torchlora: bound DoRA factors must be [slots, out] with one row per slot");
  if (stack.dropout.empty()) stack.dropout.assign(static_cast<size_t>(stack.scale.size(0)), 0.0);
  bound_ = BoundSlots{std::move(stack), std::move(sample_slots)};
}

at::Tensor LoraLayer::forward_bound(const at::Tensor& x) {
  const auto& slots = bound_->sample_slots;
  TORCH_CHECK_VALUE(x.dim() > 0 && x.size(0) == slots.size(0), "torchlora: the bound batch has ", slots.size(0),
                    " samples but the layer's input has ", x.dim() > 0 ? x.size(0) : 0, " (input ", x.sizes(), ")");
  TORCH_CHECK_VALUE(!merged(), "torchlora: this layer's adapters were merged while slots are bound");
  const auto on_device = slots.to(x.device());
  return apply_slot_dora(bound_->stack, on_device, forward_with_slots(bound_->stack, on_device, x));
}

at::Tensor LoraLayer::forward(const at::Tensor& x) {
  if (bound_) {
    return forward_bound(x);
  }
  if (disabled_) {
    if (merged()) unmerge();
    return base_forward(x);
  }
  auto result = base_forward(x);
  if (merged()) {
    return result;
  }
  const auto dtype = result.scalar_type();
  for (const auto& name : active_) {
    if (has_adapter(name)) {
      result = uses_dora(name) ? dora_update(name, x, result) : lora_update(name, x, result);
    }
  }
  return result.to(dtype);
}

at::Tensor LoraLayer::forward_mixed(const at::Tensor& x, const std::vector<std::string>& adapter_names) {
  if (disabled_) {
    return forward(x);
  }
  TORCH_CHECK_VALUE(!merged(), "torchlora: adapter_names (mixed-batch inference) cannot be used while adapters are merged");
  TORCH_CHECK_VALUE(x.dim() > 0 && static_cast<int64_t>(adapter_names.size()) == x.size(0), "torchlora: adapter_names has ",
                    adapter_names.size(), " entries but the batch has ", x.dim() > 0 ? x.size(0) : 0, " samples");
  bool any = false;
  for (const auto& name : adapter_names) {
    TORCH_CHECK_VALUE(name == peft::kBaseAdapterName || has_adapter(name),
                      "torchlora: adapter_names contains the unknown adapter '", name, "'; this layer has ",
                      join(order_));
    any = any || name != peft::kBaseAdapterName;
  }
  if (!stacks_adapters()) return mixed_batch_loop(x, adapter_names);
  if (!any) return base_forward(x);
  const AdapterStack stack = adapter_stack();
  const auto slots = stack.sample_slots(adapter_names, x.device());
  return apply_slot_dora(stack, slots, forward_with_slots(stack, slots, x));
}

at::Tensor LoraLayer::forward_slots(const at::Tensor& x, const at::Tensor& sample_slots) {
  if (disabled_) {
    return forward(x);
  }
  TORCH_CHECK_VALUE(!merged(), "torchlora: adapter_slots (mixed batches) cannot be used while adapters are merged");
  TORCH_CHECK_TYPE(sample_slots.defined() && (sample_slots.scalar_type() == at::kInt || sample_slots.scalar_type() == at::kLong),
                   "torchlora: adapter_slots must be an int32 or int64 tensor (one slot per sample)");
  TORCH_CHECK_VALUE(sample_slots.dim() == 1 && x.dim() > 0 && sample_slots.size(0) == x.size(0),
                    "torchlora: adapter_slots must have shape [", x.dim() > 0 ? x.size(0) : 0,
                    "] (one per sample), got ", sample_slots.sizes());
  TORCH_CHECK(stacks_adapters(), "torchlora: adapter_slots is not supported by this layer with its base layer options");
  const AdapterStack stack = adapter_stack();
  const auto slots = sample_slots.to(x.device());
  return apply_slot_dora(stack, slots, forward_with_slots(stack, slots, x));
}

at::Tensor LoraLayer::forward_with_slots(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& x) {
  return multi_lora_update(stack, sample_slots, x, base_forward(x));
}

AdapterStack LoraLayer::adapter_stack() {
  const bool cacheable = !at::GradMode::is_enabled();
  auto version_sum = [](const std::vector<at::Tensor>& sources) {
    int64_t sum = 0;
    for (const auto& t : sources) sum += static_cast<int64_t>(t._version());
    return sum;
  };
  if (cacheable && stack_cache_.changes == stack_changes_ && !stack_cache_.sources.empty() &&
      stack_cache_.sources.front().device() == stack_cache_.stack.lora_A.device() &&
      version_sum(stack_cache_.sources) == stack_cache_.versions) {
    return stack_cache_.stack;
  }
  std::vector<std::string> names;
  std::vector<AdapterFactors> factors;
  std::vector<double> scalings, dropout;
  for (const auto& name : order_) {
    names.push_back(name);
    factors.push_back(stack_factors(name));
    scalings.push_back(scaling(name));
    dropout.push_back(adapters_.at(name).lora_dropout());
  }
  TORCH_CHECK_VALUE(!names.empty(), "torchlora: this layer holds no adapters to stack");
  const auto dims = stack_rank_dims();
  AdapterStack stack = stack_adapters(names, factors, scalings, dropout, dims[0], dims[1], stack_groups());
  stack.dora_factor = own_dora_factors(names);
  if (cacheable) {
    stack_cache_.sources.clear();
    for (const auto& f : factors) {
      for (const auto& t : {f.lora_A, f.lora_B, f.lora_bias}) {
        if (t.defined()) stack_cache_.sources.push_back(t);
      }
    }
    if (stack.dora_factor.defined()) {  // the factors also follow the magnitudes and the base weight
      for (const auto& name : names) {
        if (uses_dora(name)) stack_cache_.sources.push_back(magnitude(name));
      }
      stack_cache_.sources.push_back(base_weight());
    }
    stack_cache_.versions = version_sum(stack_cache_.sources);
    stack_cache_.changes = stack_changes_;
    stack_cache_.stack = stack;
  }
  return stack;
}

at::Tensor LoraLayer::mixed_batch_loop(const at::Tensor& x, const std::vector<std::string>& adapter_names) {
  std::vector<std::string> groups;
  std::map<std::string, std::vector<int64_t>> rows;
  for (size_t i = 0; i < adapter_names.size(); ++i) {
    if (!rows.count(adapter_names[i])) groups.push_back(adapter_names[i]);
    rows[adapter_names[i]].push_back(static_cast<int64_t>(i));
  }
  auto result = base_forward(x);
  for (const auto& name : groups) {
    if (name == peft::kBaseAdapterName) continue;
    const auto index = at::tensor(rows[name], at::TensorOptions().dtype(at::kLong)).to(x.device());
    const auto xs = x.index_select(0, index);
    const auto rs = result.index_select(0, index);
    const auto updated = uses_dora(name) ? dora_update(name, xs, rs) : lora_update(name, xs, rs);
    result = result.index_copy(0, index, updated.to(result.scalar_type()));
  }
  return result;
}

}  // namespace torchlora::nn
