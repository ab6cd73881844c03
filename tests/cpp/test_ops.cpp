// The torchlora operators called from C++ (no Python): forward and backward against
// reference formulas written with plain ATen, dropout mask regeneration, and input errors.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include <torchlora/build_info.h>
#include <torchlora/ops.h>

namespace {

void expect_close(const at::Tensor& actual, const at::Tensor& expected, double rtol = 1e-5, double atol = 1e-6) {
  ASSERT_EQ(actual.sizes(), expected.sizes());
  EXPECT_TRUE(at::allclose(actual, expected, rtol, atol))
      << "max abs diff " << (actual - expected).abs().max().item<double>();
}

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); }

TEST(LoraLinear, ForwardAndBackwardMatchReference) {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = leaf(at::randn({2, 5, 7}, opts));
  auto W = at::randn({3, 7}, opts);
  auto A = leaf(at::randn({4, 7}, opts));
  auto B = leaf(at::randn({3, 4}, opts));
  auto bias = leaf(at::randn({3}, opts));
  const double scaling = 0.75;

  auto base = at::matmul(x, W.t());
  auto out = torchlora::lora_linear(x, base, A, B, bias, scaling);
  auto go = at::randn_like(out);
  out.backward(go);

  auto xr = leaf(x), Ar = leaf(A), Br = leaf(B), br = leaf(bias);
  auto ref = at::matmul(xr, W.t()) + scaling * (at::matmul(at::matmul(xr, Ar.t()), Br.t()) + br);
  ref.backward(go);
  expect_close(out, ref);
  expect_close(x.grad(), xr.grad());
  expect_close(A.grad(), Ar.grad());
  expect_close(B.grad(), Br.grad());
  expect_close(bias.grad(), br.grad());
}

TEST(LoraLinear, DropoutMaskIsRegeneratedInBackward) {
  at::manual_seed(1);
  auto x = leaf(at::randn({64, 32}, at::kDouble));
  auto A = leaf(at::randn({8, 32}, at::kDouble));
  auto B = leaf(at::randn({16, 8}, at::kDouble));
  auto base = at::zeros({64, 16}, at::kDouble);
  auto seed = torchlora::make_seed(at::kCPU);
  const double p = 0.3;
  auto out = torchlora::lora_linear(x, base, A, B, std::nullopt, 2.0, p, seed);
  auto go = at::randn_like(out);
  out.backward(go);

  // The same mask, materialised: dropout_apply of ones gives mask / (1 - p).
  auto mask = torchlora::dropout_apply(at::ones_like(x), p, seed).detach();
  auto xr = leaf(x), Ar = leaf(A), Br = leaf(B);
  auto ref = 2.0 * at::matmul(at::matmul(xr * mask, Ar.t()), Br.t());
  ref.backward(go);
  expect_close(out, ref);
  expect_close(x.grad(), xr.grad());
  expect_close(A.grad(), Ar.grad());
  expect_close(B.grad(), Br.grad());
  const double kept = (mask > 0).to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(kept, 1.0 - p, 0.05);
}

TEST(LoraLinear, BadInputsRaise) {
  auto x = at::randn({4, 6});
  auto A = at::randn({2, 6});
  auto B = at::randn({5, 2});
  auto base = at::randn({4, 5});
  EXPECT_THROW(torchlora::lora_linear(x, base, at::randn({2, 7}), B, std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(torchlora::lora_linear(x, base, A, at::randn({5, 3}), std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(torchlora::lora_linear(x, at::randn({4, 4}), A, B, std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(torchlora::lora_linear(x, base, A.to(at::kDouble), B, std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(torchlora::lora_linear(x, base, A, B, std::nullopt, 1.0, 0.5), c10::Error);  // no seed
  EXPECT_THROW(torchlora::lora_linear(x, base, A, B, std::nullopt, 1.0, 1.0, torchlora::make_seed(at::kCPU)),
               c10::Error);
  try {
    torchlora::lora_linear(x, base, at::randn({2, 7}), B, std::nullopt, 1.0);
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("lora_A"), std::string::npos);
  }
}

// The frozen linear layer and its adapter as one op, in float32 (the AVX-512 kernels where the
// CPU has them) and float64, with dropout, against plain ATen with the same mask materialised.
TEST(LinearWithLora, ForwardAndBackwardMatchReference) {
  at::manual_seed(2);
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    for (const double p : {0.0, 0.1}) {
      const auto opts = at::TensorOptions().dtype(dtype);
      auto x = leaf(at::randn({3, 11, 37}, opts));
      auto W = leaf(at::randn({29, 37}, opts));
      auto bias = leaf(at::randn({29}, opts));
      auto A = leaf(at::randn({5, 37}, opts));
      auto B = leaf(at::randn({29, 5}, opts));
      auto lora_bias = leaf(at::randn({29}, opts));
      auto seed = torchlora::make_seed(at::kCPU);
      const double scaling = 1.5;
      auto out = torchlora::linear_with_lora(x, W, bias, A, B, lora_bias, scaling, p, seed);
      auto go = at::randn_like(out);
      out.backward(go);

      auto keep = p > 0.0 ? torchlora::dropout_apply(at::ones_like(x), p, seed).detach() : at::ones_like(x);
      auto xr = leaf(x), Wr = leaf(W), br = leaf(bias), Ar = leaf(A), Br = leaf(B), lbr = leaf(lora_bias);
      auto ref = at::linear(xr, Wr, br) + scaling * (at::matmul(at::matmul(xr * keep, Ar.t()), Br.t()) + lbr);
      ref.backward(go);
      const double tol = dtype == at::kFloat ? 1e-4 : 1e-10;
      expect_close(out, ref, tol, tol);
      for (auto [got, want] : {std::pair{x, xr}, {W, Wr}, {bias, br}, {A, Ar}, {B, Br}, {lora_bias, lbr}}) {
        expect_close(got.grad(), want.grad(), tol, tol);
      }
    }
  }
}

// torch.autocast("cpu", dtype) for a scope, as C++ callers enable it.
class CpuAutocast {
 public:
  explicit CpuAutocast(at::ScalarType dtype)
      : was_enabled_(at::autocast::is_autocast_enabled(at::kCPU)), was_dtype_(at::autocast::get_autocast_dtype(at::kCPU)) {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, dtype);
  }
  ~CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, was_enabled_);
    at::autocast::set_autocast_dtype(at::kCPU, was_dtype_);
    at::autocast::clear_cache();
  }

 private:
  bool was_enabled_;
  at::ScalarType was_dtype_;
};

// torch.autocast from C++: the op runs in the autocast dtype, with the numbers of the op called
// on inputs cast by hand, and its gradients flow back to the float32 leaves.
TEST(LinearWithLora, RunsUnderAutocastInTheAutocastDtype) {
  at::manual_seed(3);
  auto x = leaf(at::randn({6, 40}));
  auto W = at::randn({24, 40}), bias = at::randn({24});
  auto A = leaf(at::randn({4, 40})), B = leaf(at::randn({24, 4}));
  at::Tensor out;
  {
    const CpuAutocast autocast(at::kBFloat16);
    out = torchlora::linear_with_lora(x, W, bias, A, B, std::nullopt, 2.0);
  }
  ASSERT_EQ(out.scalar_type(), at::kBFloat16);
  const auto bf = [](const at::Tensor& t) { return t.detach().to(at::kBFloat16); };
  const auto want = torchlora::linear_with_lora(bf(x), bf(W), bf(bias), bf(A), bf(B), std::nullopt, 2.0);
  EXPECT_TRUE(at::equal(out, want));
  out.to(at::kFloat).sum().backward();
  for (const auto& leaf_tensor : {x, A, B}) {
    ASSERT_TRUE(leaf_tensor.grad().defined());
    EXPECT_EQ(leaf_tensor.grad().scalar_type(), at::kFloat);
  }
}

TEST(LinearWithLora, BadInputsRaise) {
  auto x = at::randn({4, 6});
  auto A = at::randn({2, 6});
  auto B = at::randn({5, 2});
  EXPECT_THROW(torchlora::linear_with_lora(x, at::randn({5, 7}), std::nullopt, A, B, std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(torchlora::linear_with_lora(x, at::randn({4, 6}), std::nullopt, A, B, std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(torchlora::linear_with_lora(x, at::randn({5, 6}), at::randn({4}), A, B, std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(torchlora::linear_with_lora(x, at::randn({5, 6}), std::nullopt, A, B, std::nullopt, 1.0, 0.5), c10::Error);
}

TEST(LoraEmbedding, ForwardAndBackwardMatchReference) {
  at::manual_seed(2);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto ids = at::randint(0, 11, {3, 5}, at::kLong);
  auto W = at::randn({11, 6}, opts);
  auto A = leaf(at::randn({4, 11}, opts));
  auto B = leaf(at::randn({6, 4}, opts));
  auto base = at::embedding(W, ids);
  auto out = torchlora::lora_embedding(ids, base, A, B, 0.5, /*padding_idx=*/2, false);
  auto go = at::randn_like(out);
  out.backward(go);

  auto Ar = leaf(A), Br = leaf(B);
  auto ref = base + 0.5 * at::matmul(at::embedding(Ar.t(), ids, 2), Br.t());
  ref.backward(go);
  expect_close(out, ref);
  expect_close(A.grad(), Ar.grad());
  expect_close(B.grad(), Br.grad());
}

TEST(LoraConv2d, ForwardAndBackwardMatchReference) {
  at::manual_seed(3);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = leaf(at::randn({2, 4, 9, 7}, opts));
  auto W = at::randn({6, 4, 3, 3}, opts);
  auto A = leaf(at::randn({4, 4, 3, 3}, opts));
  auto B = leaf(at::randn({6, 2, 1, 1}, opts));  // groups = 2
  auto bias = leaf(at::randn({6}, opts));
  auto base = at::conv2d(x, W, {}, 2, 1);
  auto out = torchlora::lora_conv2d(x, base, A, B, bias, {2, 2}, {1, 1}, {1, 1}, 2, 1.5);
  auto go = at::randn_like(out);
  out.backward(go);

  auto xr = leaf(x), Ar = leaf(A), Br = leaf(B), br = leaf(bias);
  auto ref = at::conv2d(xr, W, {}, 2, 1) + 1.5 * at::conv2d(at::conv2d(xr, Ar, {}, 2, 1), Br, br, at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, 2);
  ref.backward(go);
  expect_close(out, ref);
  expect_close(x.grad(), xr.grad());
  expect_close(A.grad(), Ar.grad());
  expect_close(B.grad(), Br.grad());
  expect_close(bias.grad(), br.grad());
}

TEST(LoraConv2d, RankNotDivisibleByGroupsRaises) {
  auto x = at::randn({1, 4, 5, 5});
  auto base = at::randn({1, 6, 5, 5});
  EXPECT_THROW(torchlora::lora_conv2d(x, base, at::randn({3, 4, 1, 1}), at::randn({6, 1, 1, 1}), std::nullopt,
                                      {1, 1}, {0, 0}, {1, 1}, 2, 1.0),
               c10::Error);
}

// PEFT's get_delta_weight, written with plain ATen: B @ A (transposed for weights stored
// [in, out]), and for conv factors the squeezed matmul (1x1) or conv2d(A^T, B)^T (k x k).
at::Tensor peft_delta(const at::Tensor& A, const at::Tensor& B, double scaling, bool fan_in_fan_out) {
  if (A.dim() == 2) {
    const auto delta = at::matmul(B, A) * scaling;
    return fan_in_fan_out ? delta.t() : delta;
  }
  if (A.size(2) == 1 && A.size(3) == 1) {
    return at::matmul(B.squeeze(3).squeeze(2), A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling;
  }
  return at::conv2d(A.transpose(0, 1), B).transpose(0, 1) * scaling;
}

TEST(LoraDeltaWeight, EveryLayoutMatchesPeftFormulaWithGradients) {
  at::manual_seed(4);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  struct Case {
    std::vector<int64_t> a, b;
    bool fan_in_fan_out;
  };
  const std::vector<Case> cases = {
      {{3, 7}, {5, 3}, false},              // Linear [out, in]
      {{3, 7}, {5, 3}, true},               // Conv1D / Embedding [in, out]
      {{4, 6, 1, 1}, {5, 4, 1, 1}, false},  // conv 1x1
      {{2, 3, 3, 2}, {4, 2, 1, 1}, false},  // conv 3x2
  };
  for (const auto& c : cases) {
    auto A = leaf(at::randn(c.a, opts));
    auto B = leaf(at::randn(c.b, opts));
    auto delta = torchlora::lora_delta_weight(A, B, 0.75, c.fan_in_fan_out);
    EXPECT_EQ(delta.scalar_type(), at::kDouble);
    EXPECT_TRUE(delta.is_contiguous());
    auto go = at::randn_like(delta);
    delta.backward(go);
    auto Ar = leaf(A), Br = leaf(B);
    auto ref = peft_delta(Ar, Br, 0.75, c.fan_in_fan_out);
    ref.backward(go);
    expect_close(delta, ref, 1e-12, 1e-12);
    expect_close(A.grad(), Ar.grad(), 1e-12, 1e-12);
    expect_close(B.grad(), Br.grad(), 1e-12, 1e-12);
  }
}

TEST(LoraDeltaWeight, HalfFactorsAreMultipliedInFloat32AndRoundedOnce) {
  at::manual_seed(5);
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    const auto A = at::randn({8, 33}).to(dtype);
    const auto B = at::randn({17, 8}).to(dtype);
    const auto expected = (at::matmul(B.to(at::kFloat), A.to(at::kFloat)) * 0.5).to(dtype);
    // A scaling of 0.5 is exact, so where the op applies it does not change a bit.
    const auto delta = torchlora::lora_delta_weight(A, B, 0.5);
    EXPECT_EQ(delta.scalar_type(), dtype);
    EXPECT_TRUE(at::equal(delta, expected));
    // With dtype=float32 nothing is rounded to half precision.
    const auto wide = torchlora::lora_delta_weight(A, B, 0.5, /*fan_in_fan_out=*/false, at::kFloat);
    EXPECT_EQ(wide.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(wide, at::matmul(B.to(at::kFloat), A.to(at::kFloat)) * 0.5));
  }
}

TEST(LoraDeltaWeight, BadInputsRaise) {
  const auto A = at::randn({2, 6});
  const auto B = at::randn({5, 2});
  EXPECT_THROW(torchlora::lora_delta_weight(A, at::randn({5, 3}), 1.0), c10::ValueError);  // rank
  EXPECT_THROW(torchlora::lora_delta_weight(A, B.to(at::kDouble), 1.0), c10::TypeError);  // dtypes differ
  EXPECT_THROW(torchlora::lora_delta_weight(A.to(at::kInt), B.to(at::kInt), 1.0), c10::TypeError);
  EXPECT_THROW(torchlora::lora_delta_weight(A, B.unsqueeze(2).unsqueeze(3), 1.0), c10::ValueError);  // 2-D with 4-D
  EXPECT_THROW(torchlora::lora_delta_weight(A, B, std::nan("")), c10::Error);
  EXPECT_THROW(torchlora::lora_delta_weight(A, B, 1.0, false, at::kLong), c10::TypeError);
  const auto convA = at::randn({4, 3, 3, 3});
  EXPECT_THROW(torchlora::lora_delta_weight(convA, at::randn({6, 4, 1, 1}), 1.0, /*fan_in_fan_out=*/true),
               c10::ValueError);
  EXPECT_THROW(torchlora::lora_delta_weight(convA, at::randn({6, 4, 3, 3}), 1.0), c10::ValueError);  // B not 1x1
  EXPECT_THROW(torchlora::lora_delta_weight(convA, at::randn({6, 3, 1, 1}), 1.0), c10::ValueError);  // 4 % 3
  // groups = 2: no delta in the grouped base weight's layout.
  EXPECT_THROW(torchlora::lora_delta_weight(convA, at::randn({6, 2, 1, 1}), 1.0), c10::NotImplementedError);
}

TEST(BuildInfo, ReportsTorchVersion) {
  const auto info = torchlora::build_info();
  EXPECT_FALSE(info.version.empty());
  EXPECT_FALSE(info.torch_version.empty());
  EXPECT_EQ(info.cuda, !info.cuda_architectures.empty());
}

}  // namespace

namespace {

// ||W + s B A|| per output row with the matrix formed (PEFT's statement), rows of W^T for fan_in_fan_out.
at::Tensor formed_dora_norm(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double s,
                            bool fan_in_fan_out) {
  const auto rows = W.dim() == 2 ? (fan_in_fan_out ? W.t() : W) : W.flatten(1);
  return (rows + s * at::mm(B.flatten(1), A.flatten(1))).norm(2, {1});
}

}  // namespace

TEST(DoraWeightNorm, MatchesTheFormedMatrixWithGradients) {
  at::manual_seed(6);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  struct Case {
    std::vector<int64_t> w, a, b;
    bool fan_in_fan_out;
  };
  const std::vector<Case> cases = {
      {{9, 7}, {3, 7}, {9, 3}, false},                 // Linear [out, in]
      {{7, 9}, {3, 7}, {9, 3}, true},                  // Conv1D / Embedding [in, out]
      {{5, 4, 3, 3}, {2, 4, 3, 3}, {5, 2, 1, 1}, false},  // conv 3x3
  };
  for (const auto& c : cases) {
    auto W = leaf(at::randn(c.w, opts)), A = leaf(at::randn(c.a, opts)), B = leaf(at::randn(c.b, opts));
    auto n = torchlora::dora_weight_norm(W, A, B, 0.75, c.fan_in_fan_out);
    EXPECT_EQ(n.scalar_type(), at::kDouble);
    auto go = at::randn_like(n);
    n.backward(go);
    auto Wr = leaf(W), Ar = leaf(A), Br = leaf(B);
    auto ref = formed_dora_norm(Wr, Ar, Br, 0.75, c.fan_in_fan_out);
    ref.backward(go);
    expect_close(n, ref, 1e-10, 1e-10);
    expect_close(W.grad(), Wr.grad(), 1e-10, 1e-10);
    expect_close(A.grad(), Ar.grad(), 1e-10, 1e-10);
    expect_close(B.grad(), Br.grad(), 1e-10, 1e-10);
    // The cached ||W||^2 gives the same norm.
    const auto sq = torchlora::dora_weight_sq_norm(W.detach(), c.fan_in_fan_out);
    expect_close(torchlora::dora_weight_norm(W.detach(), A.detach(), B.detach(), 0.75, c.fan_in_fan_out, sq),
                 ref.detach(), 1e-10, 1e-10);
  }
}

TEST(DoraScale, MatchesTheFormula) {
  at::manual_seed(7);
  const auto z = at::randn({2, 5, 3, 4}), m = at::rand({5}) + 0.5, n = at::rand({5}) + 0.5, b = at::randn({5});
  const auto out = torchlora::dora_scale(z, m, n, b, 1);
  const auto g = (m / n).view({1, 5, 1, 1});
  expect_close(out, g * (z - b.view({1, 5, 1, 1})) + b.view({1, 5, 1, 1}));
  EXPECT_THROW(torchlora::dora_scale(z, m, n, b, -1), c10::Error);  // z's last dim is 4, not 5
}
