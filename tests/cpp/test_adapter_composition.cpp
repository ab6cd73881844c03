// PEFT's add_weighted_adapter in the C++ core with no Python in the process: the combination
// rules against their formulas, the order of the dare_* random draws, and AdapterPool::compose
// (a composed adapter is served from a slot like any other, and rejected when it does not fit).
#include <torch/torch.h>

#include <gtest/gtest.h>

#include "tensor_expect.h"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include <torchlora/io/peft_adapter.h>
#include <torchlora/peft/adapter_combination.h>
#include <torchlora/peft/weighted_adapter.h>
#include <torchlora/serve/adapter_pool.h>

namespace {

namespace io = torchlora::io;
namespace peft = torchlora::peft;
namespace serve = torchlora::serve;

struct Layer {
  std::string name;
  int64_t out, in;
};
const std::vector<Layer> kLayers = {{"fc1", 16, 12}, {"fc2", 10, 16}};

io::PeftAdapter make_adapter(int64_t r, double alpha, uint64_t seed) {
  torch::manual_seed(seed);
  io::PeftAdapter adapter;
  adapter.config.r = r;
  adapter.config.lora_alpha = alpha;
  adapter.config.target_modules = io::ModuleSelector::from_names({"fc1", "fc2"});
  for (const auto& l : kLayers) {
    io::LoraModuleWeights w;
    w.lora_A = torch::randn({r, l.in});
    w.lora_B = torch::randn({l.out, r});
    w.scaling = alpha / static_cast<double>(r);
    adapter.modules.emplace(l.name, w);
  }
  return adapter;
}

std::shared_ptr<serve::AdapterPool> make_pool() {
  std::vector<serve::TargetLayer> layers;
  for (const auto& l : kLayers) {
    serve::TargetLayer t;
    t.name = l.name;
    t.weight_shape = {l.out, l.in};
    layers.push_back(t);
  }
  serve::PoolOptions o;
  o.max_loras = 2;
  o.max_lora_rank = 8;
  o.max_cpu_loras = 4;  // adapters added from tensors stay in the host tier: room for the parts and the mix
  return std::make_shared<serve::AdapterPool>(layers, o);
}

// scale * B @ A of `adapter`'s slot in one layer.
at::Tensor served_delta(serve::AdapterPool& pool, const std::string& adapter, const std::string& layer) {
  auto lease = pool.acquire({{adapter, 1.0}});
  const int64_t s = lease.slots().at(0);
  const auto& st = pool.stacks(layer);
  return st.lora_B[s].matmul(st.lora_A[s]) * st.scale[s].item<double>();
}

at::Tensor delta(const io::LoraModuleWeights& w) { return w.lora_B.matmul(w.lora_A) * w.scaling; }

template <class E>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(AdapterComposition, CatServesTheExactWeightedSum) {
  auto pool = make_pool();
  const auto a = make_adapter(2, 4.0, 1), b = make_adapter(3, 3.0, 2);
  pool->add("a", a);
  pool->add("b", b);
  peft::WeightedAdapterOptions o;
  o.combination_type = "cat";
  pool->compose("mix", {{"a", 0.7}, {"b", -0.3}}, o);
  for (const auto& l : kLayers) {
    const auto want = 0.7 * delta(a.modules.at(l.name)) - 0.3 * delta(b.modules.at(l.name));
    expect_close(served_delta(*pool, "mix", l.name), want, 1e-4, 1e-5);
  }
  for (const auto& s : pool->status()) {
    if (s.name == "mix") {
      EXPECT_EQ(s.rank, 5);
    }
  }
}

TEST(AdapterComposition, SvdAtTheFullRankKeepsTheSum) {
  auto pool = make_pool();
  const auto a = make_adapter(2, 4.0, 3), b = make_adapter(3, 3.0, 4);
  pool->add("a", a);
  pool->add("b", b);
  peft::WeightedAdapterOptions o;  // svd by default
  o.svd_rank = 5;
  pool->compose("mix", {{"a", 1.5}, {"b", 0.5}}, o);
  for (const auto& l : kLayers) {
    const auto want = 1.5 * delta(a.modules.at(l.name)) + 0.5 * delta(b.modules.at(l.name));
    expect_close(served_delta(*pool, "mix", l.name), want, 1e-4, 1e-4);
  }
}

TEST(AdapterComposition, LinearWeightsEachFactorBySquareRoots) {
  const auto a = make_adapter(2, 4.0, 5), b = make_adapter(2, 1.0, 6);
  const double wa = 0.8 * 2.0, wb = -0.5 * 0.5;  // weight * scaling
  const auto& fa = a.modules.at("fc1");
  const auto& fb = b.modules.at("fc1");
  peft::CombinationOptions o;
  o.type = peft::CombinationType::Linear;
  const auto [A, B] = peft::combine_lora_factors({{fa.lora_A, fa.lora_B, 2.0, 0.8}, {fb.lora_A, fb.lora_B, 0.5, -0.5}}, o);
  expect_close(A, std::sqrt(wa) * fa.lora_A - std::sqrt(-wb) * fb.lora_A);
  expect_close(B, std::sqrt(wa) * fa.lora_B + std::sqrt(-wb) * fb.lora_B);
}

TEST(AdapterComposition, DareDrawsEveryLoraABeforeEveryLoraB) {
  const auto a = make_adapter(2, 2.0, 7), b = make_adapter(2, 2.0, 8);
  const auto& fa = a.modules.at("fc2");
  const auto& fb = b.modules.at("fc2");
  peft::CombinationOptions o;
  o.type = peft::CombinationType::DareLinear;
  o.density = 0.5;
  torch::manual_seed(11);
  const auto [A, B] = peft::combine_lora_factors({{fa.lora_A, fa.lora_B, 1.0, 1.0}, {fb.lora_A, fb.lora_B, 1.0, 1.0}}, o);
  torch::manual_seed(11);
  const auto mask_a0 = at::bernoulli(at::full_like(fa.lora_A, 0.5));
  const auto mask_a1 = at::bernoulli(at::full_like(fb.lora_A, 0.5));
  const auto mask_b0 = at::bernoulli(at::full_like(fa.lora_B, 0.5));
  const auto mask_b1 = at::bernoulli(at::full_like(fb.lora_B, 0.5));
  expect_close(A, (fa.lora_A * mask_a0 + fb.lora_A * mask_a1) / 0.5);
  expect_close(B, (fa.lora_B * mask_b0 + fb.lora_B * mask_b1) / 0.5);
}

TEST(AdapterComposition, ComposeRejectsWhatPeftRejects) {
  auto pool = make_pool();
  pool->add("a", make_adapter(2, 4.0, 9));
  pool->add("b", make_adapter(3, 3.0, 10));
  peft::WeightedAdapterOptions o;
  o.combination_type = "linear";
  EXPECT_NE(error_of<serve::AdapterNotFound>([&] { pool->compose("mix", {{"a", 1.0}, {"zz", 1.0}}, o); }), "");
  EXPECT_NE(error_of<c10::ValueError>([&] { pool->compose("mix", {{"a", 1.0}, {"b", 1.0}}, o); })
                .find("same r value"),
            std::string::npos);
  o.combination_type = "ties";
  EXPECT_NE(error_of<c10::TypeError>([&] { pool->compose("mix", {{"a", 1.0}, {"a", 1.0}}, o); }).find("density"),
            std::string::npos);
  o.combination_type = "cat";  // rank 3 + 3 + 3 > max_lora_rank 8
  EXPECT_NE(error_of<serve::AdapterRejected>([&] { pool->compose("mix", {{"b", 1.0}, {"b", 1.0}, {"b", 1.0}}, o); })
                .find("max_lora_rank"),
            std::string::npos);
  EXPECT_FALSE(pool->has_adapter("mix"));
}

}  // namespace
