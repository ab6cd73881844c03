// LoRA on parameters (target_parameters, fused MoE expert weights) and trainable token rows
// (trainable_token_indices) in the C++ core, with no Python in the process: the per-expert delta
// against its formula, PEFT's nesting of several parameters of one module, merging into named
// parameters, and the rows written into a C++ module tree's embedding.
#include <torch/torch.h>

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include <torchlora/apply/trainable_tokens.h>
#include <torchlora/io/adapter_config.h>
#include <torchlora/io/parameter_adapters.h>
#include <torchlora/io/trainable_tokens.h>
#include <torchlora/peft/parameter_lora.h>

namespace {

namespace io = torchlora::io;
namespace peft = torchlora::peft;

// expert e's delta: scaling * B[:, e::E-interleaved] @ A[e * r:(e + 1) * r], as [out, in]
torch::Tensor expert_delta(const torch::Tensor& a, const torch::Tensor& b, int64_t e, int64_t experts, double s) {
  const int64_t r = a.size(0) / experts;
  const auto a_e = a.slice(0, e * r, (e + 1) * r);
  const auto b_e = b.reshape({b.size(0), r, experts}).select(2, e);
  return torch::mm(b_e, a_e) * s;
}

TEST(ParameterLora, DeltaPerExpertInBothLayouts) {
  torch::manual_seed(0);
  const auto a = torch::randn({6, 5});  // r = 2, 3 experts, in = 5
  const auto b = torch::randn({4, 6});  // out = 4
  const auto d = peft::parameter_delta_weight(a, b, 0.5, {3, 4, 5}, false);
  const auto t = peft::parameter_delta_weight(a, b, 0.5, {3, 5, 4}, true);
  for (int64_t e = 0; e < 3; ++e) {
    EXPECT_TRUE(torch::allclose(d[e], expert_delta(a, b, e, 3, 0.5), 1e-5, 1e-6));
    EXPECT_TRUE(torch::allclose(t[e], expert_delta(a, b, e, 3, 0.5).t(), 1e-5, 1e-6));
  }
  EXPECT_THROW(peft::parameter_delta_weight(a, b, 0.5, {3, 5, 5}, false), c10::ValueError);
  EXPECT_THROW(peft::parameter_lora_shape({4}, false), c10::ValueError);
  EXPECT_TRUE(peft::parameter_is_targeted("m.experts.down_proj", {"experts.down_proj"}));
  EXPECT_FALSE(peft::parameter_is_targeted("m.myexperts.down_proj", {"experts.down_proj"}));
  int64_t depth = 0;
  EXPECT_EQ(peft::strip_base_layer("m.experts.base_layer.base_layer", &depth), "m.experts");
  EXPECT_EQ(depth, 2);
}

TEST(ParameterLora, NestedModulesMergeIntoTheirParameters) {
  torch::manual_seed(1);
  io::PeftAdapter adapter;
  adapter.config = io::parse_adapter_config(
      R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [],
          "target_parameters": ["experts.up", "experts.down"]})");
  // experts.up [3, 8, 4] (first registered: innermost), experts.down [3, 4, 8] (outermost)
  io::LoraModuleWeights inner, outer;
  inner.lora_A = torch::randn({6, 4});
  inner.lora_B = torch::randn({8, 6});
  outer.lora_A = torch::randn({6, 8});
  outer.lora_B = torch::randn({4, 6});
  adapter.modules["m.experts"] = outer;
  adapter.modules["m.experts.base_layer"] = inner;
  auto up = torch::randn({3, 8, 4});
  auto down = torch::randn({3, 4, 8});
  const auto up0 = up.clone(), down0 = down.clone();
  const std::vector<std::pair<std::string, torch::Tensor>> params = {
      {"m.experts.up", up}, {"m.experts.down", down}, {"m.other.weight", torch::randn({2, 2})}};
  const auto changed = io::merge_parameter_adapters(adapter, params);
  EXPECT_EQ(changed.size(), 2u);
  for (int64_t e = 0; e < 3; ++e) {
    EXPECT_TRUE(torch::allclose(up[e], up0[e] + expert_delta(inner.lora_A, inner.lora_B, e, 3, 2.0), 1e-5, 1e-5));
    EXPECT_TRUE(torch::allclose(down[e], down0[e] + expert_delta(outer.lora_A, outer.lora_B, e, 3, 2.0), 1e-5, 1e-5));
  }
  io::merge_parameter_adapters(adapter, params, {}, -1.0);
  EXPECT_TRUE(torch::allclose(up, up0, 1e-5, 1e-5));
  // factors that do not fit the parameter are refused by name
  const std::vector<std::pair<std::string, torch::Tensor>> wrong = {{"m.experts.up", torch::randn({3, 8, 5})},
                                                                    {"m.experts.down", torch::randn({3, 4, 8})}};
  try {
    io::merge_parameter_adapters(adapter, wrong);
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("m.experts.up"), std::string::npos);
  }
}

TEST(TrainableTokens, RowsFromTheFileReplaceEmbeddingRows) {
  torch::manual_seed(2);
  io::PeftAdapter adapter;
  adapter.config = io::parse_adapter_config(
      R"({"peft_type": "LORA", "target_modules": ["fc"], "trainable_token_indices": [1, 3]})");
  const auto values = torch::randn({2, 4});
  adapter.other_tensors["emb.token_adapter.trainable_tokens_delta"] = values;
  const auto rows = io::trainable_token_rows(adapter, "test");
  ASSERT_EQ(rows.count("emb"), 1u);
  EXPECT_EQ(rows.at("emb").indices, (std::vector<int64_t>{1, 3}));

  torch::nn::Module root;
  auto emb = root.register_module("emb", torch::nn::Embedding(6, 4));
  const auto before = emb->weight.clone();
  torchlora::apply::write_trainable_tokens(root, rows);
  EXPECT_TRUE(torch::equal(emb->weight[1], values[0]));
  EXPECT_TRUE(torch::equal(emb->weight[3], values[1]));
  EXPECT_TRUE(torch::equal(emb->weight[0], before[0]));

  io::TrainableTokenRows outside{{9}, torch::randn({1, 4})};
  EXPECT_THROW(io::with_trainable_tokens(emb->weight, outside, "emb"), c10::ValueError);
  adapter.config = io::parse_adapter_config(R"({"peft_type": "LORA", "target_modules": ["fc"]})");
  EXPECT_THROW(io::trainable_token_rows(adapter, "test"), c10::ValueError);
}

}  // namespace
