// torchlora::lora_conv3d from C++ (no Python): forward and gradients against plain ATen
// convolutions, the dropout mask of dropout_apply, input errors; lora_delta_weight on 3-D and
// 5-D (Conv1d / Conv3d) factors.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <torchlora/conv3d_ops.h>
#include <torchlora/ops.h>

#include "tensor_expect.h"

namespace {

at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().set_requires_grad(true); }

struct Operands {
  at::Tensor x, base_out, A, B, bias;
};

Operands operands(int64_t groups) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  return {leaf(at::randn({2, 4, 3, 5, 5}, opts)), leaf(at::randn({2, 6, 2, 3, 3}, opts)),
          leaf(at::randn({4, 4, 2, 3, 3}, opts)), leaf(at::randn({6, 4 / groups, 1, 1, 1}, opts)),
          leaf(at::randn({6}, opts))};
}

at::Tensor reference(const Operands& o, const at::Tensor& dropped, int64_t groups, double scaling) {
  const auto h = at::conv3d(dropped, o.A, {}, {1, 2, 2}, {0, 1, 1});
  return o.base_out + scaling * at::conv3d(h, o.B, o.bias, {1, 1, 1}, {0, 0, 0}, {1, 1, 1}, groups);
}

TEST(LoraConv3d, ForwardAndBackwardMatchAtenConvolutions) {
  for (const int64_t groups : {1, 2}) {
    at::manual_seed(0);
    const Operands o = operands(groups);
    const auto out = torchlora::lora_conv3d(o.x, o.base_out, o.A, o.B, o.bias, {1, 2, 2}, {0, 1, 1}, {1, 1, 1},
                                            groups, 0.5);
    const auto go = at::randn_like(out);
    out.backward(go);
    const Operands r{leaf(o.x), leaf(o.base_out), leaf(o.A), leaf(o.B), leaf(o.bias)};
    const auto ref = reference(r, r.x, groups, 0.5);
    ref.backward(go);
    expect_close(out, ref);
    expect_close(o.x.grad(), r.x.grad());
    expect_close(o.base_out.grad(), r.base_out.grad());
    expect_close(o.A.grad(), r.A.grad());
    expect_close(o.B.grad(), r.B.grad());
    expect_close(o.bias.grad(), r.bias.grad());
  }
}

TEST(LoraConv3d, DropoutUsesTheDropoutApplyMask) {
  at::manual_seed(0);
  const Operands o = operands(1);
  const auto seed = torchlora::make_seed(at::kCPU);
  const auto out = torchlora::lora_conv3d(o.x, o.base_out, o.A, o.B, o.bias, {1, 2, 2}, {0, 1, 1}, {1, 1, 1}, 1,
                                          0.5, 0.3, seed);
  expect_close(out, reference(o, torchlora::dropout_apply(o.x, 0.3, seed), 1, 0.5));
}

TEST(LoraConv3d, RejectsBadInputs) {
  const Operands o = operands(1);
  auto call = [&](const at::Tensor& x, const at::Tensor& base_out, const at::Tensor& B, std::vector<int64_t> stride) {
    return torchlora::lora_conv3d(x, base_out, o.A, B, o.bias, stride, {0, 1, 1}, {1, 1, 1}, 1, 0.5);
  };
  EXPECT_THROW(call(o.x[0], o.base_out, o.B, {1, 2, 2}), c10::ValueError);                         // 4-D x
  EXPECT_THROW(call(o.x, o.base_out.narrow(2, 0, 1), o.B, {1, 2, 2}), c10::ValueError);            // shape
  EXPECT_THROW(call(o.x, o.base_out, o.B.narrow(1, 0, 3), {1, 2, 2}), c10::ValueError);            // rank
  EXPECT_THROW(call(o.x, o.base_out, o.B, {1, 0, 2}), c10::ValueError);                            // stride
  EXPECT_THROW(call(o.x, o.base_out, o.B.to(at::kFloat), {1, 2, 2}), c10::Error);                  // dtype
  EXPECT_THROW(torchlora::lora_conv3d(o.x, o.base_out, o.A, o.B, o.bias, {1, 2, 2}, {0, 1, 1}, {1, 1, 1}, 1, 0.5, 0.2),
               c10::Error);  // dropout without a seed
}

TEST(LoraDeltaWeight, ConvFactorsWithOneAndThreeKernelDimensions) {
  at::manual_seed(0);
  const auto A1 = at::randn({4, 3, 5}), B1 = at::randn({6, 4, 1});
  expect_close(torchlora::lora_delta_weight(A1, B1, 0.5),
               at::conv1d(A1.transpose(0, 1), B1).transpose(0, 1) * 0.5, 1e-5, 1e-5);
  const auto A3 = at::randn({4, 3, 2, 3, 3}), B3 = at::randn({6, 4, 1, 1, 1});
  expect_close(torchlora::lora_delta_weight(A3, B3, 0.5),
               at::conv3d(A3.transpose(0, 1), B3).transpose(0, 1) * 0.5, 1e-5, 1e-5);
  EXPECT_THROW(torchlora::lora_delta_weight(A3, at::randn({6, 4, 1, 1}), 0.5), c10::ValueError);
  EXPECT_THROW(torchlora::lora_delta_weight(A1, at::randn({6, 4, 2}), 0.5), c10::ValueError);
}

}  // namespace
