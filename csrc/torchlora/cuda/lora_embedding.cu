// CUDA kernels of lora_embedding. Forward is one kernel: the gather of A's columns
// h = A^T[ids] fused with the expand out = base_out + scaling h B^T (h, float32 [N, r], is
// stored for backward by the blocks of the first column tile). Backward (dB = scaling g^T h,
// dA by the dense embedding backward) stays on the ATen path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../detail/aten_math.h"
#include "../detail/checks.h"
#include "lowrank_kernels.cuh"

namespace torchlora::cuda {
namespace {

constexpr const char* kForwardOp = "torchlora._lora_embedding_forward";

std::tuple<at::Tensor, at::Tensor> lora_embedding_forward_cuda(const at::Tensor& ids,       // [...]
                                                               const at::Tensor& base_out,  // [..., D]
                                                               const at::Tensor& lora_A,    // [r, V]
                                                               const at::Tensor& lora_B,    // [D, r]
                                                               double scaling) {
  const auto dims = detail::check_lora_embedding(ids, base_out, lora_A, lora_B, scaling);
  const int64_t T = dims.tokens.expect_int(), V = dims.num_embeddings.expect_int();
  const int64_t R = dims.rank.expect_int(), D = dims.embedding_dim.expect_int();
  if (!has_kernel_dtype(lora_A.scalar_type()) || base_out.scalar_type() != lora_A.scalar_type() || T == 0 ||
      D == 0 || V == 0) {
    return detail::lora_embedding_forward_aten(ids, base_out, lora_A, lora_B, scaling);
  }
  const c10::cuda::CUDAGuard guard(base_out.device());
  const at::Tensor flat_ids = ids.reshape({T}).contiguous();
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const at::Tensor base2 = base_out.reshape({T, D}).contiguous();
  at::Tensor gathered = at::empty({T, R}, base2.options().dtype(at::kFloat));
  at::Tensor out = at::empty({T, D}, base2.options());
  dispatch_kernel_dtype(A.scalar_type(), kForwardOp, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    LowRankSource<scalar_t> src;
    src.table = A.const_data_ptr<scalar_t>();  // h[t, r] = A[r * V + ids[t]]
    src.table_stride_r = V;
    src.table_stride_v = 1;
    src.table_rows = V;
    if (flat_ids.scalar_type() == at::kLong) {
      src.ids64 = flat_ids.const_data_ptr<int64_t>();
    } else {
      src.ids32 = flat_ids.const_data_ptr<int32_t>();
    }
    src.write_back = gathered.mutable_data_ptr<float>();
    // B[d, r] = B[d * R + r]
    launch_expand<scalar_t>(out, &base2, src, R, B, R, 1, nullptr, static_cast<float>(scaling), DropoutParams{},
                            kForwardOp);
  });
  return {out.view(base_out.sizes()), gathered};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlora, CUDA, m) {
  m.impl("_lora_embedding_forward", &lora_embedding_forward_cuda);
  m.impl("_lora_embedding_backward", &torchlora::detail::lora_embedding_backward_aten);
}

}  // namespace torchlora::cuda
