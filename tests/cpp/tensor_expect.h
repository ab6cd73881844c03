// GoogleTest check shared by the C++ test files: two tensors of one shape, equal within tolerances.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

inline void expect_close(const at::Tensor& a, const at::Tensor& b, double rtol = 1e-5, double atol = 1e-6) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(at::allclose(a, b, rtol, atol)) << "max abs diff " << (a - b).abs().max().item<double>();
}
