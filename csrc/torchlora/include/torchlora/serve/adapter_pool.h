// The adapters a server holds, stacked in the slots the multi-adapter operators read
// (torchlora::multi_lora_*): S device slots per LoRA layer, a host tier with LRU eviction, and
// per-slot reference counts so that a slot is never overwritten while a batch uses it.
//
//   registered adapters (name -> folder or tensors, unbounded)
//     host tier   up to max_cpu_loras adapters' tensors in CPU memory, LRU; one evicted from it
//                 is read again from its folder when a request needs it
//     device tier max_loras slots per layer on the pool's device, LRU among unused slots
//
// Thread-safe: load / unload / acquire may run from any thread while batches run.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/peft/weighted_adapter.h>

namespace torchlora::serve {

// One LoRA layer of the served model, as the pool stacks it.
struct TargetLayer {
  std::string name;                     // module path in the base model, as in PEFT's keys
  io::LoraKind kind = io::LoraKind::Linear;
  std::vector<int64_t> weight_shape;    // the base weight: Linear [out, in], Embedding [num, dim],
                                        // Conv2d [out, in / groups, kh, kw]
  int64_t groups = 1;                   // Conv2d only
  // The base weight itself (optional): DoRA adapters need it for their weight norm, computed
  // once when they enter the host tier. Layers without it serve plain LoRA adapters only.
  at::Tensor base_weight;
};

struct PoolOptions {
  int64_t max_loras = 8;       // device slots S (>= 1)
  int64_t max_lora_rank = 16;  // r_max: every slot is zero-padded to it
  int64_t max_cpu_loras = 0;   // host tier capacity (0: max_loras); must be >= max_loras
  bool lora_bias = false;      // stack lora_bias (adapters with lora_bias are rejected without it)
  at::ScalarType dtype = at::kFloat;
  c10::Device device = c10::kCPU;
};

// One layer's slot tensors on the pool's device (owned by the pool; a slot's rows change only
// while no lease holds it):
//   Linear     lora_A [S, r_max, in]            lora_B [S, out, r_max]
//   Embedding  lora_A [S, r_max, num]           lora_B [S, dim, r_max]
//   Conv2d     lora_A [S, r_max, in, kh, kw]    lora_B [S, out, r_max / groups, 1, 1]
//   lora_bias [S, out] (only with PoolOptions::lora_bias)   scale [S] float32 (0 for an empty slot)
//   dora_factor [S, out] float32 (float64 for a float64 pool): a DoRA adapter's magnitude /
//               ||W + s B A||, 1 for plain-LoRA and empty slots (torchlora::multi_dora_scale)
struct SlotStacks {
  at::Tensor lora_A, lora_B, lora_bias, scale, dora_factor;
};

// One request of a batch: its adapter ("" or "__base__": the base model alone) and its scale,
// which multiplies the adapter's own scaling (PEFT's set_scale). DoRA adapters are served at
// scale 1 only (another scale changes their weight norm).
struct AdapterRequest {
  std::string adapter;
  double scale = 1.0;
};

// An adapter the pool does not hold (HTTP 404).
class TORCHLORA_API AdapterNotFound : public c10::Error {
 public:
  AdapterNotFound(const std::string& adapter, const std::string& message);
  const std::string& adapter() const { return adapter_; }
 private:
  std::string adapter_;
};
// Every slot is held by running batches, or the host tier is full of adapters that cannot be
// evicted (HTTP 503). Raised at once: the pool never waits.
class TORCHLORA_API PoolExhausted : public c10::Error {
 public:
  explicit PoolExhausted(const std::string& message);
};
// An adapter that does not fit the model or the pool: wrong target modules, shapes, rank above
// max_lora_rank, unsupported features, unreadable files (HTTP 400 / 422). `adapter()` names it.
class TORCHLORA_API AdapterRejected : public c10::Error {
 public:
  AdapterRejected(const std::string& adapter, const std::string& message);
  const std::string& adapter() const { return adapter_; }
 private:
  std::string adapter_;
};

struct PoolStats {
  int64_t slot_hits = 0;         // acquired adapters already in a device slot
  int64_t slot_loads = 0;        // adapters copied into a device slot
  int64_t slot_evictions = 0;    // slots given to another adapter
  int64_t host_evictions = 0;    // adapters dropped from the host tier
  int64_t host_reloads = 0;      // adapters read again from their folder
};

struct AdapterStatus {
  std::string name;
  int64_t rank = 0;              // the adapter's largest rank
  std::string folder;            // "" for adapters added from tensors
  int64_t slot = -1;             // device slot, -1 when not in one
  bool on_host = false;          // in the host tier
  int64_t in_use = 0;            // leases holding its slot
};

class AdapterPool;

// The slots of one batch, held until the lease is destroyed (move-only). Row i of the batch
// uses slot sample_slots[i] (-1: none) with the per-slot request scale slot_scale; a layer's
// effective scale is stacks(layer).scale * slot_scale.
class TORCHLORA_API BatchLease {
 public:
  BatchLease(BatchLease&& other) noexcept;
  BatchLease& operator=(BatchLease&& other) noexcept;
  BatchLease(const BatchLease&) = delete;
  BatchLease& operator=(const BatchLease&) = delete;
  ~BatchLease();

  const at::Tensor& sample_slots() const { return sample_slots_; }  // [n] int64 on the pool's device
  const at::Tensor& slot_scale() const { return slot_scale_; }      // [S] float32 on the pool's device
  const std::vector<int64_t>& slots() const { return slots_; }       // the same slots on the host
  bool uses_dora() const { return uses_dora_; }  // some slot of the batch holds a DoRA adapter
  void release();  // gives the slots back now (idempotent); sample_slots / slot_scale become undefined

 private:
  friend class AdapterPool;
  BatchLease() = default;
  std::shared_ptr<struct PoolState> pool_;
  std::vector<int64_t> held_;  // distinct slots whose refcount this lease holds
  std::vector<int64_t> slots_;
  at::Tensor sample_slots_, slot_scale_;
  bool uses_dora_ = false;
};

class TORCHLORA_API AdapterPool {
 public:
  // `layers`: the model's LoRA layers (every adapter is checked against them).
  AdapterPool(std::vector<TargetLayer> layers, PoolOptions options);
  ~AdapterPool();

  // Reads a PEFT folder (io::load_peft_adapter), checks it against the model and the pool
  // (AdapterRejected naming what is wrong), and registers it under `name`, replacing an adapter
  // of that name (batches still running keep the old one). Enters the host tier.
  void load(const std::string& name, const std::string& folder);
  // The same for an adapter in memory; it has no folder, so it is never evicted from the host
  // tier (PoolExhausted when the host tier holds only such adapters).
  void add(const std::string& name, io::PeftAdapter adapter);
  // Registers `name` as the weighted combination of loaded adapters ((adapter, weight), in
  // order), PEFT's add_weighted_adapter with `options`, computed now by the core's rule
  // (peft::combine_adapters, modules in the order of layers(), so dare_* draws match PEFT under the
  // same seed) from the parts' files (or tensors). A snapshot: unloading or replacing a part later
  // leaves it unchanged. It has no folder, so it stays in the host tier like add(). Raises
  // AdapterNotFound for a part not loaded, AdapterRejected when the result does not fit the pool
  // (e.g. cat above max_lora_rank), ValueError / TypeError for options PEFT rejects.
  void compose(const std::string& name, const std::vector<std::pair<std::string, double>>& parts,
               const peft::WeightedAdapterOptions& options = {});
  // Forgets `name`; returns whether it was there. Running batches finish with its slot, which
  // is freed when the last lease lets go; later requests get AdapterNotFound.
  bool unload(const std::string& name);

  bool has_adapter(const std::string& name) const;
  std::vector<std::string> adapter_names() const;
  std::vector<AdapterStatus> status() const;
  PoolStats stats() const;

  // Slots for one batch: every distinct adapter is brought into a device slot (evicting the
  // least recently used unheld slot, reading the host tier or the folder) and held. All or
  // nothing: raises AdapterNotFound / AdapterRejected (naming the adapter) / PoolExhausted
  // (more distinct adapters than free slots), or c10::ValueError when one adapter is asked
  // with two different scales (batches give each adapter one scale).
  BatchLease acquire(const std::vector<AdapterRequest>& requests);

  // Whether `request` can join a batch already holding `batch` without exceeding max_loras
  // distinct adapters or giving one adapter two scales (for batching queues). AdapterRejected
  // for a DoRA adapter requested at a scale other than 1 (acquire raises it too).
  bool fits(const std::vector<AdapterRequest>& batch, const AdapterRequest& request) const;

  const std::vector<TargetLayer>& layers() const;
  const PoolOptions& options() const;
  // The slot tensors of layer `name` (c10::Error if the model has no such layer).
  const SlotStacks& stacks(const std::string& layer) const;
  // All layers' stacks in layers() order.
  const std::vector<SlotStacks>& all_stacks() const;

 private:
  std::shared_ptr<struct PoolState> state_;
};

}  // namespace torchlora::serve
