# Imported targets for the installed torch, built from its package folder rather than from
# Torch's own CMake config: that config insists on a complete CUDA toolkit (cuBLAS, NVRTC,
# ...) whenever torch is a CUDA build, which breaks CPU-only builds against the default
# PyPI wheel and toolkits whose libraries ship as pip packages.
#
# Input: TORCH_ROOT, the torch package folder (setup.py passes it; otherwise asked from
# Python). Output: torchlora_torch (c10, torch_cpu, torch) and, for CUDA builds of torch,
# torchlora_torch_cuda (c10_cuda, torch_cuda); TORCHLORA_TORCH_VERSION,
# TORCHLORA_TORCH_HAS_CUDA, TORCHLORA_TORCH_CUDA_VERSION.

if(NOT TORCH_ROOT)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c "import os, torch; print(os.path.dirname(torch.__file__))"
    OUTPUT_VARIABLE TORCH_ROOT OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "torchlora: could not import torch with ${Python3_EXECUTABLE}; pass -DTORCH_ROOT=<torch package folder>")
  endif()
endif()
set(TORCH_ROOT "${TORCH_ROOT}" CACHE PATH "torch package folder (holds include/ and lib/)")

if(NOT EXISTS "${TORCH_ROOT}/include/ATen/ATen.h" OR NOT EXISTS "${TORCH_ROOT}/lib")
  message(FATAL_ERROR "torchlora: TORCH_ROOT=${TORCH_ROOT} does not look like a torch install (no include/ATen/ATen.h)")
endif()

# torch 2.11-2.14 keep the version macros in one of these two headers.
set(TORCHLORA_TORCH_VERSION "unknown")
foreach(_vh "${TORCH_ROOT}/include/torch/headeronly/version.h"
            "${TORCH_ROOT}/include/torch/csrc/api/include/torch/version.h")
  if(EXISTS "${_vh}")
    file(STRINGS "${_vh}" _vl REGEX "#define TORCH_VERSION_(MAJOR|MINOR|PATCH) [0-9]+")
    if(_vl)
      string(REGEX REPLACE ".*MAJOR ([0-9]+).*" "\\1" _maj "${_vl}")
      string(REGEX REPLACE ".*MINOR ([0-9]+).*" "\\1" _min "${_vl}")
      string(REGEX REPLACE ".*PATCH ([0-9]+).*" "\\1" _pat "${_vl}")
      set(TORCHLORA_TORCH_VERSION "${_maj}.${_min}.${_pat}")
      break()
    endif()
  endif()
endforeach()

function(_torchlora_import_lib name)
  find_library(_path_${name} NAMES ${name} PATHS "${TORCH_ROOT}/lib" NO_DEFAULT_PATH)
  if(NOT _path_${name})
    message(FATAL_ERROR "torchlora: lib${name}.so not found in ${TORCH_ROOT}/lib")
  endif()
  add_library(torchlora_imported_${name} SHARED IMPORTED)
  set_target_properties(torchlora_imported_${name} PROPERTIES IMPORTED_LOCATION "${_path_${name}}")
endfunction()

foreach(_lib c10 torch_cpu torch)
  _torchlora_import_lib(${_lib})
endforeach()

add_library(torchlora_torch INTERFACE)
target_include_directories(torchlora_torch SYSTEM INTERFACE
  "${TORCH_ROOT}/include" "${TORCH_ROOT}/include/torch/csrc/api/include")
target_link_libraries(torchlora_torch INTERFACE
  torchlora_imported_c10 torchlora_imported_torch_cpu torchlora_imported_torch)
# torch is built with the new libstdc++ ABI from 2.7 on; ask it rather than assume.
set(_abi 1)
if(EXISTS "${TORCH_ROOT}/share/cmake/Caffe2/Caffe2Targets.cmake")
  file(STRINGS "${TORCH_ROOT}/share/cmake/Caffe2/Caffe2Targets.cmake" _abi_line REGEX "_GLIBCXX_USE_CXX11_ABI=0")
  if(_abi_line)
    set(_abi 0)
  endif()
endif()
target_compile_definitions(torchlora_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_abi})

# at::parallel_for is inline code: with torch's OpenMP backend its "#pragma omp parallel" is
# compiled into our objects, so they need -fopenmp (without it the loops run on one thread)
# and torch's own OpenMP runtime (one runtime per process).
file(STRINGS "${TORCH_ROOT}/include/ATen/Config.h" _omp_line REGEX "#define AT_PARALLEL_OPENMP 1")
if(_omp_line)
  file(GLOB _torch_gomp "${TORCH_ROOT}/lib/libgomp*.so*")
  target_compile_options(torchlora_torch INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
  if(_torch_gomp)
    list(GET _torch_gomp 0 _torch_gomp)
    target_link_libraries(torchlora_torch INTERFACE "${_torch_gomp}")
  else()
    target_link_options(torchlora_torch INTERFACE -fopenmp)
  endif()
  message(STATUS "torchlora: torch parallelises with OpenMP (${_torch_gomp})")
endif()

set(TORCHLORA_TORCH_HAS_CUDA OFF)
set(TORCHLORA_TORCH_CUDA_VERSION "")
if(EXISTS "${TORCH_ROOT}/lib/libtorch_cuda.so" OR EXISTS "${TORCH_ROOT}/lib/libc10_cuda.so")
  set(TORCHLORA_TORCH_HAS_CUDA ON)
  _torchlora_import_lib(c10_cuda)
  _torchlora_import_lib(torch_cuda)
  add_library(torchlora_torch_cuda INTERFACE)
  target_link_libraries(torchlora_torch_cuda INTERFACE torchlora_torch
    torchlora_imported_c10_cuda torchlora_imported_torch_cuda)
endif()
message(STATUS "torchlora: torch ${TORCHLORA_TORCH_VERSION} at ${TORCH_ROOT} (CUDA build: ${TORCHLORA_TORCH_HAS_CUDA})")
