// The multi-adapter operators called from C++ (no Python): a mixed batch against each row's
// adapter computed alone, gradients of several adapters trained in one batch, the in-place,
// fused, embedding and conv2d variants, and bad slot indices.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <torchlora/ops.h>

namespace {

void expect_close(const at::Tensor& actual, const at::Tensor& expected, double rtol = 1e-6, double atol = 1e-8) {
  ASSERT_EQ(actual.sizes(), expected.sizes());
  EXPECT_TRUE(at::allclose(actual, expected, rtol, atol))
      << "max abs diff " << (actual - expected).abs().max().item<double>();
}

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); }

struct Batch {
  at::Tensor x, base, A, B, bias, scale, slots;
};

Batch make_batch(int64_t T, int64_t S) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  Batch b{at::randn({T, 7}, opts), at::randn({T, 5}, opts), at::randn({S, 3, 7}, opts), at::randn({S, 5, 3}, opts),
          at::randn({S, 5}, opts), at::rand({S}, opts), at::randint(-1, S, {T}, at::kLong)};
  b.slots.narrow(0, 0, std::min<int64_t>(T, 12)).fill_(1);  // a run long enough for the GEMM path
  return b;
}

TEST(MultiLoraLinear, EveryRowTakesItsOwnAdapter) {
  at::manual_seed(0);
  auto b = make_batch(40, 4);
  auto out = torchlora::multi_lora_linear(b.x, b.base, b.A, b.B, b.bias, b.scale, b.slots);
  for (int64_t t = 0; t < 40; ++t) {
    const int64_t s = b.slots[t].item<int64_t>();
    at::Tensor expected = b.base[t];
    if (s >= 0) {
      auto row = torchlora::lora_linear(b.x[t].unsqueeze(0), b.base[t].unsqueeze(0), b.A[s], b.B[s], b.bias[s],
                                        b.scale[s].item<double>());
      expected = row[0];
    }
    expect_close(out[t], expected);
  }
  auto in_place = b.base.clone();
  torchlora::multi_lora_linear_(in_place, b.x, b.A, b.B, b.bias, b.scale, b.slots);
  expect_close(in_place, out);
  auto W = at::randn({5, 7}, at::kDouble);
  auto fused = torchlora::linear_with_multi_lora(b.x, W, std::nullopt, b.A, b.B, b.bias, b.scale, b.slots);
  expect_close(fused, torchlora::multi_lora_linear(b.x, at::matmul(b.x, W.t()), b.A, b.B, b.bias, b.scale, b.slots));
}

TEST(MultiLoraLinear, SeveralAdaptersTrainInOneBatch) {
  at::manual_seed(1);
  auto b = make_batch(30, 3);
  auto A = leaf(b.A), B = leaf(b.B), bias = leaf(b.bias), x = leaf(b.x);
  auto out = torchlora::multi_lora_linear(x, b.base, A, B, bias, b.scale, b.slots);
  auto go = at::randn_like(out);
  out.backward(go);
  for (int64_t s = 0; s < 3; ++s) {
    auto rows = at::nonzero(b.slots.eq(s)).flatten();
    auto As = leaf(b.A[s]), Bs = leaf(b.B[s]), bs = leaf(b.bias[s]);
    auto xs = b.x.index_select(0, rows);
    auto alone = torchlora::lora_linear(xs, b.base.index_select(0, rows), As, Bs, bs, b.scale[s].item<double>());
    alone.backward(go.index_select(0, rows));
    expect_close(A.grad()[s], As.grad());
    expect_close(B.grad()[s], Bs.grad());
    expect_close(bias.grad()[s], bs.grad());
  }
  auto unused = at::nonzero(b.slots.eq(-1)).flatten();
  expect_close(x.grad().index_select(0, unused), at::zeros({unused.numel(), 7}, at::kDouble));
}

TEST(MultiLoraEmbeddingAndConv2d, MatchSingleAdapterOps) {
  at::manual_seed(2);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto ids = at::randint(0, 11, {6}, at::kLong);
  auto A = at::randn({2, 3, 11}, opts), B = at::randn({2, 4, 3}, opts), scale = at::rand({2}, opts);
  auto base = at::randn({6, 4}, opts);
  auto slots = at::tensor({1, 1, 0, -1, 0, 1}, at::kLong);
  auto out = torchlora::multi_lora_embedding(ids, base, A, B, scale, slots);
  for (int64_t t = 0; t < 6; ++t) {
    const int64_t s = slots[t].item<int64_t>();
    auto expected = s < 0 ? base[t]
                          : torchlora::lora_embedding(ids[t].unsqueeze(0), base[t].unsqueeze(0), A[s], B[s],
                                                      scale[s].item<double>())[0];
    expect_close(out[t], expected);
  }
  auto x = at::randn({2, 3, 5, 5}, opts);
  auto cA = at::randn({2, 4, 3, 3, 3}, opts), cB = at::randn({2, 6, 4, 1, 1}, opts);
  auto cbase = at::randn({2, 6, 5, 5}, opts);
  auto cslots = at::tensor({1, 0}, at::kLong);
  auto cout = torchlora::multi_lora_conv2d(x, cbase, cA, cB, std::nullopt, scale, cslots, {1, 1}, {1, 1}, {1, 1}, 1);
  for (int64_t n = 0; n < 2; ++n) {
    const int64_t s = cslots[n].item<int64_t>();
    auto expected = torchlora::lora_conv2d(x[n].unsqueeze(0), cbase[n].unsqueeze(0), cA[s], cB[s], std::nullopt,
                                           {1, 1}, {1, 1}, {1, 1}, 1, scale[s].item<double>());
    expect_close(cout[n], expected[0]);
  }
}

TEST(MultiLoraLinear, BadSlotIndicesAreNamed) {
  auto b = make_batch(10, 2);
  b.slots[3] = 2;
  try {
    torchlora::multi_lora_linear(b.x, b.base, b.A, b.B, b.bias, b.scale, b.slots);
    FAIL() << "an out-of-range slot was accepted";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("slot_index[3] = 2 is out of range"), std::string::npos) << e.what();
  }
  EXPECT_THROW(torchlora::multi_lora_shrink(b.x, b.A, b.slots.to(at::kFloat)), c10::Error);
  EXPECT_THROW(torchlora::multi_lora_shrink(b.x, b.A, b.slots.narrow(0, 0, 9)), c10::Error);
}

}  // namespace
