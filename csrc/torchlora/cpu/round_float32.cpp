#include "round_float32.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "isa.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TORCHLORA_ROUND_X86 1
#endif

namespace torchlora::cpu {
namespace {

template <typename Out>
void round_scalar(const float* src, Out* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(src[i]);
}

#ifdef TORCHLORA_ROUND_X86
// vcvtne2ps2bf16 rounds to nearest even, as c10::BFloat16 does (denormal inputs become zero).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void round_bf16_avx512(const float* src, c10::BFloat16* dst,
                                                                              int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)v);
  }
  round_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx512f"))) void round_f16_avx512(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i v = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), v);
  }
  round_scalar(src + i, dst + i, n - i);
}
#endif

void round_span(const float* src, c10::BFloat16* dst, int64_t n) {
#ifdef TORCHLORA_ROUND_X86
  if (cpu_isa() >= Isa::kAvx512Bf16) return round_bf16_avx512(src, dst, n);
#endif
  round_scalar(src, dst, n);
}

void round_span(const float* src, c10::Half* dst, int64_t n) {
#ifdef TORCHLORA_ROUND_X86
  if (cpu_isa() >= Isa::kAvx512) return round_f16_avx512(src, dst, n);
#endif
  round_scalar(src, dst, n);
}

template <typename Out>
void round_all(const at::Tensor& src, at::Tensor& dst) {
  const float* s = src.const_data_ptr<float>();
  Out* d = dst.mutable_data_ptr<Out>();
  // 64 KiB of output per task at least: a fork for less costs more than it saves
  at::parallel_for(0, src.numel(), int64_t{1} << 15, [&](int64_t b, int64_t e) { round_span(s + b, d + b, e - b); });
}

}  // namespace

void round_float32(const at::Tensor& src, at::Tensor& dst) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous() && src.device().is_cpu(),
              "round_float32: src must be a contiguous float32 CPU tensor, got ", src.scalar_type());
  TORCH_CHECK(dst.is_contiguous() && dst.numel() == src.numel() && dst.device().is_cpu(),
              "round_float32: dst must be a contiguous CPU tensor of ", src.numel(), " elements");
  if (dst.scalar_type() == at::kBFloat16) return round_all<c10::BFloat16>(src, dst);
  TORCH_CHECK(dst.scalar_type() == at::kHalf, "round_float32: dst must be bfloat16 or float16, got ",
              dst.scalar_type());
  round_all<c10::Half>(src, dst);
}

}  // namespace torchlora::cpu
