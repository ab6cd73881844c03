#include "isa.h"

#include <torchlora/build_info.h>

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace torchlora::cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // Both vector paths use BMI2 (pdep) next to the vector ISA.
  if (!__builtin_cpu_supports("bmi2")) return Isa::kScalar;
  // The 16-bit rows of the masked kernels load and store through AVX-512 BW/VL.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa cap_from_environment() {
  const char* value = std::getenv("TORCHLORA_CPU_ISA");
  if (value == nullptr || *value == '\0') return Isa::kAvx512Bf16;
  const std::string isa(value);
  if (isa == "avx512_bf16") return Isa::kAvx512Bf16;
  if (isa == "avx512") return Isa::kAvx512;
  if (isa == "avx2") return Isa::kAvx2;
  if (isa == "scalar") return Isa::kScalar;
  TORCH_CHECK(false, "TORCHLORA_CPU_ISA must be avx512_bf16, avx512, avx2 or scalar, got '", isa, "'");
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = [] {
    const Isa cpu = detect(), cap = cap_from_environment();
    return static_cast<int>(cpu) < static_cast<int>(cap) ? cpu : cap;
  }();
  return isa;
}

}  // namespace torchlora::cpu

namespace torchlora {

const char* cpu_kernel_isa() {
  switch (cpu::cpu_isa()) {
    case cpu::Isa::kAvx512Bf16:
      return "avx512_bf16";
    case cpu::Isa::kAvx512:
      return "avx512";
    case cpu::Isa::kAvx2:
      return "avx2";
    case cpu::Isa::kScalar:
      break;
  }
  return "scalar";
}

}  // namespace torchlora
