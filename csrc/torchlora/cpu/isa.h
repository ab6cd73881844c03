// Which vector paths the CPU kernels take: the CPU's own ISA, capped by the environment
// variable TORCHLORA_CPU_ISA ("avx512", "avx2" or "scalar") so that every path can be tested
// on one machine. Read once, at first use.
#pragma once

namespace torchlora::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa cpu_isa();

}  // namespace torchlora::cpu
