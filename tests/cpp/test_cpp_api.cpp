// The C++ API with no Python in the process: safetensors and adapter_config.json IO (and
// their errors), PEFT's target rules, the LibTorch LoRA modules, injection into module trees,
// TorchScript merge/unmerge/hot-swap and concurrent adapter loading during inference.
#include <torch/script.h>
#include <torch/torch.h>

#include <gtest/gtest.h>

#include "tensor_expect.h"

#include <unistd.h>

#include <atomic>
#include <functional>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <torchlora/apply/inject.h>
#include <torchlora/apply/script_model.h>
#include <torchlora/apply/target_match.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/io/peft_adapter.h>
#include <torchlora/io/safetensors.h>
#include <torchlora/io/weight_conversion.h>
#include <torchlora/nn/lora_conv2d.h>
#include <torchlora/nn/lora_embedding.h>
#include <torchlora/nn/lora_linear.h>
#include <torchlora/peft/names.h>
#include <torchlora/peft/mutated_init.h>
#include <torchlora/peft/scaling.h>
#include <torchlora/serve/adapter_pool.h>
#include <torchlora/serve/module_slots.h>

namespace {

namespace io = torchlora::io;
namespace apply = torchlora::apply;
namespace tnn = torchlora::nn;
namespace peft = torchlora::peft;


std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

// ------------------------------------------------------------------------- safetensors
TEST(Safetensors, RoundTripsEveryDtype) {
  std::map<std::string, at::Tensor> tensors{
      {"f32", at::randn({3, 4})},
      {"f16", at::randn({5}).to(at::kHalf)},
      {"bf16", at::randn({2, 2, 2}).to(at::kBFloat16)},
      {"f64", at::randn({1}, at::kDouble)},
      {"i64", at::arange(7)},
      {"u8", at::arange(4).to(at::kByte)},
      {"b", at::ones({2}, at::kBool)},
      {"empty", at::zeros({0, 3})},
      {"strided", at::randn({4, 6}).t()},
  };
  const auto bytes = io::serialize_safetensors(tensors, {{"format", "pt"}});
  const auto back = io::parse_safetensors(bytes.data(), bytes.size(), "mem");
  ASSERT_EQ(back.tensors.size(), tensors.size());
  EXPECT_EQ(back.metadata.at("format"), "pt");
  for (const auto& [k, t] : tensors) {
    EXPECT_EQ(back.tensors.at(k).scalar_type(), t.scalar_type()) << k;
    EXPECT_TRUE(at::equal(back.tensors.at(k), t)) << k;
  }
}

TEST(Safetensors, EveryTruncationAndByteFlipIsAnErrorOrValid) {
  const auto bytes = io::serialize_safetensors({{"a", at::randn({3, 2})}, {"b", at::randn({4})}});
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_THROW(io::parse_safetensors(bytes.data(), n, "truncated"), c10::Error) << n;
  }
  std::mt19937 rng(0);
  for (int i = 0; i < 2000; ++i) {
    auto copy = bytes;
    copy[rng() % copy.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    try {
      io::parse_safetensors(copy.data(), copy.size(), "flipped");
    } catch (const c10::Error&) {
    }
  }
}

TEST(Safetensors, ErrorsNameFileAndKey) {
  auto bytes = io::serialize_safetensors({{"layer.lora_A.weight", at::randn({2, 2})}});
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + bytes[0]);
  std::string bad = header;
  bad.replace(bad.find("F32"), 3, "F16");  // 16 bytes given, 8 needed
  std::vector<uint8_t> file(bytes.begin(), bytes.begin() + 8);
  file.insert(file.end(), bad.begin(), bad.end());
  file.insert(file.end(), bytes.begin() + 8 + header.size(), bytes.end());
  const auto msg = error_of([&] { io::parse_safetensors(file.data(), file.size(), "my.safetensors"); });
  EXPECT_NE(msg.find("my.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'layer.lora_A.weight'"), std::string::npos) << msg;
}

TEST(Safetensors, FilesRoundTrip) {
  const auto dir = std::filesystem::temp_directory_path() / ("torchlora_st_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = (dir / "x.safetensors").string();
  io::save_safetensors(path, {{"w", at::randn({3})}});
  EXPECT_EQ(io::load_safetensors(path).tensors.at("w").numel(), 3);
  EXPECT_NE(error_of([&] { io::load_safetensors((dir / "nope").string()); }).find("no such file"), std::string::npos);
  std::filesystem::remove_all(dir);
}

// ------------------------------------------------------------------------- config + matching
TEST(AdapterConfig, ParsesPeftFieldsAndPatternsInOrder) {
  const auto c = io::parse_adapter_config(R"({
    "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
    "rank_pattern": {"layers\\.0\\.self_attn\\.q_proj": 2, "q_proj": 4}, "alpha_pattern": {"v_proj": 3},
    "use_rslora": true, "layers_to_transform": 1, "layers_pattern": "layers", "init_lora_weights": false,
    "megatron_config": null, "task_type": "CAUSAL_LM"})");
  EXPECT_EQ(c.rank_for("model.layers.0.self_attn.q_proj"), 2);
  EXPECT_EQ(c.rank_for("model.layers.1.self_attn.q_proj"), 4);
  EXPECT_EQ(c.rank_for("model.layers.1.self_attn.k_proj"), 8);
  EXPECT_DOUBLE_EQ(c.scaling_for("model.layers.1.self_attn.v_proj"), 3.0 / std::sqrt(8.0));
  EXPECT_EQ(*c.task_type, "CAUSAL_LM");
  // Round trip keeps the values.
  const auto again = io::parse_adapter_config(io::adapter_config_to_json(c));
  EXPECT_EQ(again.rank_pattern, c.rank_pattern);
  EXPECT_NE(io::adapter_config_to_json(c).find("\"init_lora_weights\": false"), std::string::npos);
}

TEST(AdapterConfig, RejectsBadFieldsByName) {
  EXPECT_NE(error_of([] { io::parse_adapter_config(R"({"r": 1.5})"); }).find("r must be an int"), std::string::npos);
  EXPECT_NE(error_of([] { io::parse_adapter_config(R"({"target_modules": 3})"); }).find("target_modules"), std::string::npos);
  EXPECT_NE(error_of([] { io::parse_adapter_config(R"({"lora_dropout": 1.0})"); }).find("lora_dropout"), std::string::npos);
  EXPECT_NE(error_of([] { io::parse_adapter_config(R"({"target_modules": "q", "layers_to_transform": [0]})"); })
                .find("layers_to_transform"), std::string::npos);
  EXPECT_NE(error_of([] { io::parse_adapter_config(R"({"rank_pattern": {"(": 2}})"); }).find("rank_pattern"),
            std::string::npos);
}

// The schema Python's LoraConfig uses: unknown keys, options torchlora lacks and the ranges
// config.py enforces are errors in C++ too, with the same exception types.
TEST(AdapterConfig, RejectsWhatPythonRejects) {
  EXPECT_THROW(io::parse_adapter_config(R"({"r": 4, "my_option": 1})"), c10::ValueError);
  EXPECT_NE(error_of([] { io::parse_adapter_config(R"({"zeta": 1, "beta": 2})"); }).find("['beta', 'zeta']"),
            std::string::npos);
  EXPECT_TRUE(io::parse_adapter_config(R"({"use_dora": true})").use_dora);  // DoRA is read (see the Dora tests)
  EXPECT_THROW(io::parse_adapter_config(R"({"arrow_config": {"top_k": 2}})"), c10::NotImplementedError);
  EXPECT_THROW(io::parse_adapter_config(R"({"alora_invocation_tokens": [1]})"), c10::NotImplementedError);
  EXPECT_THROW(io::parse_adapter_config(R"({"lora_alpha": 0})"), c10::ValueError);
  EXPECT_THROW(io::parse_adapter_config(R"({"lora_alpha": -1.5})"), c10::ValueError);
  EXPECT_THROW(io::parse_adapter_config(R"({"r": "8"})"), c10::TypeError);
  EXPECT_THROW(io::parse_adapter_config(R"({"init_lora_weights": "kaiming"})"), c10::ValueError);
  EXPECT_THROW(io::parse_adapter_config(R"({"task_type": "TRANSLATION"})"), c10::ValueError);
  // PEFT's defaults of the options torchlora lacks are accepted
  EXPECT_NO_THROW(io::parse_adapter_config(R"({"use_dora": false, "megatron_core": "megatron.core", "loftq_config": {}})"));
  // a struct built by hand goes through the same schema
  io::LoraConfig c;
  c.lora_alpha = 0;
  EXPECT_THROW(c.validate(), c10::ValueError);
}

TEST(TargetMatch, FollowsPeftRules) {
  io::LoraConfig c;
  c.target_modules = io::ModuleSelector::from_names({"q", "fc"});
  EXPECT_TRUE(apply::is_target_module(c, "q"));
  EXPECT_TRUE(apply::is_target_module(c, "encoder.layer.0.q"));
  EXPECT_FALSE(apply::is_target_module(c, "encoder.layer.0.qq"));
  EXPECT_FALSE(apply::is_target_module(c, "encoder.layer.0.q.sub"));
  c.exclude_modules = io::ModuleSelector::from_names({"layer.1.q"});
  EXPECT_FALSE(apply::is_target_module(c, "encoder.layer.1.q"));
  c.modules_to_save = {"fc"};
  EXPECT_FALSE(apply::is_target_module(c, "head.fc"));
  c.modules_to_save.clear();
  c.layers_to_transform = std::vector<int64_t>{2};
  EXPECT_TRUE(apply::is_target_module(c, "encoder.layer.2.q"));
  EXPECT_FALSE(apply::is_target_module(c, "encoder.layer.0.q"));
  EXPECT_EQ(apply::layer_index("model.layers.3.experts.5.w", {}), 3);  // the first index
  EXPECT_EQ(apply::layer_index("model.h.4.attn.c", {"h"}), 4);
  io::LoraConfig r;
  r.target_modules = io::ModuleSelector::from_regex(R"(.*\.(q|v)_proj)");
  EXPECT_TRUE(apply::is_target_module(r, "m.layers.0.q_proj"));
  EXPECT_FALSE(apply::is_target_module(r, "m.layers.0.q_proj.x"));
  EXPECT_FALSE(apply::is_target_module(r, "q_proj"));
}

// ------------------------------------------------------------------------- modules
TEST(LoraLinearModule, ForwardMergeUnmergeDelete) {
  torch::manual_seed(0);
  torch::nn::Linear base(torch::nn::LinearOptions(6, 5));
  tnn::LoraLinear lora(base, "a", tnn::AdapterOptions().r(3).lora_alpha(6).init(tnn::LoraInit::Random));
  lora->update_layer("b", tnn::AdapterOptions().r(2).lora_alpha(2).lora_bias(true).init(tnn::LoraInit::Random));
  lora->eval();
  auto x = torch::randn({4, 6});
  const auto& A = lora->lora_A->at<torch::nn::LinearImpl>("a").weight;
  const auto& B = lora->lora_B->at<torch::nn::LinearImpl>("a").weight;
  const auto expected_a = base->forward(x) + 2.0 * torch::matmul(torch::matmul(x, A.t()), B.t());
  torch::NoGradGuard no_grad;
  expect_close(lora->forward(x), expected_a);
  // Parameter names are PEFT's.
  const auto params = lora->named_parameters();
  EXPECT_TRUE(params.contains("base_layer.weight"));
  EXPECT_TRUE(params.contains("lora_A.a.weight"));
  EXPECT_TRUE(params.contains("lora_B.b.bias"));
  // Both adapters active, then merged: same output; unmerge restores the weight.
  lora->set_adapter(std::vector<std::string>{"a", "b"});
  const auto both = lora->forward(x);
  const auto w0 = base->weight.clone();
  lora->merge(/*safe_merge=*/true);
  EXPECT_TRUE(lora->merged());
  expect_close(lora->forward(x), both, 1e-5, 1e-5);
  lora->unmerge();
  expect_close(base->weight, w0, 0, 1e-6);
  // Mixed batch: per-sample adapters.
  const auto mixed = lora->forward_mixed(x, {"a", "__base__", "b", "a"});
  lora->set_adapter("b");
  const auto only_b = lora->forward(x);
  expect_close(mixed[0], expected_a[0]);
  expect_close(mixed[1], base->forward(x)[1]);
  expect_close(mixed[2], only_b[2]);
  // Disabled: the base layer.
  lora->enable_adapters(false);
  expect_close(lora->forward(x), base->forward(x));
  lora->enable_adapters(true);
  lora->delete_adapter("b");
  EXPECT_EQ(lora->active_adapters(), std::vector<std::string>{"a"});
  EXPECT_FALSE(lora->named_parameters().contains("lora_B.b.bias"));
  EXPECT_THROW(lora->forward_mixed(x, {"a", "zzz", "a", "a"}), c10::Error);
  EXPECT_THROW(lora->update_layer("x.y", {}), c10::Error);
  EXPECT_THROW(lora->update_layer("c", tnn::AdapterOptions().r(0)), c10::Error);
}

TEST(LoraEmbeddingAndConv, ForwardEqualsMergedForward) {
  torch::manual_seed(1);
  torch::NoGradGuard no_grad;
  tnn::LoraEmbedding emb(torch::nn::Embedding(torch::nn::EmbeddingOptions(10, 4).padding_idx(0)), "a",
                         tnn::AdapterOptions().r(2).lora_alpha(3).init(tnn::LoraInit::Random));
  auto ids = torch::tensor({{0, 3, 9}, {1, 1, 2}}, torch::kLong);
  const auto unmerged = emb->forward(ids);
  emb->merge();
  expect_close(emb->forward(ids), unmerged, 1e-5, 1e-5);
  emb->unmerge();

  tnn::LoraConv2d conv(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1).stride(2)), "a",
                       tnn::AdapterOptions().r(2).lora_alpha(4).lora_bias(true).init(tnn::LoraInit::Random));
  conv->eval();
  auto x = torch::randn({2, 3, 7, 7});
  const auto out = conv->forward(x);
  conv->merge();
  expect_close(conv->forward(x), out, 1e-5, 1e-5);
  conv->unmerge();
  expect_close(conv->forward(x.select(0, 0)), out.select(0, 0), 1e-5, 1e-5);  // unbatched input
}

// PEFT's forward of a LoRA Linear, written with plain ATen: the base layer plus, per active
// adapter, lora_B(lora_A(x)) * scaling (dropout is the identity in eval mode).
at::Tensor peft_linear_forward(const at::Tensor& x, const at::Tensor& W, const at::Tensor& bias,
                               const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor, double>>& adapters) {
  auto out = torch::nn::functional::linear(x, W, bias);
  for (const auto& [A, B, b, scaling] : adapters) {
    out = out + torch::nn::functional::linear(torch::nn::functional::linear(x, A), B, b) * scaling;
  }
  return out;
}

at::Tensor leaf_copy(const at::Tensor& t) { return t.defined() ? t.detach().clone().requires_grad_(true) : t; }

TEST(LoraLinearModule, FusedForwardAndGradientsMatchPeftFormula) {
  torch::manual_seed(7);
  torch::nn::Linear base(torch::nn::LinearOptions(6, 5));
  tnn::LoraLinear lora(base, "a",
                       tnn::AdapterOptions().r(3).lora_alpha(6).lora_dropout(0.25).init(tnn::LoraInit::Random));
  lora->update_layer("b", tnn::AdapterOptions().r(2).lora_alpha(3).use_rslora(true).lora_bias(true)
                              .init(tnn::LoraInit::Random));
  lora->eval();  // lora_dropout is set, but eval mode applies none
  // One adapter (the fused linear_with_lora), two (the second added in place), 3-D and 1-D input.
  for (const auto& active : {std::vector<std::string>{"a"}, std::vector<std::string>{"b", "a"}}) {
    for (const auto& shape : {std::vector<int64_t>{2, 4, 6}, std::vector<int64_t>{6}}) {
      lora->set_adapter(active);
      lora->zero_grad();
      auto x = torch::randn(shape).requires_grad_(true);
      auto out = lora->forward(x);
      auto go = torch::randn_like(out);
      out.backward(go);

      auto xr = leaf_copy(x), Wr = leaf_copy(base->weight), br = leaf_copy(base->bias);
      std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor, double>> adapters;
      std::vector<std::pair<at::Tensor, at::Tensor>> params;  // (module's, reference's)
      for (const auto& name : active) {
        const auto& a = lora->lora_A->at<torch::nn::LinearImpl>(name);
        const auto& b = lora->lora_B->at<torch::nn::LinearImpl>(name);
        adapters.emplace_back(leaf_copy(a.weight), leaf_copy(b.weight), leaf_copy(b.bias), lora->scaling(name));
        params.emplace_back(a.weight, std::get<0>(adapters.back()));
        params.emplace_back(b.weight, std::get<1>(adapters.back()));
        if (b.bias.defined()) params.emplace_back(b.bias, std::get<2>(adapters.back()));
      }
      auto ref = peft_linear_forward(xr, Wr, br, adapters);
      ref.backward(go);
      expect_close(out, ref);
      expect_close(x.grad(), xr.grad());
      expect_close(base->weight.grad(), Wr.grad());
      expect_close(base->bias.grad(), br.grad());
      for (const auto& [p, r] : params) expect_close(p.grad(), r.grad());
    }
  }
}

TEST(LoraLayers, MixedBatchOfEveryLayerMatchesPerAdapterForward) {
  torch::manual_seed(8);
  torch::NoGradGuard no_grad;
  const auto random = [](int64_t r, double alpha) {
    return tnn::AdapterOptions().r(r).lora_alpha(alpha).lora_dropout(0.1).init(tnn::LoraInit::Random);
  };
  tnn::LoraLinear linear(torch::nn::Linear(6, 5), "a", random(3, 6));
  tnn::LoraEmbedding embedding(torch::nn::Embedding(10, 4), "a", random(2, 3));
  tnn::LoraConv2d conv(torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)), "a", random(2, 4));
  const std::vector<std::pair<std::shared_ptr<tnn::LoraLayer>, at::Tensor>> layers = {
      {linear.ptr(), torch::randn({4, 6})},
      {embedding.ptr(), torch::randint(0, 10, {4, 3}, torch::kLong)},
      {conv.ptr(), torch::randn({4, 3, 5, 5})},
  };
  const std::vector<std::string> names = {"b", torchlora::peft::kBaseAdapterName, "a", "b"};
  for (const auto& [layer, x] : layers) {
    layer->update_layer("b", random(2, 5));
    layer->eval();
    std::map<std::string, at::Tensor> per_adapter;
    for (const std::string name : {"a", "b"}) {
      layer->set_adapter(name);
      per_adapter[name] = layer->forward(x);
    }
    layer->enable_adapters(false);
    per_adapter[torchlora::peft::kBaseAdapterName] = layer->forward(x);
    expect_close(layer->forward_mixed(x, names), per_adapter[torchlora::peft::kBaseAdapterName]);  // disabled
    layer->enable_adapters(true);
    const auto mixed = layer->forward_mixed(x, names);
    for (size_t i = 0; i < names.size(); ++i) {
      expect_close(mixed[i], per_adapter[names[i]][i]);
    }
    EXPECT_THROW(layer->forward_mixed(x, {"a", "b"}), c10::ValueError);  // one name per sample
    layer->train();  // mixed batches also train; dropout leaves the row without an adapter alone
    const auto trained = layer->forward_mixed(x, names);
    EXPECT_EQ(trained.sizes(), mixed.sizes());
    expect_close(trained[1], per_adapter[torchlora::peft::kBaseAdapterName][1]);
  }
}

// ------------------------------------------------------------------------- injection
struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl() {
    register_module("fc1", torch::nn::Linear(4, 8));  // plain: called through the registry
    fc2 = register_module("fc2", tnn::LoraLinear(torch::nn::Linear(8, 3)));  // declared LoRA-capable
  }
  at::Tensor forward(const at::Tensor& x) { return fc2->forward(apply::forward_child(*this, "fc1", x).relu()); }
  tnn::LoraLinear fc2{nullptr};
};
TORCH_MODULE(TinyNet);

io::PeftAdapter tiny_adapter(double scale) {
  io::LoraConfig config;
  config.r = 2;
  config.lora_alpha = 4;
  config.target_modules = io::ModuleSelector::from_names({"fc1", "fc2"});
  std::map<std::string, at::Tensor> state{
      {"base_model.model.fc1.lora_A.weight", torch::randn({2, 4}) * scale},
      {"base_model.model.fc1.lora_B.weight", torch::randn({8, 2}) * scale},
      {"base_model.model.fc2.lora_A.weight", torch::randn({2, 8}) * scale},
      {"base_model.model.fc2.lora_B.weight", torch::randn({3, 2}) * scale},
  };
  return io::adapter_from_state_dict(config, state, "memory");
}

TEST(Inject, LoadAdapterIntoModuleTreeAndSwitch) {
  torch::manual_seed(2);
  TinyNet net;
  net->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({5, 4});
  const auto base_out = net->forward(x);
  const auto adapter = tiny_adapter(1.0);
  // Reference: the same network with merged weights, by hand.
  auto fc1 = std::dynamic_pointer_cast<torch::nn::LinearImpl>(net->named_children()["fc1"]);
  const auto w1 = fc1->weight + io::delta_weight(adapter.modules.at("fc1"));
  const auto w2 = net->fc2->base_layer->weight + io::delta_weight(adapter.modules.at("fc2"));
  const auto h = torch::nn::functional::linear(x, w1, fc1->bias).relu();
  const auto expected = torch::nn::functional::linear(h, w2, net->fc2->base_layer->bias);

  const auto injected = apply::load_adapter(*net, adapter, "a");
  ASSERT_EQ(injected.size(), 2u);
  EXPECT_TRUE(injected[0].replaced);   // fc1 was plain
  EXPECT_FALSE(injected[1].replaced);  // fc2 already was a LoRA layer
  expect_close(net->forward(x), base_out);  // loaded, not active yet
  apply::set_adapter(*net, {"a"});
  expect_close(net->forward(x), expected, 1e-5, 1e-5);
  apply::load_adapter(*net, tiny_adapter(0.5), "b");
  apply::set_adapter(*net, {"b"});
  EXPECT_FALSE(at::allclose(net->forward(x), expected));
  apply::set_adapter(*net, {"a"});
  apply::merge_adapter(*net);
  expect_close(net->forward(x), expected, 1e-5, 1e-5);
  apply::unmerge_adapter(*net);
  apply::enable_adapters(*net, false);
  expect_close(net->forward(x), base_out, 1e-5, 1e-5);

  io::LoraConfig none;
  none.target_modules = io::ModuleSelector::from_names({"nothing"});
  EXPECT_NE(error_of([&] { apply::inject_adapter(*net, none, "c"); }).find("not found in the base model"),
            std::string::npos);
}

// "all-linear" means every Linear of a plain module tree, as in Python for a plain nn.Module;
// exclude_modules still applies.
TEST(Inject, AllLinearTargetsEveryLinear) {
  TinyNet net;
  io::LoraConfig config;
  config.target_modules = io::ModuleSelector::from_regex("ALL-LINEAR");
  EXPECT_EQ(apply::inject_adapter(*net, config, "a").size(), 2u);
  TinyNet other;
  config.exclude_modules = io::ModuleSelector::from_names({"fc1"});
  const auto injected = apply::inject_adapter(*other, config, "a");
  ASSERT_EQ(injected.size(), 1u);
  EXPECT_EQ(injected[0].name, "fc2");
}

// ------------------------------------------------------------------------- TorchScript
torch::jit::Module script_net() {
  auto linear = [](int64_t in, int64_t out) {
    torch::jit::Module m("Linear");
    m.register_parameter("weight", torch::randn({out, in}), false);
    m.register_parameter("bias", torch::randn({out}), false);
    m.define("def forward(self, x):\n  return torch.linear(x, self.weight, self.bias)\n");
    return m;
  };
  torch::jit::Module net("Net");
  net.register_module("fc1", linear(4, 8));
  net.register_module("fc2", linear(8, 3));
  net.define("def forward(self, x):\n  return self.fc2.forward(torch.relu(self.fc1.forward(x)))\n");
  return net;
}

at::Tensor merged_reference(torch::jit::Module net, const io::PeftAdapter* adapter, const at::Tensor& x) {
  auto w1 = net.attr("fc1").toModule().attr("weight").toTensor();
  auto b1 = net.attr("fc1").toModule().attr("bias").toTensor();
  auto w2 = net.attr("fc2").toModule().attr("weight").toTensor();
  auto b2 = net.attr("fc2").toModule().attr("bias").toTensor();
  if (adapter) {
    w1 = w1 + io::delta_weight(adapter->modules.at("fc1"));
    w2 = w2 + io::delta_weight(adapter->modules.at("fc2"));
  }
  return torch::nn::functional::linear(torch::nn::functional::linear(x, w1, b1).relu(), w2, b2);
}

TEST(ScriptModel, MergeUnmergeAndHotSwapAreExact) {
  torch::manual_seed(3);
  auto net = script_net();
  const auto originals = net.attr("fc1").toModule().attr("weight").toTensor().clone();
  apply::ScriptModuleMerger merger(net);
  const auto a = tiny_adapter(1.0), b = tiny_adapter(0.3);
  merger.merge(a);
  EXPECT_THROW(merger.merge(b), c10::Error);
  merger.unmerge();
  EXPECT_TRUE(at::equal(net.attr("fc1").toModule().attr("weight").toTensor(), originals));
  merger.merge(b);
  const auto w_swapped = net.attr("fc1").toModule().attr("weight").toTensor().clone();
  merger.unmerge();
  auto fresh = net.deepcopy();
  apply::ScriptModuleMerger direct(fresh);
  direct.merge(b);
  EXPECT_TRUE(at::equal(w_swapped, fresh.attr("fc1").toModule().attr("weight").toTensor()));

  // An adapter for other shapes is rejected with names.
  io::PeftAdapter wrong = tiny_adapter(1.0);
  wrong.modules.at("fc2").lora_A = torch::randn({2, 9});
  EXPECT_NE(error_of([&] { merger.check_compatible(wrong); }).find("'fc2.weight' has shape"), std::string::npos);
}

TEST(ScriptModel, ThreadsLoadAdaptersWhileOthersServe) {
  torch::manual_seed(4);
  auto net = script_net();
  apply::LoraScriptModel model(net.deepcopy());
  const auto x = torch::randn({3, 4});
  std::vector<io::PeftAdapter> adapters;
  std::vector<at::Tensor> expected;
  for (int i = 0; i < 4; ++i) {
    adapters.push_back(tiny_adapter(0.2 * (i + 1)));
    expected.push_back(merged_reference(net, &adapters.back(), x));
  }
  const auto expected_base = merged_reference(net, nullptr, x);
  model.add_adapter("a0", adapters[0]);

  std::atomic<int> mismatches{0}, calls{0};
  std::atomic<bool> loading_done{false};
  std::thread loader([&] {
    for (int round = 0; round < 20; ++round) {
      for (int i = 1; i < 4; ++i) model.add_adapter("a" + std::to_string(i), adapters[i]);
      model.remove_adapter("a3");
    }
    model.add_adapter("a3", adapters[3]);
    loading_done = true;
  });
  std::vector<std::thread> servers;
  for (int t = 0; t < 4; ++t) {
    servers.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 150 || !loading_done; ++i) {
        const int k = static_cast<int>(rng() % 5);  // 4 = base
        const std::string name = k == 4 ? "__base__" : "a" + std::to_string(k);
        at::Tensor out;
        try {
          out = model.forward({x}, name).toTensor();
        } catch (const c10::Error&) {
          continue;  // not loaded (yet / at the moment)
        }
        ++calls;
        if (!at::allclose(out, k == 4 ? expected_base : expected[k], 1e-5, 1e-5)) ++mismatches;
      }
    });
  }
  loader.join();
  for (auto& s : servers) s.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_GT(calls.load(), 400);
  EXPECT_EQ(model.adapter_names().size(), 4u);
  EXPECT_NE(error_of([&] { model.forward({x}, "zzz"); }).find("unknown adapter 'zzz'"), std::string::npos);
}

// ------------------------------------------------------------------------- PiSSA / OLoRA
TEST(MutatedInit, PissaAndOloraFactorsAndResiduals) {
  torch::manual_seed(5);
  const auto W = torch::randn({8, 4});
  const double s = 2.0;
  const auto pissa = peft::pissa_factors(W, 2, s);
  ASSERT_EQ(pissa.lora_A.sizes(), (std::vector<int64_t>{2, 4}));
  ASSERT_EQ(pissa.lora_B.sizes(), (std::vector<int64_t>{8, 2}));
  const auto [U, S, Vh] = at::linalg_svd(W, false);
  const auto top2 = at::matmul(U.slice(1, 0, 2) * S.slice(0, 0, 2), Vh.slice(0, 0, 2));
  expect_close(at::matmul(pissa.lora_B, pissa.lora_A) * s, top2, 1e-5, 1e-5);
  const auto residual = peft::residual_weight(W, pissa, s);
  expect_close(residual, W - top2, 1e-5, 1e-5);
  expect_close(residual + s * at::matmul(pissa.lora_B, pissa.lora_A), W, 1e-5, 1e-5);

  const auto olora = peft::olora_factors(W, 2);
  expect_close(at::matmul(olora.lora_B.t(), olora.lora_B), at::eye(2), 1e-5, 1e-5);  // orthonormal columns of Q
  const auto [Q, R] = at::linalg_qr(W);
  EXPECT_TRUE(at::equal(olora.lora_A, R.slice(0, 0, 2)));
  expect_close(peft::residual_weight(W, olora, s), W - s * at::matmul(olora.lora_B, olora.lora_A));
  // Half precision weights are factored in float32; other dtypes and ranks are errors.
  EXPECT_EQ(peft::pissa_factors(W.to(at::kBFloat16), 2, s).lora_A.scalar_type(), at::kFloat);
  EXPECT_NE(error_of([&] { peft::olora_factors(W, 5); }).find("r <= min(out_features, in_features) = 4"),
            std::string::npos);
  EXPECT_THROW(peft::pissa_factors(W.to(at::kDouble), 2, s), c10::TypeError);

  using Init = peft::BaseWeightInit;
  EXPECT_EQ(peft::base_weight_init("true"), Init::Unchanged);
  EXPECT_EQ(peft::base_weight_init("Gaussian"), Init::Unchanged);
  EXPECT_EQ(peft::base_weight_init("pissa"), Init::Pissa);
  EXPECT_EQ(peft::base_weight_init("OLoRA"), Init::Olora);
  EXPECT_EQ(peft::base_weight_init("pissa_niter_16"), Init::Unreproducible);
  EXPECT_EQ(peft::base_weight_init("loftq"), Init::Unreproducible);
  EXPECT_THROW(peft::base_weight_init("pissa_niter_x"), c10::ValueError);
  const auto msg = error_of([] { peft::check_base_weights_reproducible("pissa_niter_4", "/adapters/x"); });
  EXPECT_NE(msg.find("/adapters/x"), std::string::npos) << msg;
  EXPECT_NE(msg.find("randomised SVD"), std::string::npos) << msg;
  EXPECT_NE(msg.find("path_initial_model_for_weight_conversion"), std::string::npos) << msg;
  EXPECT_EQ(error_of([] { peft::check_base_weights_reproducible("pissa", "x"); }), "");
}

TEST(MutatedInit, ConvertedSettingsKeepEveryScaling) {
  for (const bool rslora : {false, true}) {
    const auto s = peft::settings_for_original_weights({4, 8.0, rslora, {{"fc", 2}}, {{"fc", 3.0}}});
    EXPECT_EQ(s.r, 8);
    EXPECT_EQ(s.rank_pattern, (std::vector<std::pair<std::string, int64_t>>{{"fc", 4}}));
    EXPECT_DOUBLE_EQ(peft::lora_scaling(s.lora_alpha, s.r, rslora), peft::lora_scaling(8.0, 4, rslora));
    EXPECT_DOUBLE_EQ(peft::lora_scaling(s.alpha_pattern[0].second, 4, rslora), peft::lora_scaling(3.0, 2, rslora));
  }
  // cat(A, A0), cat(B, -B0): B'@A' = B@A - B0@A0; no initial factors: zero padding.
  const peft::LoraFactors trained{torch::randn({2, 4}), torch::randn({8, 2})}, initial{torch::randn({2, 4}), torch::randn({8, 2})};
  const auto c = peft::factors_for_original_weights(trained, initial);
  expect_close(at::matmul(c.lora_B, c.lora_A),
               at::matmul(trained.lora_B, trained.lora_A) - at::matmul(initial.lora_B, initial.lora_A), 1e-5, 1e-5);
  const auto padded = peft::factors_for_original_weights(trained, {});
  EXPECT_EQ(padded.lora_A.size(0), 4);
  expect_close(at::matmul(padded.lora_B, padded.lora_A), at::matmul(trained.lora_B, trained.lora_A));
  EXPECT_THROW(peft::factors_for_original_weights(trained, {torch::randn({3, 4}), torch::randn({8, 3})}),
               c10::ValueError);
}

// A "trained" PiSSA / OLoRA adapter for the modules `originals` (path -> original weight [out, in])
// and the weights Python's model has after loading it: the residual plus the trained delta.
struct MutatedAdapter {
  io::PeftAdapter adapter;
  std::map<std::string, at::Tensor> merged;
};

MutatedAdapter mutated_adapter(const std::string& init, const std::map<std::string, at::Tensor>& originals) {
  io::LoraConfig config;
  config.r = 2;
  config.lora_alpha = 4;
  config.init_lora_weights = init;
  std::vector<std::string> names;
  std::map<std::string, at::Tensor> state;
  MutatedAdapter out;
  for (const auto& [path, W] : originals) {
    names.push_back(path);
    const auto initial = peft::initial_factors(init, W, 2, 2.0);
    const auto A = initial.lora_A + 0.1 * torch::randn_like(initial.lora_A);
    const auto B = initial.lora_B + 0.1 * torch::randn_like(initial.lora_B);
    state["base_model.model." + path + ".lora_A.weight"] = A;
    state["base_model.model." + path + ".lora_B.weight"] = B;
    out.merged[path] = peft::residual_weight(W, initial, 2.0) + 2.0 * at::matmul(B, A);
  }
  config.target_modules = io::ModuleSelector::from_names(names);
  out.adapter = io::adapter_from_state_dict(config, state, "memory");
  return out;
}

at::Tensor two_layers(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                      const at::Tensor& b2) {
  return torch::nn::functional::linear(torch::nn::functional::linear(x, w1, b1).relu(), w2, b2);
}

TEST(WeightConversion, ServingPathsComputeWhatTheResidualModelComputes) {
  torch::NoGradGuard no_grad;
  for (const std::string init : {"pissa", "olora"}) {
    SCOPED_TRACE(init);
    torch::manual_seed(6);
    auto net = script_net();
    auto param = [&](const char* m, const char* p) { return net.attr(m).toModule().attr(p).toTensor(); };
    const auto w1 = param("fc1", "weight").clone();
    const auto case_ = mutated_adapter(init, {{"fc1", w1}, {"fc2", param("fc2", "weight")}});
    const auto x = torch::randn({5, 4});
    const auto expected = two_layers(x, case_.merged.at("fc1"), param("fc1", "bias"), case_.merged.at("fc2"),
                                     param("fc2", "bias"));
    const auto base = two_layers(x, w1, param("fc1", "bias"), param("fc2", "weight"), param("fc2", "bias"));
    ASSERT_FALSE(at::allclose(expected, base, 1e-3, 1e-3));

    // The TorchScript serving path: converted once when added; swaps stay exact.
    apply::LoraScriptModel model(net.deepcopy());
    model.add_adapter("p", case_.adapter);
    const auto plain = tiny_adapter(0.5);
    model.add_adapter("plain", plain);
    expect_close(model.forward({x}, "p").toTensor(), expected, 1e-5, 1e-5);
    expect_close(model.forward({x}, "plain").toTensor(), merged_reference(net, &plain, x), 1e-5, 1e-5);
    // ... also added while another adapter is merged: it is converted from the original weights.
    model.add_adapter("p2", case_.adapter);
    expect_close(model.forward({x}, "p2").toTensor(), expected, 1e-5, 1e-5);
    expect_close(model.forward({x}, "__base__").toTensor(), base);
    // The merger converts an unconverted adapter itself.
    auto copy = net.deepcopy();
    apply::ScriptModuleMerger merger(copy);
    merger.merge(case_.adapter);
    expect_close(copy.forward({x}).toTensor(), expected, 1e-5, 1e-5);
    merger.unmerge();
    EXPECT_TRUE(at::equal(copy.attr("fc1").toModule().attr("weight").toTensor(), w1));

    // The converted adapter is PEFT's: rank 2r, alpha doubled, init true; it round-trips through files.
    const auto converted = merger.for_original_weights(case_.adapter);
    EXPECT_EQ(converted.config.r, 4);
    EXPECT_DOUBLE_EQ(converted.config.lora_alpha, 8.0);
    EXPECT_EQ(converted.config.init_lora_weights, "true");
    EXPECT_EQ(converted.modules.at("fc1").rank(), 4);
    const auto dir = std::filesystem::temp_directory_path() / ("torchlora_conv_" + std::to_string(::getpid()) + init);
    io::save_peft_adapter(dir.string(), converted);
    const auto back = io::load_peft_adapter(dir.string());
    EXPECT_FALSE(io::applies_to_rewritten_base_weights(back.config));
    expect_close(w1 + io::delta_weight(back.modules.at("fc1")), case_.merged.at("fc1"), 1e-5, 1e-5);
    std::filesystem::remove_all(dir);

    // A C++ module tree: the base layers stay untouched.
    TinyNet tree;
    tree->eval();
    auto fc1 = std::dynamic_pointer_cast<torch::nn::LinearImpl>(tree->named_children()["fc1"]);
    const auto tree_case = mutated_adapter(init, {{"fc1", fc1->weight}, {"fc2", tree->fc2->base_layer->weight}});
    const auto tree_expected = two_layers(x, tree_case.merged.at("fc1"), fc1->bias, tree_case.merged.at("fc2"),
                                          tree->fc2->base_layer->bias);
    const auto fc1_weight = fc1->weight.clone();
    apply::load_adapter(*tree, tree_case.adapter, "p");
    apply::set_adapter(*tree, {"p"});
    expect_close(tree->forward(x), tree_expected, 1e-5, 1e-5);
    apply::merge_adapter(*tree);
    expect_close(tree->forward(x), tree_expected, 1e-5, 1e-5);
    apply::unmerge_adapter(*tree);
    EXPECT_TRUE(at::allclose(fc1->weight, fc1_weight, 0, 1e-6));
  }
}

TEST(WeightConversion, RandomisedPissaIsRejectedEverywhere) {
  torch::manual_seed(7);
  auto net = script_net();
  auto adapter = mutated_adapter("pissa", {{"fc1", net.attr("fc1").toModule().attr("weight").toTensor()}}).adapter;
  adapter.config.init_lora_weights = "pissa_niter_4";
  auto expect_rejected = [](const std::string& message, const std::string& source) {
    EXPECT_NE(message.find("pissa_niter_4"), std::string::npos) << message;
    EXPECT_NE(message.find("path_initial_model_for_weight_conversion"), std::string::npos) << message;
    EXPECT_NE(message.find(source), std::string::npos) << message;
  };
  apply::LoraScriptModel model(net.deepcopy());
  expect_rejected(error_of([&] { model.add_adapter("n", adapter); }), "adapter 'n'");
  EXPECT_TRUE(model.adapter_names().empty());
  apply::ScriptModuleMerger merger(net);
  expect_rejected(error_of([&] { merger.merge(adapter); }), "adapter");
  EXPECT_FALSE(merger.merged());
  TinyNet tree;
  expect_rejected(error_of([&] { apply::load_adapter(*tree, adapter, "n"); }), "adapter");
  EXPECT_TRUE(apply::lora_layers(*tree).size() == 1 && !tree->fc2->has_adapter("n"));
  // Read from a folder: the loader rejects the file, naming the folder.
  const auto dir = std::filesystem::temp_directory_path() / ("torchlora_niter_" + std::to_string(::getpid()));
  adapter.config.init_lora_weights = "pissa";
  io::save_peft_adapter(dir.string(), adapter);
  auto json = io::adapter_config_to_json(adapter.config);
  json.replace(json.find("\"pissa\""), 7, "\"pissa_niter_4\"");
  std::ofstream((dir / "adapter_config.json").string(), std::ios::trunc) << json;
  expect_rejected(error_of([&] { io::load_peft_adapter(dir.string()); }), dir.string());
  std::filesystem::remove_all(dir);
}

// ------------------------------------------------------------------------- DoRA
// PEFT's DoRA for a Linear, written out with plain ATen: out = m / ||W + s B A||_row * (z - b) + b.
at::Tensor dora_linear_reference(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& m, double s) {
  const auto norm = (W + s * torch::matmul(B, A)).norm(2, {1});
  const auto z = torch::nn::functional::linear(x, W, b) + s * torch::matmul(torch::matmul(x, A.t()), B.t());
  return (m / norm) * (z - b) + b;
}

struct DoraNetImpl : torch::nn::Module {
  explicit DoraNetImpl(torch::nn::Linear base) { fc = register_module("fc", tnn::LoraLinear(base)); }
  tnn::LoraLinear fc{nullptr};
};
TORCH_MODULE(DoraNet);

TEST(Dora, LinearForwardMergeFilesAndPool) {
  torch::manual_seed(5);
  torch::nn::Linear base(torch::nn::LinearOptions(6, 4));
  base->to(torch::kDouble);
  io::LoraConfig config;
  config.r = 2;
  config.lora_alpha = 3;
  config.use_dora = true;
  config.target_modules = io::ModuleSelector::from_names({"fc"});
  const auto A = torch::randn({2, 6}, torch::kDouble), B = torch::randn({4, 2}, torch::kDouble);
  const auto m = torch::rand({4}, torch::kDouble) + 0.5;
  std::map<std::string, at::Tensor> state{{"base_model.model.fc.lora_A.weight", A},
                                          {"base_model.model.fc.lora_B.weight", B},
                                          {"base_model.model.fc.lora_magnitude_vector", m}};
  const auto adapter = io::adapter_from_state_dict(config, state, "memory");
  ASSERT_TRUE(adapter.modules.at("fc").magnitude.defined());
  // the writer gives the magnitude back under PEFT's key
  const auto written = io::adapter_state_dict(adapter);
  ASSERT_TRUE(written.count("base_model.model.fc.lora_magnitude_vector"));
  expect_close(written.at("base_model.model.fc.lora_magnitude_vector"), m, 0, 0);
  // every module needs its magnitude with use_dora, and none without
  auto missing = state;
  missing.erase("base_model.model.fc.lora_magnitude_vector");
  EXPECT_NE(error_of([&] { io::adapter_from_state_dict(config, missing, "memory"); }).find("use_dora=true needs"),
            std::string::npos);
  auto plain = config;
  plain.use_dora = false;
  EXPECT_NE(error_of([&] { io::adapter_from_state_dict(plain, state, "memory"); }).find("use_dora=false"),
            std::string::npos);

  DoraNet tree(base);
  apply::load_adapter(*tree, adapter, "a");
  apply::set_adapter(*tree, {"a"});
  auto layer = std::dynamic_pointer_cast<tnn::LoraLinearImpl>(apply::lora_layers(*tree).front().second);
  ASSERT_TRUE(layer);
  layer->eval();
  EXPECT_TRUE(layer->named_parameters().contains("lora_magnitude_vector.a.weight"));
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({3, 6}, torch::kDouble);
  const double s = 1.5;
  const auto want = dora_linear_reference(x, base->weight, base->bias, A, B, m, s);
  expect_close(layer->forward(x), want, 1e-10, 1e-12);
  const auto w0 = base->weight.clone();
  layer->merge(/*safe_merge=*/true);
  expect_close(layer->forward(x), want, 1e-10, 1e-12);
  layer->unmerge();
  expect_close(base->weight, w0, 1e-12, 1e-12);
  // mixed batch of the layer's own adapter and the base layer
  const auto mixed = layer->forward_mixed(x, {"a", "__base__", "a"});
  expect_close(mixed[1], base->forward(x)[1], 1e-12, 1e-12);
  expect_close(mixed[2], want[2], 1e-10, 1e-12);

  // the pool: a DoRA slot next to an empty one
  torchlora::serve::PoolOptions options;
  options.max_loras = 2;
  options.max_lora_rank = 2;
  options.dtype = torch::kDouble;
  torchlora::serve::AdapterPool pool(torchlora::serve::target_layers(*tree), options);
  pool.add("d", adapter);
  EXPECT_THROW(pool.acquire({{"d", 0.5}}), torchlora::serve::AdapterRejected);
  auto lease = pool.acquire({{"d", 1.0}, {"", 1.0}, {"d", 1.0}});
  EXPECT_TRUE(lease.uses_dora());
  {
    torchlora::serve::PoolBinding binding(*tree, pool, lease);
    const auto served = layer->forward(x);
    expect_close(served[0], want[0], 1e-10, 1e-12);
    expect_close(served[1], base->forward(x)[1], 1e-12, 1e-12);
    expect_close(served[2], want[2], 1e-10, 1e-12);
  }
}

}  // namespace

