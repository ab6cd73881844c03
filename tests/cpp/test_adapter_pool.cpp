// torchlora::serve::AdapterPool with no Python in the process: slot contents, LRU, refcounts,
// the host tier, replacing and unloading while batches run, per-request scales, rejections,
// threads, and C++ module trees served through PoolBinding.
#include <torch/torch.h>

#include <gtest/gtest.h>

#include "tensor_expect.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include <torchlora/apply/inject.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/nn/lora_conv2d.h>
#include <torchlora/nn/lora_embedding.h>
#include <torchlora/nn/lora_linear.h>
#include <torchlora/serve/adapter_pool.h>
#include <torchlora/serve/module_slots.h>

namespace {

namespace io = torchlora::io;
namespace apply = torchlora::apply;
namespace tnn = torchlora::nn;
namespace serve = torchlora::serve;
namespace fs = std::filesystem;


template <class E = c10::Error>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what_without_backtrace();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A temporary folder removed at the end of the test.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("torchlora_pool_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string sub(const std::string& name) const { return (path / name).string(); }
};

// The served model of most tests: two Linear layers fc1 [8, 4], fc2 [3, 8].
std::vector<serve::TargetLayer> mlp_layers() {
  return {{"fc1", io::LoraKind::Linear, {8, 4}, 1}, {"fc2", io::LoraKind::Linear, {3, 8}, 1}};
}

serve::PoolOptions options(int64_t max_loras, int64_t max_lora_rank, int64_t max_cpu_loras = 0) {
  serve::PoolOptions o;
  o.max_loras = max_loras;
  o.max_lora_rank = max_lora_rank;
  o.max_cpu_loras = max_cpu_loras;
  return o;
}

// A random adapter of rank r on fc1 and fc2 (or only `modules`), lora_alpha = 2r + 1.
io::PeftAdapter mlp_adapter(int64_t r, uint64_t seed, std::vector<std::string> modules = {"fc1", "fc2"}) {
  torch::manual_seed(seed);
  io::LoraConfig config;
  config.r = r;
  config.lora_alpha = 2.0 * r + 1.0;
  config.target_modules = io::ModuleSelector::from_names(modules);
  const std::map<std::string, std::pair<int64_t, int64_t>> dims{{"fc1", {8, 4}}, {"fc2", {3, 8}}};
  std::map<std::string, at::Tensor> state;
  for (const auto& m : modules) {
    const auto [out, in] = dims.at(m);
    state["base_model.model." + m + ".lora_A.weight"] = torch::randn({r, in});
    state["base_model.model." + m + ".lora_B.weight"] = torch::randn({out, r});
  }
  return io::adapter_from_state_dict(config, state, "memory");
}

// Slot `slot` of layer `name` holds `w` (rank-padded with zeros) and its scaling times `scale`.
void expect_slot(const serve::AdapterPool& pool, const std::string& layer, int64_t slot, const io::LoraModuleWeights& w) {
  const auto& s = pool.stacks(layer);
  const int64_t r = w.rank();
  const auto A = s.lora_A[slot], B = s.lora_B[slot];
  expect_close(A.narrow(0, 0, r), w.lora_A);
  expect_close(B.narrow(1, 0, r), w.lora_B);
  EXPECT_EQ(A.narrow(0, r, A.size(0) - r).abs().sum().item<double>(), 0.0);
  EXPECT_EQ(B.narrow(1, r, B.size(1) - r).abs().sum().item<double>(), 0.0);
  EXPECT_FLOAT_EQ(s.scale[slot].item<float>(), static_cast<float>(w.scaling));
}

serve::AdapterStatus status_of(const serve::AdapterPool& pool, const std::string& name) {
  for (const auto& s : pool.status()) {
    if (s.name == name) return s;
  }
  ADD_FAILURE() << "no adapter " << name;
  return {};
}

// ------------------------------------------------------------------------- slot contents
TEST(AdapterPool, SlotsHoldPaddedFactorsAndScaling) {
  serve::AdapterPool pool(mlp_layers(), options(2, 4));
  const auto a = mlp_adapter(2, 1);
  const auto b = mlp_adapter(3, 2, {"fc1"});  // does not adapt fc2
  pool.add("a", a);
  pool.add("b", b);
  auto lease = pool.acquire({{"a", 1.0}, {"b", 1.0}, {"", 1.0}, {"__base__", 1.0}, {"a", 1.0}});
  const auto& slots = lease.slots();
  ASSERT_EQ(slots.size(), 5u);
  EXPECT_EQ(slots[2], -1);
  EXPECT_EQ(slots[3], -1);
  EXPECT_EQ(slots[0], slots[4]);
  EXPECT_NE(slots[0], slots[1]);
  EXPECT_EQ(lease.sample_slots().scalar_type(), at::kLong);
  for (size_t k = 0; k < slots.size(); ++k) EXPECT_EQ(lease.sample_slots()[k].item<int64_t>(), slots[k]);
  expect_slot(pool, "fc1", slots[0], a.modules.at("fc1"));
  expect_slot(pool, "fc2", slots[0], a.modules.at("fc2"));
  expect_slot(pool, "fc1", slots[1], b.modules.at("fc1"));
  const auto& fc2 = pool.stacks("fc2");
  EXPECT_EQ(fc2.scale[slots[1]].item<float>(), 0.0f);
  EXPECT_EQ(fc2.lora_A[slots[1]].abs().sum().item<double>(), 0.0);
  // the stacks are shaped as the multi-adapter operators read them
  EXPECT_EQ(pool.stacks("fc1").lora_A.sizes(), (std::vector<int64_t>{2, 4, 4}));
  EXPECT_EQ(pool.stacks("fc1").lora_B.sizes(), (std::vector<int64_t>{2, 8, 4}));
  EXPECT_FALSE(pool.stacks("fc1").lora_bias.defined());
  EXPECT_TRUE(contains(error_of([&] { pool.stacks("fc3"); }), "no target layer 'fc3'"));
  EXPECT_EQ(pool.all_stacks().size(), 2u);
}

TEST(AdapterPool, GroupedConvAndEmbeddingSlots) {
  std::vector<serve::TargetLayer> layers{{"emb", io::LoraKind::Embedding, {10, 6}, 1},
                                         {"conv", io::LoraKind::Conv2d, {4, 3, 3, 3}, 2}};
  serve::AdapterPool pool(layers, options(1, 4));
  torch::manual_seed(0);
  io::LoraConfig config;
  config.r = 2;
  config.lora_alpha = 3;
  config.target_modules = io::ModuleSelector::from_names({"emb", "conv"});
  const std::map<std::string, at::Tensor> state{
      {"base_model.model.emb.lora_embedding_A", torch::randn({2, 10})},
      {"base_model.model.emb.lora_embedding_B", torch::randn({6, 2})},
      {"base_model.model.conv.lora_A.weight", torch::randn({2, 6, 3, 3})},
      {"base_model.model.conv.lora_B.weight", torch::randn({4, 1, 1, 1})},
  };
  const auto adapter = io::adapter_from_state_dict(config, state, "memory");
  pool.add("a", adapter);
  auto lease = pool.acquire({{"a", 1.0}});
  expect_slot(pool, "emb", 0, adapter.modules.at("emb"));
  // Conv2d with groups: lora_A's rank dimension is two blocks, each padded from 1 to 2.
  const auto& conv = pool.stacks("conv");
  EXPECT_EQ(conv.lora_A.sizes(), (std::vector<int64_t>{1, 4, 6, 3, 3}));
  EXPECT_EQ(conv.lora_B.sizes(), (std::vector<int64_t>{1, 4, 2, 1, 1}));
  const auto& A = adapter.modules.at("conv").lora_A;
  expect_close(conv.lora_A[0][0], A[0]);
  expect_close(conv.lora_A[0][2], A[1]);
  EXPECT_EQ(conv.lora_A[0][1].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(conv.lora_A[0][3].abs().sum().item<double>(), 0.0);
  expect_close(conv.lora_B[0].narrow(1, 0, 1), adapter.modules.at("conv").lora_B);
  // The one stacking rule of the C++ modules pads the same way.
  const auto& w = adapter.modules.at("conv");
  const auto wide = torch::zeros({4, 6, 3, 3});
  const auto ref = tnn::stack_adapters({"a", "w"}, {{w.lora_A, w.lora_B, {}}, {wide, torch::zeros({4, 2, 1, 1}), {}}},
                                       {1.0, 1.0}, {0.0, 0.0}, 0, 1, 2);
  expect_close(conv.lora_A[0], ref.lora_A[0]);
  expect_close(conv.lora_B[0], ref.lora_B[0]);
}

// ------------------------------------------------------------------------- LRU and refcounts
TEST(AdapterPool, LeastRecentlyUsedUnheldSlotIsEvicted) {
  serve::AdapterPool pool(mlp_layers(), options(2, 4, 3));
  for (int i = 0; i < 3; ++i) pool.add(std::string(1, static_cast<char>('a' + i)), mlp_adapter(2, 10 + i));
  pool.acquire({{"a", 1.0}});
  pool.acquire({{"b", 1.0}});
  pool.acquire({{"a", 1.0}});  // hit; b is now the least recently used
  auto s = pool.stats();
  EXPECT_EQ(s.slot_loads, 2);
  EXPECT_EQ(s.slot_hits, 1);
  EXPECT_EQ(s.slot_evictions, 0);
  const int64_t slot_b = status_of(pool, "b").slot;
  auto lease = pool.acquire({{"c", 1.0}});
  EXPECT_EQ(lease.slots()[0], slot_b);
  EXPECT_EQ(status_of(pool, "b").slot, -1);
  EXPECT_GE(status_of(pool, "a").slot, 0);
  EXPECT_EQ(status_of(pool, "c").in_use, 1);
  s = pool.stats();
  EXPECT_EQ(s.slot_evictions, 1);
  EXPECT_EQ(s.slot_loads, 3);
  expect_slot(pool, "fc1", slot_b, mlp_adapter(2, 12).modules.at("fc1"));
}

TEST(AdapterPool, HeldSlotsAreNeverOverwrittenAndAFullPoolAnswersAtOnce) {
  serve::AdapterPool pool(mlp_layers(), options(2, 4, 3));
  for (int i = 0; i < 3; ++i) pool.add(std::string(1, static_cast<char>('a' + i)), mlp_adapter(2, 20 + i));
  auto held = pool.acquire({{"a", 1.0}, {"b", 1.0}});
  const auto before = pool.stacks("fc1").lora_A.clone();
  const auto start = std::chrono::steady_clock::now();
  const auto msg = error_of<serve::PoolExhausted>([&] { pool.acquire({{"c", 1.0}}); });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));
  EXPECT_TRUE(contains(msg, "not held by running batches")) << msg;
  EXPECT_TRUE(at::equal(pool.stacks("fc1").lora_A, before));
  // a held adapter is still a hit, and a batch of more distinct adapters than slots is refused
  auto again = pool.acquire({{"a", 1.0}});
  EXPECT_EQ(status_of(pool, "a").in_use, 2);
  EXPECT_TRUE(contains(error_of<serve::PoolExhausted>([&] { pool.acquire({{"a", 1}, {"b", 1}, {"c", 1}}); }),
                       "more than the pool's 2 slots"));
  // all or nothing: the failed acquire held nothing
  EXPECT_EQ(status_of(pool, "b").in_use, 1);
  held.release();
  held.release();  // idempotent
  EXPECT_EQ(status_of(pool, "a").in_use, 1);
  auto c = pool.acquire({{"c", 1.0}});
  EXPECT_EQ(c.slots()[0], status_of(pool, "c").slot);
  EXPECT_EQ(status_of(pool, "a").slot, again.slots()[0]);  // a stayed (held), b was evicted
  // moving a lease moves the hold
  serve::BatchLease moved = std::move(c);
  EXPECT_EQ(status_of(pool, "c").in_use, 1);
  moved.release();
  EXPECT_EQ(status_of(pool, "c").in_use, 0);
}

// ------------------------------------------------------------------------- host tier
TEST(AdapterPool, HostTierEvictsAndReadsFoldersAgain) {
  TempDir dir("host");
  std::vector<io::PeftAdapter> adapters;
  for (int i = 0; i < 3; ++i) {
    adapters.push_back(mlp_adapter(1 + i, 30 + i));
    io::save_peft_adapter(dir.sub("a" + std::to_string(i)), adapters.back());
  }
  serve::AdapterPool pool(mlp_layers(), options(1, 4, 2));
  for (int i = 0; i < 3; ++i) pool.load("a" + std::to_string(i), dir.sub("a" + std::to_string(i)));
  EXPECT_EQ(pool.stats().host_evictions, 1);
  EXPECT_FALSE(status_of(pool, "a0").on_host);  // least recently loaded
  EXPECT_TRUE(status_of(pool, "a2").on_host);
  EXPECT_EQ(status_of(pool, "a0").folder, dir.sub("a0"));
  EXPECT_EQ(status_of(pool, "a2").rank, 3);
  {
    auto lease = pool.acquire({{"a0", 1.0}});
    expect_slot(pool, "fc1", 0, adapters[0].modules.at("fc1"));
    expect_slot(pool, "fc2", 0, adapters[0].modules.at("fc2"));
  }
  auto s = pool.stats();
  EXPECT_EQ(s.host_reloads, 1);
  EXPECT_EQ(s.host_evictions, 2);  // a0 came back, another left
  EXPECT_TRUE(status_of(pool, "a0").on_host);
  // Evicted from both tiers with its folder gone: the request names the adapter.
  pool.acquire({{"a1", 1.0}});
  pool.acquire({{"a2", 1.0}});
  ASSERT_FALSE(status_of(pool, "a0").on_host);
  fs::remove_all(dir.sub("a0"));
  const auto msg = error_of<serve::AdapterRejected>([&] { pool.acquire({{"a0", 1.0}}); });
  EXPECT_TRUE(contains(msg, "adapter 'a0' cannot be read")) << msg;
  EXPECT_EQ(status_of(pool, "a2").in_use, 0);  // nothing held by the failed acquire
}

TEST(AdapterPool, AdaptersFromTensorsArePinnedInTheHostTier) {
  serve::AdapterPool pool(mlp_layers(), options(1, 4, 1));
  pool.add("x", mlp_adapter(2, 40));
  const auto msg = error_of<serve::PoolExhausted>([&] { pool.add("y", mlp_adapter(2, 41)); });
  EXPECT_TRUE(contains(msg, "cannot be evicted")) << msg;
  EXPECT_FALSE(pool.has_adapter("y"));
  EXPECT_TRUE(status_of(pool, "x").on_host);
  EXPECT_TRUE(pool.unload("x"));
  pool.add("y", mlp_adapter(2, 41));
  EXPECT_EQ(pool.adapter_names(), std::vector<std::string>{"y"});
}

// ------------------------------------------------------------------------- replace / unload
TEST(AdapterPool, ReplacedOrUnloadedAdapterStaysInHeldSlotsUntilReleased) {
  serve::AdapterPool pool(mlp_layers(), options(2, 4));
  const auto v1 = mlp_adapter(2, 50), v2 = mlp_adapter(3, 51);
  pool.add("a", v1);
  auto old_lease = pool.acquire({{"a", 1.0}});
  const int64_t old_slot = old_lease.slots()[0];
  pool.add("a", v2);  // replaced while a batch uses it
  expect_slot(pool, "fc1", old_slot, v1.modules.at("fc1"));
  auto new_lease = pool.acquire({{"a", 1.0}});
  const int64_t new_slot = new_lease.slots()[0];
  EXPECT_NE(new_slot, old_slot);
  expect_slot(pool, "fc1", new_slot, v2.modules.at("fc1"));
  expect_slot(pool, "fc1", old_slot, v1.modules.at("fc1"));
  old_lease.release();
  EXPECT_EQ(pool.stacks("fc1").scale[old_slot].item<float>(), 0.0f);  // freed with its last lease
  // unload while held: later requests fail, the running batch keeps its slot
  EXPECT_TRUE(pool.unload("a"));
  EXPECT_FALSE(pool.unload("a"));
  EXPECT_FALSE(pool.has_adapter("a"));
  const auto msg = error_of<serve::AdapterNotFound>([&] { pool.acquire({{"a", 1.0}}); });
  EXPECT_TRUE(contains(msg, "'a' is not loaded")) << msg;
  expect_slot(pool, "fc1", new_slot, v2.modules.at("fc1"));
  new_lease.release();
  EXPECT_EQ(pool.stacks("fc1").scale[new_slot].item<float>(), 0.0f);
  // the freed slots are empty and taken before any LRU eviction
  pool.add("b", v1);
  pool.acquire({{"b", 1.0}});
  EXPECT_EQ(pool.stats().slot_evictions, 0);
}

// ------------------------------------------------------------------------- per-request scale
TEST(AdapterPool, PerRequestScaleAndFits) {
  serve::AdapterPool pool(mlp_layers(), options(2, 4));
  pool.add("a", mlp_adapter(2, 60));
  pool.add("b", mlp_adapter(2, 61));
  auto lease = pool.acquire({{"a", 0.5}, {"b", 1.0}, {"", 3.0}, {"a", 0.5}});
  const auto& s = lease.slots();
  EXPECT_EQ(lease.slot_scale().scalar_type(), at::kFloat);
  EXPECT_FLOAT_EQ(lease.slot_scale()[s[0]].item<float>(), 0.5f);
  EXPECT_FLOAT_EQ(lease.slot_scale()[s[1]].item<float>(), 1.0f);
  const auto msg = error_of<c10::ValueError>([&] { pool.acquire({{"a", 0.5}, {"a", 2.0}}); });
  EXPECT_TRUE(contains(msg, "two scales")) << msg;
  EXPECT_EQ(status_of(pool, "a").in_use, 1);
  EXPECT_TRUE(pool.fits({{"a", 0.5}}, {"a", 0.5}));
  EXPECT_FALSE(pool.fits({{"a", 0.5}}, {"a", 1.0}));
  EXPECT_TRUE(pool.fits({{"a", 1.0}}, {"b", 1.0}));
  EXPECT_FALSE(pool.fits({{"a", 1.0}, {"b", 1.0}}, {"c", 1.0}));
  EXPECT_TRUE(pool.fits({{"a", 1.0}, {"b", 1.0}}, {"", 1.0}));
}

// ------------------------------------------------------------------------- rejections
TEST(AdapterPool, EveryRejectionSaysWhatIsWrong) {
  serve::PoolOptions o = options(2, 4);
  serve::AdapterPool pool(mlp_layers(), o);
  auto rejected = [&](io::PeftAdapter adapter) {
    const auto msg = error_of<serve::AdapterRejected>([&] { pool.add("bad", std::move(adapter)); });
    EXPECT_FALSE(pool.has_adapter("bad"));
    return msg;
  };
  auto good = mlp_adapter(2, 70);
  {
    auto a = good;
    a.modules["fc3"] = a.modules.at("fc1");
    const auto msg = rejected(a);
    EXPECT_TRUE(contains(msg, "module 'fc3', which is not a LoRA target layer") && contains(msg, "'fc1', 'fc2'")) << msg;
  }
  {
    auto a = good;
    a.modules.at("fc1").kind = io::LoraKind::Embedding;
    EXPECT_TRUE(contains(rejected(a), "embedding factors for module 'fc1', which is a linear layer"));
  }
  {
    auto a = good;
    a.modules.at("fc2").lora_A = torch::randn({2, 5});
    const auto msg = rejected(a);
    EXPECT_TRUE(contains(msg, "lora_A [2, 5]") && contains(msg, "needs lora_A [2, 8]")) << msg;
  }
  {
    const auto msg = rejected(mlp_adapter(5, 71));
    EXPECT_TRUE(contains(msg, "rank 5") && contains(msg, "max_lora_rank 4")) << msg;
  }
  {
    auto a = good;
    a.modules.at("fc1").lora_bias = torch::randn({8});
    EXPECT_TRUE(contains(rejected(a), "without lora_bias"));
  }
  {
    auto a = good;
    a.other_tensors["classifier.weight"] = torch::randn({2, 2});
    EXPECT_TRUE(contains(rejected(a), "'classifier.weight', from modules_to_save"));
  }
  {
    auto a = good;
    a.config.use_dora = true;
    EXPECT_TRUE(contains(rejected(a), "DoRA"));
  }
  {
    auto a = good;
    a.config.init_lora_weights = "pissa";
    const auto msg = rejected(a);
    EXPECT_TRUE(contains(msg, "convert it") && contains(msg, "path_initial_model_for_weight_conversion")) << msg;
  }
  {
    io::PeftAdapter a;
    a.config = good.config;
    EXPECT_TRUE(contains(rejected(a), "adapts no module"));
  }
  EXPECT_TRUE(contains(error_of<serve::AdapterRejected>([&] { pool.load("missing", "/nonexistent/folder"); }),
                       "adapter 'missing' cannot be read from '/nonexistent/folder'"));
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { pool.add("__base__", good); }), "base model"));
  // the pool's own options
  EXPECT_TRUE(contains(error_of([&] { serve::AdapterPool(mlp_layers(), options(0, 4)); }), "max_loras must be >= 1"));
  EXPECT_TRUE(contains(error_of([&] { serve::AdapterPool(mlp_layers(), options(4, 4, 2)); }), "max_cpu_loras (2)"));
  EXPECT_TRUE(contains(error_of([&] {
                         serve::AdapterPool({{"c", io::LoraKind::Conv2d, {4, 3, 3, 3}, 2}}, options(1, 3));
                       }),
                       "multiple of groups"));
  EXPECT_TRUE(contains(error_of([&] { serve::AdapterPool({{"x", io::LoraKind::Linear, {4}, 1}}, options(1, 3)); }),
                       "2-D weight shape"));
  // with lora_bias stacked, adapters with and without it are served
  o.lora_bias = true;
  serve::AdapterPool with_bias(mlp_layers(), o);
  auto a = good;
  a.modules.at("fc1").lora_bias = torch::randn({8});
  with_bias.add("a", a);
  with_bias.add("b", good);
  auto lease = with_bias.acquire({{"a", 1.0}, {"b", 1.0}});
  expect_close(with_bias.stacks("fc1").lora_bias[lease.slots()[0]], a.modules.at("fc1").lora_bias);
  EXPECT_EQ(with_bias.stacks("fc1").lora_bias[lease.slots()[1]].abs().sum().item<double>(), 0.0);
}

// ------------------------------------------------------------------------- threads
// Both layers are LoRA layers without adapters of their own: the base MLP unless bound to a pool.
struct MlpNetImpl : torch::nn::Module {
  MlpNetImpl() {
    fc1 = register_module("fc1", tnn::LoraLinear(torch::nn::Linear(4, 8)));
    fc2 = register_module("fc2", tnn::LoraLinear(torch::nn::Linear(8, 3)));
  }
  at::Tensor forward(const at::Tensor& x) { return fc2->forward(fc1->forward(x).relu()); }
  tnn::LoraLinear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(MlpNet);

// The MLP with the adapter merged into its weights (nullptr: the base MLP).
at::Tensor merged_forward(MlpNet& net, const at::Tensor& x, const io::PeftAdapter* adapter) {
  auto w1 = net->fc1->base_layer->weight, w2 = net->fc2->base_layer->weight;
  if (adapter) {
    w1 = w1 + io::delta_weight(adapter->modules.at("fc1"));
    w2 = w2 + io::delta_weight(adapter->modules.at("fc2"));
  }
  namespace F = torch::nn::functional;
  return F::linear(F::linear(x, w1, net->fc1->base_layer->bias).relu(), w2, net->fc2->base_layer->bias);
}

TEST(AdapterPool, ThreadsLoadUnloadAndAcquireWithoutDeadlock) {
  TempDir dir("stress");
  constexpr int kAdapters = 6, kAcquirers = 4;
  std::vector<io::PeftAdapter> adapters;
  for (int i = 0; i < kAdapters; ++i) {
    adapters.push_back(mlp_adapter(1 + i % 4, 80 + i));
    io::save_peft_adapter(dir.sub("a" + std::to_string(i)), adapters.back());
  }
  std::vector<MlpNet> nets;  // one module tree per serving thread (a binding changes its layers)
  for (int t = 0; t < kAcquirers; ++t) {
    torch::manual_seed(7);
    nets.emplace_back();
  }
  serve::AdapterPool pool(serve::target_layers(*nets[0]), options(3, 4, 3));
  for (int i = 0; i < kAdapters; ++i) pool.load("a" + std::to_string(i), dir.sub("a" + std::to_string(i)));
  std::atomic<bool> stop{false};
  std::atomic<int64_t> batches{0}, exhausted{0}, not_found{0}, failures{0};
  std::mutex first_failure_mutex;
  std::string first_failure;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(first_failure_mutex);
    if (failures++ == 0) first_failure = what;
  };
  std::vector<std::thread> threads;
  // loaders read the same folders again (the content stays the same, versions change)
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      while (!stop) {
        const int i = static_cast<int>(rng() % kAdapters);
        try {
          pool.load("a" + std::to_string(i), dir.sub("a" + std::to_string(i)));
        } catch (const std::exception& e) {
          fail(std::string("load: ") + e.what());
        }
      }
    });
  }
  // one thread unloads and loads a5 again
  threads.emplace_back([&] {
    while (!stop) {
      pool.unload("a5");
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      pool.load("a5", dir.sub("a5"));
    }
  });
  for (int t = 0; t < kAcquirers; ++t) {
    threads.emplace_back([&, t] {
      torch::NoGradGuard no_grad;  // grad mode is per thread
      std::mt19937 rng(100 + t);
      auto& net = nets[t];
      while (!stop) {
        std::vector<serve::AdapterRequest> batch;
        const int n = 1 + static_cast<int>(rng() % 4);
        for (int k = 0; k < n; ++k) {
          const int i = static_cast<int>(rng() % (kAdapters + 1));
          batch.push_back({i == kAdapters ? "" : "a" + std::to_string(i), 1.0});
        }
        try {
          auto lease = pool.acquire(batch);
          const auto x = torch::randn({n, 4});
          at::Tensor out;
          {
            serve::PoolBinding binding(*net, pool, lease);
            out = net->forward(x);
          }
          // while held, every row is its adapter's (or the base model's) output
          for (int k = 0; k < n; ++k) {
            const auto* adapter =
                batch[k].adapter.empty() ? nullptr : &adapters[std::stoi(batch[k].adapter.substr(1))];
            if ((lease.slots()[k] == -1) != (adapter == nullptr) ||
                // atol: the outputs reach ~30, and a row near 0 keeps the rounding of its large terms
                !at::allclose(out[k], merged_forward(net, x.narrow(0, k, 1), adapter)[0], 1e-4, 1e-3)) {
              fail("row " + std::to_string(k) + " of a batch of " + std::to_string(n) + " (adapter '" +
                   batch[k].adapter + "', slot " + std::to_string(lease.slots()[k]) + ") differs");
            }
          }
          ++batches;
        } catch (const serve::PoolExhausted&) {
          ++exhausted;
        } catch (const serve::AdapterNotFound& e) {
          if (e.adapter() != "a5") fail(e.what_without_backtrace());
          ++not_found;
        } catch (const std::exception& e) {
          fail(std::string("acquire / forward: ") + e.what());
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::seconds(2));
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0) << "first: " << first_failure;
  EXPECT_GT(batches.load(), 100);
  for (const auto& s : pool.status()) EXPECT_EQ(s.in_use, 0) << s.name;
  const auto stats = pool.stats();
  EXPECT_GT(stats.host_evictions + stats.slot_evictions, 0);
}

// ------------------------------------------------------------------------- C++ module trees
struct ServedNetImpl : torch::nn::Module {
  ServedNetImpl() {
    register_module("fc1", torch::nn::Linear(4, 8));  // plain: replaced by injection
    fc2 = register_module("fc2", tnn::LoraLinear(torch::nn::Linear(8, 3)));
  }
  at::Tensor forward(const at::Tensor& x) { return fc2->forward(apply::forward_child(*this, "fc1", x).relu()); }
  tnn::LoraLinear fc2{nullptr};
};
TORCH_MODULE(ServedNet);

// The adapter scaled by s (PEFT's set_scale: scaling * s), as another adapter of the same rank.
io::PeftAdapter scaled(io::PeftAdapter a, double s) {
  for (auto& [path, w] : a.modules) w.lora_B = w.lora_B * s;
  return a;
}

TEST(PoolBinding, ModuleTreeServesEachRowAsItsAdapterAlone) {
  torch::manual_seed(3);
  ServedNet net;
  net->eval();
  torch::NoGradGuard no_grad;
  const std::vector<std::string> names{"a", "b", "c"};
  std::map<std::string, io::PeftAdapter> adapters{
      {"a", mlp_adapter(1, 90)}, {"b", mlp_adapter(3, 91)}, {"c", mlp_adapter(4, 92, {"fc2"})}};
  for (const auto& [name, a] : adapters) apply::load_adapter(*net, a, name);
  apply::load_adapter(*net, scaled(adapters.at("b"), 0.25), "b_quarter");
  const auto layers = serve::target_layers(*net);
  ASSERT_EQ(layers.size(), 2u);
  EXPECT_EQ(layers[0].name, "fc1");
  EXPECT_EQ(layers[0].weight_shape, (std::vector<int64_t>{8, 4}));
  EXPECT_EQ(layers[1].name, "fc2");
  serve::AdapterPool pool(layers, options(3, 4));
  for (const auto& [name, a] : adapters) pool.add(name, a);

  const std::vector<serve::AdapterRequest> requests{{"a", 1.0}, {"b", 0.25}, {"", 1.0}, {"c", 1.0},
                                                    {"a", 1.0}, {"b", 0.25}, {"__base__", 1.0}};
  const auto x = torch::randn({static_cast<int64_t>(requests.size()), 2, 4});  // [batch, tokens, in]
  // Reference: each row through the tree with its adapter alone.
  std::vector<at::Tensor> expected;
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto& r = requests[i];
    const bool base = r.adapter.empty() || r.adapter == "__base__";
    apply::enable_adapters(*net, !base);
    if (!base) {
      for (auto& [path, layer] : apply::lora_layers(*net)) layer->set_adapter(std::vector<std::string>{});
      apply::set_adapter(*net, {r.adapter == "b" ? "b_quarter" : r.adapter});
    }
    expected.push_back(net->forward(x.narrow(0, i, 1)));
  }
  apply::enable_adapters(*net, true);
  apply::set_adapter(*net, {"a"});
  const auto own = net->forward(x);
  at::Tensor served;
  {
    auto lease = pool.acquire(requests);
    serve::PoolBinding binding(*net, pool, lease);
    served = net->forward(x);
    EXPECT_TRUE(contains(error_of([&] { serve::PoolBinding again(*net, pool, lease); }), "already bound"));
    EXPECT_TRUE(contains(error_of([&] { net->forward(x.narrow(0, 0, 2)); }), "the bound batch has 7 samples"));
  }
  for (size_t i = 0; i < requests.size(); ++i) expect_close(served[i], expected[i][0], 1e-5, 1e-5);
  // the binding is gone: the tree computes its own active adapter again
  expect_close(net->forward(x), own);
  // a pool that lacks one of the tree's layers is refused
  serve::AdapterPool partial({layers[1]}, options(1, 4));
  auto lease = partial.acquire({{"", 1.0}});
  EXPECT_TRUE(contains(error_of([&] { serve::PoolBinding b(*net, partial, lease); }),
                       "'fc1' is not a target layer of the pool"));
}

struct EmbConvNetImpl : torch::nn::Module {
  EmbConvNetImpl() {
    emb = register_module("emb", tnn::LoraEmbedding(torch::nn::Embedding(torch::nn::EmbeddingOptions(10, 6).padding_idx(0))));
    conv = register_module(
        "conv", tnn::LoraConv2d(torch::nn::Conv2d(torch::nn::Conv2dOptions(4, 6, 3).stride(2).padding(1).groups(2))));
  }
  tnn::LoraEmbedding emb{nullptr};
  tnn::LoraConv2d conv{nullptr};
};
TORCH_MODULE(EmbConvNet);

TEST(PoolBinding, EmbeddingAndGroupedConvLayers) {
  torch::manual_seed(4);
  EmbConvNet net;
  net->eval();
  torch::NoGradGuard no_grad;
  const auto random = tnn::AdapterOptions().r(2).lora_alpha(3).init(tnn::LoraInit::Random);
  net->emb->update_layer("a", random);
  net->conv->update_layer("a", random);
  net->emb->update_layer("b", tnn::AdapterOptions(random).r(4));
  net->conv->update_layer("b", tnn::AdapterOptions(random).r(4));
  // The pool's adapters are the layers' own, through PEFT's file layout.
  auto adapter_of = [&](const std::string& name, int64_t r) {
    io::LoraConfig config;
    config.r = r;
    config.lora_alpha = 3;
    config.target_modules = io::ModuleSelector::from_names({"emb", "conv"});
    std::map<std::string, at::Tensor> state{
        {"base_model.model.emb.lora_embedding_A", net->emb->lora_embedding_A->get(name)},
        {"base_model.model.emb.lora_embedding_B", net->emb->lora_embedding_B->get(name)},
        {"base_model.model.conv.lora_A.weight", net->conv->lora_A->at<torch::nn::Conv2dImpl>(name).weight},
        {"base_model.model.conv.lora_B.weight", net->conv->lora_B->at<torch::nn::Conv2dImpl>(name).weight}};
    return io::adapter_from_state_dict(config, state, "memory");
  };
  serve::AdapterPool pool(serve::target_layers(*net), options(2, 4));
  pool.add("a", adapter_of("a", 2));
  pool.add("b", adapter_of("b", 4));
  const std::vector<std::string> rows{"b", "__base__", "a"};
  const auto ids = torch::tensor({1, 0, 3, 9, 2, 0, 5, 5, 7}, torch::kLong).view({3, 3});
  const auto img = torch::randn({3, 4, 5, 5});
  const auto want_emb = net->emb->forward_mixed(ids, rows);
  const auto want_conv = net->conv->forward_mixed(img, rows);
  auto lease = pool.acquire({{"b", 1.0}, {"", 1.0}, {"a", 1.0}});
  serve::PoolBinding binding(*net, pool, lease);
  expect_close(net->emb->forward(ids), want_emb, 1e-5, 1e-5);
  expect_close(net->conv->forward(img), want_conv, 1e-5, 1e-5);
}

}  // namespace
