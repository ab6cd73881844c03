#include <torchlora/serve/adapter_pool.h>

#include <ATen/ATen.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <set>
#include <utility>

#include <torchlora/peft/names.h>

#include "adapter_checks.h"
#include "slot_tensors.h"

namespace torchlora::serve {
namespace {

c10::SourceLocation here() { return {__func__, __FILE__, static_cast<uint32_t>(__LINE__)}; }

bool is_base(const std::string& adapter) { return adapter.empty() || adapter == peft::kBaseAdapterName; }

// One loaded version of an adapter. A name loaded again gets a new version (generation); slots
// remember the generation they hold, so a replaced version is never served to new requests.
struct Version {
  std::string name;
  uint64_t generation = 0;
  std::string folder;  // "" for adapters added from tensors: pinned in the host tier
  int64_t rank = 0;
  bool dora = false;  // served at scale 1 only
  std::shared_ptr<const io::PeftAdapter> host;  // null once evicted from the host tier
  uint64_t host_used = 0;                       // LRU tick of the host tier
};

struct Slot {
  uint64_t generation = 0;  // 0: empty
  std::string name;
  int64_t refcount = 0;
  uint64_t last_used = 0;
  bool dora = false;
};

}  // namespace

struct PoolState {
  std::vector<TargetLayer> layers;
  std::map<std::string, size_t> layer_index;
  PoolOptions options;
  int64_t host_capacity = 0;

  // The slot tensors: allocated once; rows of a slot are written only while its refcount is 0.
  std::vector<SlotStacks> stacks;

  mutable std::mutex mutex;  // guards everything below
  std::map<std::string, std::shared_ptr<Version>> adapters;
  std::vector<Slot> slots;
  uint64_t tick = 0;
  uint64_t next_generation = 1;
  PoolStats stats;

  bool is_current(uint64_t generation, const std::string& name) const {
    const auto it = adapters.find(name);
    return it != adapters.end() && it->second->generation == generation;
  }

  int64_t slot_of(const Version& v) const {
    for (size_t s = 0; s < slots.size(); ++s) {
      if (slots[s].generation == v.generation) return static_cast<int64_t>(s);
    }
    return -1;
  }

  int64_t host_count() const {
    int64_t n = 0;
    for (const auto& [name, v] : adapters) n += v->host != nullptr;
    return n;
  }

  // Keeps the host tier within its capacity by dropping the least recently used adapters that
  // can be read again from their folders. Returns false if only pinned adapters are left.
  bool trim_host_tier() {
    while (host_count() > host_capacity) {
      Version* victim = nullptr;
      for (auto& [name, v] : adapters) {
        if (v->host && !v->folder.empty() && (!victim || v->host_used < victim->host_used)) victim = v.get();
      }
      if (!victim) return false;
      victim->host.reset();
      ++stats.host_evictions;
    }
    return true;
  }

  // Frees a slot whose adapter version is gone, once nothing holds it.
  void free_if_stale(int64_t s) {
    Slot& slot = slots[s];
    if (slot.generation != 0 && slot.refcount == 0 && !is_current(slot.generation, slot.name)) {
      detail::clear_slot(stacks, s);
      slot = Slot{};
    }
  }

  void release(const std::vector<int64_t>& held) {
    std::lock_guard<std::mutex> lock(mutex);
    for (const int64_t s : held) {
      TORCH_INTERNAL_ASSERT(slots[s].refcount > 0, "torchlora: AdapterPool slot ", s, " released twice");
      --slots[s].refcount;
      free_if_stale(s);
    }
  }
};

AdapterNotFound::AdapterNotFound(const std::string& adapter, const std::string& message)
    : c10::Error(here(), message), adapter_(adapter) {}
PoolExhausted::PoolExhausted(const std::string& message) : c10::Error(here(), message) {}
AdapterRejected::AdapterRejected(const std::string& adapter, const std::string& message)
    : c10::Error(here(), message), adapter_(adapter) {}

// ---- BatchLease

BatchLease::BatchLease(BatchLease&& other) noexcept
    : pool_(std::move(other.pool_)), held_(std::move(other.held_)), slots_(std::move(other.slots_)),
      sample_slots_(std::move(other.sample_slots_)), slot_scale_(std::move(other.slot_scale_)),
      uses_dora_(other.uses_dora_) {
  other.pool_.reset();
  other.held_.clear();
}

BatchLease& BatchLease::operator=(BatchLease&& other) noexcept {
  if (this != &other) {
    release();
    pool_ = std::move(other.pool_);
    held_ = std::move(other.held_);
    slots_ = std::move(other.slots_);
    sample_slots_ = std::move(other.sample_slots_);
    slot_scale_ = std::move(other.slot_scale_);
    uses_dora_ = other.uses_dora_;
    other.pool_.reset();
    other.held_.clear();
  }
  return *this;
}

BatchLease::~BatchLease() { release(); }

void BatchLease::release() {
  if (pool_) {
    pool_->release(held_);
    pool_.reset();
    held_.clear();
    // The slots may hold other adapters from now on: a released lease cannot run a batch.
    sample_slots_ = at::Tensor();
    slot_scale_ = at::Tensor();
  }
}

// ---- AdapterPool

AdapterPool::AdapterPool(std::vector<TargetLayer> layers, PoolOptions options) : state_(std::make_shared<PoolState>()) {
  detail::check_pool_layout(layers, options);
  auto& st = *state_;
  st.layers = std::move(layers);
  for (size_t i = 0; i < st.layers.size(); ++i) st.layer_index.emplace(st.layers[i].name, i);
  st.options = options;
  st.host_capacity = options.max_cpu_loras == 0 ? options.max_loras : options.max_cpu_loras;
  st.stacks = detail::make_slot_stacks(st.layers, options);
  st.slots.resize(static_cast<size_t>(options.max_loras));
}

AdapterPool::~AdapterPool() = default;

namespace {

void check_name(const std::string& name) {
  TORCH_CHECK_VALUE(!is_base(name), "torchlora: AdapterPool: '", name.empty() ? std::string() : name,
                    "' cannot name an adapter: \"\" and \"", peft::kBaseAdapterName, "\" mean the base model");
}

io::PeftAdapter read_folder(const std::string& name, const std::string& folder) {
  try {
    return io::load_peft_adapter(folder);
  } catch (const AdapterRejected&) {
    throw;
  } catch (const c10::Error& e) {
    throw AdapterRejected(name, "torchlora: adapter '" + name + "' cannot be read from '" + folder +
                                    "': " + e.what_without_backtrace());
  }
}

// Registers a checked adapter's host copy under `name` (the caller holds no lock).
void register_version(PoolState& st, const std::string& name, const std::string& folder, int64_t rank,
                      std::shared_ptr<const io::PeftAdapter> host) {
  const bool dora = host->config.use_dora;
  std::lock_guard<std::mutex> lock(st.mutex);
  auto v = std::make_shared<Version>();
  v->name = name;
  v->generation = st.next_generation++;
  v->folder = folder;
  v->rank = rank;
  v->dora = dora;
  v->host = std::move(host);
  v->host_used = ++st.tick;
  std::shared_ptr<Version> previous;
  if (auto it = st.adapters.find(name); it != st.adapters.end()) previous = it->second;
  st.adapters[name] = v;
  if (!st.trim_host_tier()) {
    // Only adapters from tensors are left: this one cannot enter the host tier.
    if (previous) {
      st.adapters[name] = previous;
    } else {
      st.adapters.erase(name);
    }
    throw PoolExhausted("torchlora: AdapterPool: the host tier (max_cpu_loras=" + std::to_string(st.host_capacity) +
                        ") is full of adapters added from tensors, which cannot be evicted; unload one to add '" +
                        name + "'");
  }
  if (previous) {
    const int64_t s = st.slot_of(*previous);
    if (s >= 0) st.free_if_stale(s);  // a held slot stays until its last lease lets go
  }
}

}  // namespace

void AdapterPool::load(const std::string& name, const std::string& folder) {
  check_name(name);
  auto& st = *state_;
  // Reading and checking happen outside the lock: batches keep running meanwhile.
  io::PeftAdapter adapter = read_folder(name, folder);
  const int64_t rank = detail::check_adapter(name, adapter, st.layers, st.layer_index, st.options);
  auto host = std::make_shared<const io::PeftAdapter>(detail::host_copy(std::move(adapter), st.options, st.layers, st.layer_index));
  register_version(st, name, folder, rank, std::move(host));
}

void AdapterPool::add(const std::string& name, io::PeftAdapter adapter) {
  check_name(name);
  auto& st = *state_;
  const int64_t rank = detail::check_adapter(name, adapter, st.layers, st.layer_index, st.options);
  auto host = std::make_shared<const io::PeftAdapter>(detail::host_copy(std::move(adapter), st.options, st.layers, st.layer_index));
  register_version(st, name, "", rank, std::move(host));
}

void AdapterPool::compose(const std::string& name, const std::vector<std::pair<std::string, double>>& parts,
                          const peft::WeightedAdapterOptions& options) {
  check_name(name);
  auto& st = *state_;
  TORCH_CHECK_VALUE(!parts.empty(), "torchlora: AdapterPool: composing '", name, "' needs at least one adapter");
  // The parts as loaded: host copies are in the pool's dtype, so parts with a folder are read
  // again (outside the lock) to combine what PEFT would combine.
  std::vector<std::shared_ptr<const io::PeftAdapter>> sources;
  std::vector<std::string> folders;
  {
    std::lock_guard<std::mutex> lock(st.mutex);
    for (const auto& [part, weight] : parts) {
      const auto it = st.adapters.find(part);
      if (it == st.adapters.end()) {
        throw AdapterNotFound(part, "torchlora: AdapterPool: composing '" + name + "': adapter '" + part +
                                        "' is not loaded");
      }
      sources.push_back(it->second->host);
      folders.push_back(it->second->folder);
    }
  }
  std::vector<peft::WeightedAdapterPart> weighted;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (!folders[i].empty()) sources[i] = std::make_shared<const io::PeftAdapter>(read_folder(parts[i].first, folders[i]));
    weighted.push_back({parts[i].first, sources[i].get(), parts[i].second});
  }
  std::vector<std::string> order;
  for (const auto& layer : st.layers) order.push_back(layer.name);
  add(name, peft::combine_adapters(weighted, options, order));
}

bool AdapterPool::unload(const std::string& name) {
  auto& st = *state_;
  std::lock_guard<std::mutex> lock(st.mutex);
  const auto it = st.adapters.find(name);
  if (it == st.adapters.end()) return false;
  const auto version = it->second;
  st.adapters.erase(it);
  const int64_t s = st.slot_of(*version);
  if (s >= 0) st.free_if_stale(s);
  return true;
}

bool AdapterPool::has_adapter(const std::string& name) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->adapters.count(name) > 0;
}

std::vector<std::string> AdapterPool::adapter_names() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  std::vector<std::string> names;
  for (const auto& [name, v] : state_->adapters) names.push_back(name);
  return names;
}

std::vector<AdapterStatus> AdapterPool::status() const {
  const auto& st = *state_;
  std::lock_guard<std::mutex> lock(st.mutex);
  std::vector<AdapterStatus> out;
  for (const auto& [name, v] : st.adapters) {
    AdapterStatus s;
    s.name = name;
    s.rank = v->rank;
    s.folder = v->folder;
    s.slot = st.slot_of(*v);
    s.on_host = v->host != nullptr;
    s.in_use = s.slot >= 0 ? st.slots[s.slot].refcount : 0;
    out.push_back(std::move(s));
  }
  return out;
}

PoolStats AdapterPool::stats() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->stats;
}

namespace {

struct Wanted {
  std::string name;
  double scale = 1.0;
};

// A DoRA adapter's factor magnitude / ||W + s B A|| holds for its own scaling only.
void check_dora_scale(const Version& v, double scale) {
  if (v.dora && scale != 1.0) {
    throw AdapterRejected(v.name, "torchlora: adapter '" + v.name + "' uses DoRA, which the pool serves at scale 1 only "
                                  "(scale " + std::to_string(scale) + " would change its weight norm)");
  }
}

// The batch's distinct adapters in order of first appearance, each with its one scale.
std::vector<Wanted> distinct_adapters(const std::vector<AdapterRequest>& requests) {
  std::vector<Wanted> wanted;
  for (const auto& r : requests) {
    if (is_base(r.adapter)) continue;
    auto it = std::find_if(wanted.begin(), wanted.end(), [&](const Wanted& w) { return w.name == r.adapter; });
    if (it == wanted.end()) {
      wanted.push_back({r.adapter, r.scale});
    } else {
      TORCH_CHECK_VALUE(it->scale == r.scale, "torchlora: AdapterPool: adapter '", r.adapter,
                        "' is requested with two scales (", it->scale, " and ", r.scale,
                        ") in one batch; a batch gives each adapter one scale");
    }
  }
  return wanted;
}

}  // namespace

BatchLease AdapterPool::acquire(const std::vector<AdapterRequest>& requests) {
  auto& st = *state_;
  const auto wanted = distinct_adapters(requests);
  const auto S = st.options.max_loras;
  if (static_cast<int64_t>(wanted.size()) > S) {
    throw PoolExhausted("torchlora: AdapterPool: the batch asks for " + std::to_string(wanted.size()) +
                        " distinct adapters, more than the pool's " + std::to_string(S) + " slots (max_loras)");
  }
  // The tensors of the adapters this batch copies into slots, by generation: host-tier copies,
  // or copies read again from their folders outside the lock.
  std::map<uint64_t, std::shared_ptr<const io::PeftAdapter>> source;
  for (int attempt = 0;; ++attempt) {
    std::vector<int64_t> slot_of_wanted(wanted.size(), -1);
    std::vector<std::pair<std::shared_ptr<Version>, std::string>> to_read;  // (version, folder)
    {
      std::unique_lock<std::mutex> lock(st.mutex);
      std::vector<std::shared_ptr<Version>> versions;
      for (const auto& w : wanted) {
        const auto it = st.adapters.find(w.name);
        if (it == st.adapters.end()) {
          throw AdapterNotFound(w.name, "torchlora: AdapterPool: adapter '" + w.name + "' is not loaded");
        }
        check_dora_scale(*it->second, w.scale);
        versions.push_back(it->second);
      }
      // Which adapters need a slot, and whose tensors must be read from their folders first.
      std::vector<int64_t> hit(wanted.size(), -1);
      int64_t misses = 0;
      std::set<int64_t> hit_slots;
      for (size_t i = 0; i < wanted.size(); ++i) {
        auto& v = *versions[i];
        v.host_used = ++st.tick;  // used now: the host tier evicts others first
        hit[i] = st.slot_of(v);
        if (hit[i] >= 0) {
          hit_slots.insert(hit[i]);
        } else {
          ++misses;
          // Keep the host copy for this batch even if the host tier drops it meanwhile.
          if (!source.count(v.generation) && v.host) source[v.generation] = v.host;
          if (!source.count(v.generation)) to_read.emplace_back(versions[i], v.folder);
        }
      }
      int64_t free_slots = 0;
      for (int64_t s = 0; s < S; ++s) free_slots += st.slots[s].refcount == 0 && !hit_slots.count(s);
      if (misses > free_slots) {
        throw PoolExhausted("torchlora: AdapterPool: the batch needs " + std::to_string(misses) +
                            " more device slots but only " + std::to_string(free_slots) + " of " + std::to_string(S) +
                            " are not held by running batches; retry when batches finish");
      }
      if (to_read.empty()) {
        // All or nothing from here on: nothing below throws before every slot is assigned.
        std::vector<int64_t> held;
        for (size_t i = 0; i < wanted.size(); ++i) {
          if (hit[i] >= 0) {
            slot_of_wanted[i] = hit[i];
            ++st.stats.slot_hits;
          }
        }
        for (size_t i = 0; i < wanted.size(); ++i) {
          if (hit[i] >= 0) continue;
          // Least recently used unheld slot that this batch does not use; empty slots first.
          int64_t victim = -1;
          for (int64_t s = 0; s < S; ++s) {
            const Slot& c = st.slots[s];
            if (c.refcount != 0 || std::find(slot_of_wanted.begin(), slot_of_wanted.end(), s) != slot_of_wanted.end()) {
              continue;
            }
            if (victim < 0) {
              victim = s;
              continue;
            }
            const Slot& v = st.slots[victim];
            const bool c_empty = c.generation == 0, v_empty = v.generation == 0;
            if ((c_empty && !v_empty) || (c_empty == v_empty && c.last_used < v.last_used)) victim = s;
          }
          TORCH_INTERNAL_ASSERT(victim >= 0);
          Slot& slot = st.slots[victim];
          if (slot.generation != 0) ++st.stats.slot_evictions;
          slot = Slot{};
          const Version& v = *versions[i];
          const auto& data = source.at(v.generation);
          try {
            detail::write_slot(st.stacks, st.layers, victim, *data);
          } catch (...) {
            detail::clear_slot(st.stacks, victim);  // half-written: empty, so it serves nothing
            throw;
          }
          slot.generation = v.generation;
          slot.name = v.name;
          slot.dora = v.dora;
          ++st.stats.slot_loads;
          slot_of_wanted[i] = victim;
        }
        if (misses > 0 && st.options.device.type() != c10::kCPU) {
          // The copies ran on this thread's current stream; a batch on another stream may read
          // the slot next (a hit), so they must be complete before the slot is handed out.
          c10::impl::getDeviceGuardImpl(st.options.device.type())->getStream(st.options.device).synchronize();
        }
        for (size_t i = 0; i < wanted.size(); ++i) {
          Slot& slot = st.slots[slot_of_wanted[i]];
          ++slot.refcount;
          slot.last_used = ++st.tick;
          held.push_back(slot_of_wanted[i]);
        }
        BatchLease lease;
        for (const int64_t s : held) lease.uses_dora_ = lease.uses_dora_ || st.slots[s].dora;
        lease.pool_ = state_;
        lease.held_ = std::move(held);
        lease.slots_.reserve(requests.size());
        std::vector<float> scale(static_cast<size_t>(S), 1.0f);
        for (size_t i = 0; i < wanted.size(); ++i) scale[slot_of_wanted[i]] = static_cast<float>(wanted[i].scale);
        for (const auto& r : requests) {
          int64_t s = -1;
          if (!is_base(r.adapter)) {
            for (size_t i = 0; i < wanted.size(); ++i) {
              if (wanted[i].name == r.adapter) s = slot_of_wanted[i];
            }
          }
          lease.slots_.push_back(s);
        }
        lock.unlock();
        const auto device = st.options.device;
        lease.sample_slots_ = at::tensor(lease.slots_, at::TensorOptions().dtype(at::kLong)).to(device);
        lease.slot_scale_ = at::tensor(scale, at::TensorOptions().dtype(at::kFloat)).to(device);
        return lease;
      }
    }
    TORCH_CHECK(attempt < 8, "torchlora: AdapterPool: adapters keep leaving the host tier while a batch reads them");
    for (const auto& [version, folder] : to_read) {
      io::PeftAdapter adapter = read_folder(version->name, folder);
      detail::check_adapter(version->name, adapter, st.layers, st.layer_index, st.options);
      auto host = std::make_shared<const io::PeftAdapter>(detail::host_copy(std::move(adapter), st.options, st.layers, st.layer_index));
      source[version->generation] = host;
      std::lock_guard<std::mutex> lock(st.mutex);
      ++st.stats.host_reloads;
      if (st.is_current(version->generation, version->name) && !version->host) {
        version->host = host;
        version->host_used = ++st.tick;
        st.trim_host_tier();
      }
    }
  }
}

bool AdapterPool::fits(const std::vector<AdapterRequest>& batch, const AdapterRequest& request) const {
  if (!is_base(request.adapter)) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    const auto it = state_->adapters.find(request.adapter);
    if (it != state_->adapters.end()) check_dora_scale(*it->second, request.scale);
  }
  std::set<std::string> distinct;
  for (const auto& r : batch) {
    if (is_base(r.adapter)) continue;
    distinct.insert(r.adapter);
    if (r.adapter == request.adapter && r.scale != request.scale) return false;
  }
  if (!is_base(request.adapter)) distinct.insert(request.adapter);
  return static_cast<int64_t>(distinct.size()) <= state_->options.max_loras;
}

const std::vector<TargetLayer>& AdapterPool::layers() const { return state_->layers; }
const PoolOptions& AdapterPool::options() const { return state_->options; }

const SlotStacks& AdapterPool::stacks(const std::string& layer) const {
  const auto it = state_->layer_index.find(layer);
  TORCH_CHECK(it != state_->layer_index.end(), "torchlora: AdapterPool has no target layer '", layer, "'");
  return state_->stacks[it->second];
}

const std::vector<SlotStacks>& AdapterPool::all_stacks() const { return state_->stacks; }

}  // namespace torchlora::serve
