# torch for the build of torchlora, through the module that the installed CMake package uses
# too (TorchLoraTorch.cmake).
#
# Input: TORCH_ROOT, the torch package folder (setup.py and scripts/dev-build.sh pass it;
# otherwise asked from Python). Output: torchlora_torch and, for CUDA builds of torch,
# torchlora_torch_cuda; TORCHLORA_TORCH_VERSION, TORCHLORA_TORCH_HAS_CUDA.
include(TorchLoraTorch)

if(NOT TORCH_ROOT AND NOT DEFINED ENV{TORCH_ROOT})
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
endif()
torchlora_find_torch_root(_torch_root)
if(NOT _torch_root)
  message(FATAL_ERROR "torchlora: ${_torch_root_MESSAGE}")
endif()
set(TORCH_ROOT "${_torch_root}" CACHE PATH "torch package folder (holds include/ and lib/)" FORCE)

torchlora_add_torch_targets(ROOT "${TORCH_ROOT}" TARGET torchlora_torch CUDA_TARGET torchlora_torch_cuda)
if(TORCHLORA_TORCH_ERROR)
  message(FATAL_ERROR "torchlora: ${TORCHLORA_TORCH_ERROR}")
endif()
message(STATUS "torchlora: torch ${TORCHLORA_TORCH_VERSION} at ${TORCH_ROOT} (CUDA build: ${TORCHLORA_TORCH_HAS_CUDA})")
