// What this copy of libtorchlora was built with, and which CPU path it runs.
#pragma once

#include <string>
#include <vector>

#include <torchlora/export.h>

namespace torchlora {

struct BuildInfo {
  std::string version;              // torchlora version
  std::string torch_version;        // torch headers it was compiled against
  bool cuda = false;                // CUDA kernels compiled in
  std::string cuda_version;         // nvcc version, empty without CUDA
  std::vector<std::string> cuda_architectures;  // e.g. {"8.0", "9.0"}
};

TORCHLORA_API BuildInfo build_info();

// The vector path the CPU kernels take in this process: "avx512", "avx2" or "scalar" (this
// CPU's best, capped by the environment variable TORCHLORA_CPU_ISA).
TORCHLORA_API const char* cpu_kernel_isa();

}  // namespace torchlora
