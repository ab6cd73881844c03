// Which vector paths the CPU kernels take: the CPU's own ISA, capped by the environment
// variable TORCHLORA_CPU_ISA ("avx512_bf16", "avx512", "avx2" or "scalar") so that every path can be tested
// on one machine. Read once, at first use.
#pragma once

// Before a loop over a register tile's or a kernel's compile-time extent: unrolled, its values
// stay in registers. Left as a loop, GCC keeps such arrays of vectors on the stack (and zeroes
// them with rep stos), which measured 30-40% of a kernel's time.
#define TORCHLORA_UNROLLED _Pragma("GCC unroll 64")

namespace torchlora::cpu {

// kAvx512Bf16: AVX-512 with the bfloat16 dot product (vdpbf16ps) as well.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

Isa cpu_isa();

}  // namespace torchlora::cpu
