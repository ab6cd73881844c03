#include <torchlora/build_info.h>

#include <sstream>

#include "torchlora_build_config.h"

namespace torchlora {

BuildInfo build_info() {
  BuildInfo info;
  info.version = TORCHLORA_VERSION;
  info.torch_version = TORCHLORA_TORCH_VERSION;
  info.cuda = TORCHLORA_WITH_CUDA != 0;
  info.cuda_version = TORCHLORA_CUDA_VERSION;
  std::stringstream archs(TORCHLORA_CUDA_ARCHS);
  for (std::string arch; std::getline(archs, arch, ';');) {
    if (!arch.empty()) info.cuda_architectures.push_back(arch);
  }
  return info;
}

}  // namespace torchlora
