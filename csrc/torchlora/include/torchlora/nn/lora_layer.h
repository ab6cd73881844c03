// LibTorch LoRA modules: the adapter bookkeeping shared by LoraLinear, LoraEmbedding and
// LoraConv2d, with PEFT's parameter names (base_layer.weight, lora_A.<adapter>.weight,
// lora_embedding_A.<adapter>, ...) and the same math as python/torchlora/nn.
#pragma once

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>

#include <array>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/nn/adapter_stack.h>
#include <torchlora/peft/names.h>

namespace torchlora::nn {

// init_lora_weights: True (A kaiming-uniform, B zero; embeddings A zero, B normal),
// "gaussian" (A ~ N(0, 1/r), B zero) or False (both random: the adapter is not a no-op).
enum class LoraInit { Default, Gaussian, Random };

struct TORCHLORA_API AdapterOptions {
  // lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (torchlora::peft::lora_scaling).
  double scaling() const;

  TORCH_ARG(int64_t, r) = 8;
  TORCH_ARG(double, lora_alpha) = 8.0;
  TORCH_ARG(double, lora_dropout) = 0.0;
  TORCH_ARG(bool, use_rslora) = false;
  TORCH_ARG(bool, lora_bias) = false;
  TORCH_ARG(LoraInit, init) = LoraInit::Default;
  // DoRA: a trainable magnitude per output feature rescales W + scaling * B A to that norm
  // (PEFT's use_dora; lora_magnitude_vector.<adapter>.weight, initialised to the norm).
  TORCH_ARG(bool, use_dora) = false;
};

class TORCHLORA_API LoraLayer : public torch::nn::Module {
 public:
  // Adds (or replaces) adapter `name` with fresh weights initialised per options.init().
  virtual void update_layer(const std::string& name, const AdapterOptions& options) = 0;
  // The change adapter `name` makes to the base weight, in the base weight's layout.
  virtual at::Tensor get_delta_weight(const std::string& name) const = 0;

  std::vector<std::string> adapter_names() const { return order_; }
  bool has_adapter(const std::string& name) const { return adapters_.count(name) > 0; }
  const AdapterOptions& adapter_options(const std::string& name) const;
  double scaling(const std::string& name) const;

  const std::vector<std::string>& active_adapters() const { return active_; }
  // Makes `names` the active adapters: their parameters become trainable (frozen with
  // inference_mode), every other adapter's are frozen.
  void set_adapter(const std::vector<std::string>& names, bool inference_mode = false);
  void set_adapter(const std::string& name, bool inference_mode = false) { set_adapter(std::vector<std::string>{name}, inference_mode); }
  // Off: the layer computes its base layer alone (unmerging first), adapters frozen.
  void enable_adapters(bool enabled);
  bool adapters_disabled() const { return disabled_; }
  // Removes an adapter (not while merged); if it was active, the first remaining one becomes active.
  void delete_adapter(const std::string& name);

  bool merged() const { return !merged_.empty(); }
  const std::vector<std::string>& merged_adapters() const { return merged_; }
  // Adds the deltas of `names` (default: the active adapters) to the base weight (and
  // lora_bias to the base bias). safe_merge forms the sums on copies and raises, leaving the
  // weights untouched, if anything is not finite.
  void merge(bool safe_merge = false, const std::vector<std::string>& names = {});
  // Subtracts every merged adapter again, newest first.
  void unmerge();

  // DoRA. Whether adapter `name` uses it; its magnitude parameter (Linear [out], Embedding [dim],
  // Conv2d [1, out, 1, 1]); ||W + scaling * B A|| per output feature for the base weight as it
  // is now (detached, as DoRA uses it; torchlora::dora_weight_norm with ||W||^2 cached while
  // the base weight is unchanged). c10::Error for adapters without DoRA.
  bool uses_dora(const std::string& name) const { return adapter_options(name).use_dora(); }
  at::Tensor magnitude(const std::string& name) const;
  at::Tensor dora_weight_norm(const std::string& name);

  // Dropout probability of `name` in effect now (0 in eval mode).
  double dropout_p(const std::string& name) const;

  // base_layer(x) plus every active adapter's low-rank term; the base layer alone while the
  // adapters are merged or disabled (unmerging them first).
  virtual at::Tensor forward(const at::Tensor& x);
  // Mixed batch: sample i uses adapter adapter_names[i] (peft::kBaseAdapterName: none), one
  // multi-adapter operator for the whole batch. Also in training mode: each sample's gradient
  // reaches only its own adapter. With the adapters disabled, forward(x).
  at::Tensor forward_mixed(const at::Tensor& x, const std::vector<std::string>& adapter_names);
  // The same with the assignment as a tensor: sample i takes adapter_names()[sample_slots[i]]
  // (-1: none), e.g. from an AdapterPool.
  at::Tensor forward_slots(const at::Tensor& x, const at::Tensor& sample_slots);
  // This layer's adapters stacked in slots (slot i = adapter_names()[i]). Without autograd a
  // cached copy, rebuilt when adapters are added or removed, changed in place (their version
  // counters tell) or moved; with autograd built from the parameters, so gradients reach them.
  AdapterStack adapter_stack();
  // Drops the cached stack (after replacing a parameter's data by other means).
  void refresh_adapter_stack() { ++stack_changes_; }

  // Slots from outside the layer (serve::PoolBinding): while bound, forward(x) is the base layer
  // plus sample i's slot sample_slots[i] of `stack` (-1: none), whatever the layer's own adapters;
  // with stack.dora_factor, each sample's output is then DoRA-scaled by its slot's row.
  void bind_slots(AdapterStack stack, at::Tensor sample_slots);
  void unbind_slots() { bound_.reset(); }
  bool slots_bound() const { return bound_.has_value(); }

  // PEFT's lora_magnitude_vector (registered with the first DoRA adapter).
  torch::nn::ModuleDict lora_magnitude_vector{nullptr};

 protected:
  explicit LoraLayer(std::string name) : torch::nn::Module(std::move(name)) {}

  // Registers the bookkeeping of adapter `name` (called by update_layer after checks).
  void register_adapter(const std::string& name, const AdapterOptions& options);
  static void check_adapter_name(const std::string& name);
  static void check_options(const AdapterOptions& options);

  virtual std::vector<at::Tensor> adapter_parameters(const std::string& name) const = 0;
  virtual void remove_adapter_parameters(const std::string& name) = 0;
  virtual at::Tensor base_forward(const at::Tensor& x) = 0;
  virtual at::Tensor base_weight() const = 0;
  virtual at::Tensor base_bias() const = 0;  // undefined when the base layer has none
  virtual at::Tensor delta_bias(const std::string& name) const { return {}; }
  virtual void check_mergeable(const std::string& name) const {}
  // `result` plus adapter `name`'s low-rank term for input `x`.
  virtual at::Tensor lora_update(const std::string& name, const at::Tensor& x, const at::Tensor& result) = 0;
  // Puts adapter `name`'s parameters on the base weight's device (and dtype, if floating).
  void move_adapter_to_base(const std::string& name);
  // After the factors are in place: gives a DoRA adapter its magnitude (the current weight norm),
  // drops a stale one from a replaced DoRA adapter otherwise.
  void init_dora(const std::string& name);

  // DoRA's layout here: whether the base weight is stored [in, out] (embeddings), the dimension
  // of the base weight (merge) and of an output `out` (forward) that holds the output features,
  // and PEFT's magnitude shape for `features` outputs. check_dora raises for what is unsupported.
  virtual bool dora_fan_in_fan_out() const { return false; }
  virtual int64_t dora_weight_dim() const { return 0; }
  virtual int64_t dora_output_dim(const at::Tensor& out) const { return -1; }
  virtual std::vector<int64_t> magnitude_shape(int64_t features) const { return {features}; }
  virtual void check_dora(const AdapterOptions& options) const {}

  // Mixed batches. The adapter's factors in the multi-adapter operator's layout, the rank
  // dimensions of lora_A and lora_B in it, and the groups of a grouped conv.
  virtual AdapterFactors stack_factors(const std::string& name) const = 0;
  virtual std::array<int64_t, 2> stack_rank_dims() const { return {0, 1}; }
  virtual int64_t stack_groups() const { return 1; }
  // Whether mixed batches take the multi-adapter operator here (else a loop per adapter).
  virtual bool stacks_adapters() const { return true; }
  // The base layer's output plus each sample's adapter (sample_slots: one slot per sample).
  virtual at::Tensor forward_with_slots(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& x);
  // `result` plus each sample's adapter for input x.
  virtual at::Tensor multi_lora_update(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& x,
                                       const at::Tensor& result) = 0;

  bool disabled_ = false;

 private:
  std::vector<std::string> order_;
  std::map<std::string, AdapterOptions> adapters_;
  std::vector<std::string> active_;
  std::vector<std::string> merged_;
  // the cached stack and what it was built from (see adapter_stack)
  int64_t stack_changes_ = 0;
  struct StackCache {
    int64_t changes = -1;
    int64_t versions = 0;
    std::vector<at::Tensor> sources;
    AdapterStack stack;
  } stack_cache_;
  struct BoundSlots {
    AdapterStack stack;
    at::Tensor sample_slots;
  };
  std::optional<BoundSlots> bound_;
  // ||W||^2 of the base weight, and what it was computed from
  struct SqNormCache {
    at::Tensor sq_norm;
    const void* impl = nullptr;
    const void* data = nullptr;
    uint32_t version = 0;
  } sq_norm_cache_;
  // the norms DoRA adapters were merged with (PEFT caches them for unmerge)
  std::map<std::string, at::Tensor> merged_dora_norms_;
  at::Tensor forward_bound(const at::Tensor& x);
  std::vector<at::Tensor> all_adapter_parameters(const std::string& name) const;
  at::Tensor weight_sq_norm();
  // `result` with adapter `name` applied the DoRA way: dora_scale(lora_update(...)).
  at::Tensor dora_update(const std::string& name, const at::Tensor& x, const at::Tensor& result);
  // The stack's DoRA factors applied to a mixed batch's output (nothing when it has none).
  at::Tensor apply_slot_dora(const AdapterStack& stack, const at::Tensor& sample_slots, const at::Tensor& out);
  // [S, out] factors of the layer's own adapters (1 for plain LoRA), undefined without DoRA.
  at::Tensor own_dora_factors(const std::vector<std::string>& names);
  // The base weight with every merged adapter taken out again (what DoRA's merge norm needs).
  at::Tensor unmerged_weight();
  // weight -> weight with adapter `name` merged in (DoRA: rescaled), or taken out again.
  at::Tensor merged_weight(const std::string& name, const at::Tensor& weight, const at::Tensor& unmerged);
  at::Tensor unmerged_weight_of(const std::string& name, const at::Tensor& weight, bool pop_norm);
  // The per-adapter loop (PEFT's way) for the layers that do not stack their adapters.
  at::Tensor mixed_batch_loop(const at::Tensor& x, const std::vector<std::string>& adapter_names);
};

}  // namespace torchlora::nn
