# How torchlora sees torch: imported targets made from a torch package folder
# (site-packages/torch, or an unpacked LibTorch), not from Torch's own CMake config, which
# insists on a complete CUDA toolkit (cuBLAS, NVRTC, ...) whenever torch is a CUDA build and
# so breaks CPU-only builds against the default PyPI wheel. The build of torchlora
# (TorchTargets.cmake) and the installed TorchLoraConfig.cmake both include this file, so
# libtorchlora and the programs that link it see the same torch.
include_guard(GLOBAL)

# Whether `dir` holds torch's headers and libraries.
function(_torchlora_is_torch_root dir out)
  if(dir AND EXISTS "${dir}/include/ATen/ATen.h" AND IS_DIRECTORY "${dir}/lib")
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

# _torchlora_torch_libs(<root> <out> <name>...): <out> = the paths of lib<name>.so in <root>/lib;
# <out>_ERROR names the first one missing.
function(_torchlora_torch_libs root out)
  set(_found)
  set(${out}_ERROR "" PARENT_SCOPE)
  foreach(_name IN LISTS ARGN)
    find_library(_lib NAMES ${_name} PATHS "${root}/lib" NO_DEFAULT_PATH NO_CACHE)
    if(NOT _lib)
      set(${out}_ERROR "lib${_name}.so not found in ${root}/lib" PARENT_SCOPE)
      return()
    endif()
    list(APPEND _found "${_lib}")
    unset(_lib)
  endforeach()
  set(${out} "${_found}" PARENT_SCOPE)
endfunction()

# torchlora_find_torch_root(<out> [HINTS <dir>...] [PYTHON <interpreter>])
#   <out> = the torch package folder: TORCH_ROOT (the CMake variable, else the environment
#   variable) when set, else the first HINTS folder that holds torch, else what `import torch`
#   reports with PYTHON (default: Python3_EXECUTABLE, else python3 on PATH). When none is
#   found, <out> is empty and <out>_MESSAGE says why.
function(torchlora_find_torch_root out)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "PYTHON" "HINTS")
  set(${out} "" PARENT_SCOPE)
  set(_explicit "${TORCH_ROOT}")
  if(NOT _explicit AND DEFINED ENV{TORCH_ROOT})
    set(_explicit "$ENV{TORCH_ROOT}")
  endif()
  if(_explicit)
    _torchlora_is_torch_root("${_explicit}" _ok)
    if(_ok)
      set(${out} "${_explicit}" PARENT_SCOPE)
    else()
      set(${out}_MESSAGE "TORCH_ROOT=${_explicit} is not a torch package folder (no include/ATen/ATen.h and lib/)" PARENT_SCOPE)
    endif()
    return()
  endif()
  foreach(_hint IN LISTS arg_HINTS)
    _torchlora_is_torch_root("${_hint}" _ok)
    if(_ok)
      get_filename_component(_hint "${_hint}" ABSOLUTE)
      set(${out} "${_hint}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  if(arg_PYTHON)
    set(_python "${arg_PYTHON}")
  elseif(Python3_EXECUTABLE)
    set(_python "${Python3_EXECUTABLE}")
  else()
    unset(_python)
    find_program(_python NAMES python3 python NO_CACHE)
  endif()
  if(NOT _python)
    set(${out}_MESSAGE "no TORCH_ROOT and no Python interpreter to ask where torch is" PARENT_SCOPE)
    return()
  endif()
  execute_process(
    COMMAND "${_python}" -c "import os, torch; print(os.path.dirname(torch.__file__))"
    OUTPUT_VARIABLE _root OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
  _torchlora_is_torch_root("${_root}" _ok)
  if(_rc EQUAL 0 AND _ok)
    set(${out} "${_root}" PARENT_SCOPE)
  else()
    set(${out}_MESSAGE "${_python} cannot import torch; set TORCH_ROOT to the torch package folder" PARENT_SCOPE)
  endif()
endfunction()

# torchlora_add_torch_targets(ROOT <dir> TARGET <name> [CUDA_TARGET <name>])
#   <TARGET>       an INTERFACE IMPORTED target: torch's headers, libc10 + libtorch_cpu +
#                  libtorch, the libstdc++ ABI torch was built with and, when torch
#                  parallelises with OpenMP, -fopenmp with torch's own OpenMP runtime.
#   <CUDA_TARGET>  for a CUDA build of torch only: <TARGET> + libc10_cuda + libtorch_cuda.
# Sets in the caller: TORCHLORA_TORCH_VERSION ("2.14.1", or "unknown"),
# TORCHLORA_TORCH_HAS_CUDA (ON/OFF) and TORCHLORA_TORCH_ERROR (empty, or why no target was made).
function(torchlora_add_torch_targets)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "ROOT;TARGET;CUDA_TARGET" "")
  set(_root "${arg_ROOT}")
  set(TORCHLORA_TORCH_ERROR "" PARENT_SCOPE)
  set(TORCHLORA_TORCH_HAS_CUDA OFF PARENT_SCOPE)

  # torch 2.11-2.14 keep the version macros in one of these two headers.
  set(_version "unknown")
  foreach(_vh "${_root}/include/torch/headeronly/version.h"
              "${_root}/include/torch/csrc/api/include/torch/version.h")
    if(EXISTS "${_vh}")
      file(STRINGS "${_vh}" _vl REGEX "#define TORCH_VERSION_(MAJOR|MINOR|PATCH) [0-9]+")
      if(_vl)
        string(REGEX REPLACE ".*MAJOR ([0-9]+).*" "\\1" _maj "${_vl}")
        string(REGEX REPLACE ".*MINOR ([0-9]+).*" "\\1" _min "${_vl}")
        string(REGEX REPLACE ".*PATCH ([0-9]+).*" "\\1" _pat "${_vl}")
        set(_version "${_maj}.${_min}.${_pat}")
        break()
      endif()
    endif()
  endforeach()
  set(TORCHLORA_TORCH_VERSION "${_version}" PARENT_SCOPE)

  _torchlora_torch_libs("${_root}" _libs c10 torch_cpu torch)
  if(_libs_ERROR)
    set(TORCHLORA_TORCH_ERROR "${_libs_ERROR}" PARENT_SCOPE)
    return()
  endif()

  add_library(${arg_TARGET} INTERFACE IMPORTED)
  target_include_directories(${arg_TARGET} INTERFACE
    "${_root}/include" "${_root}/include/torch/csrc/api/include")
  target_link_libraries(${arg_TARGET} INTERFACE ${_libs})
  # torch is built with the new libstdc++ ABI from 2.7 on; old LibTorch packages say otherwise
  # in their own CMake files, so ask them rather than assume.
  set(_abi 1)
  if(EXISTS "${_root}/share/cmake/Caffe2/Caffe2Targets.cmake")
    file(STRINGS "${_root}/share/cmake/Caffe2/Caffe2Targets.cmake" _abi0 REGEX "_GLIBCXX_USE_CXX11_ABI=0")
    if(_abi0)
      set(_abi 0)
    endif()
  endif()
  target_compile_definitions(${arg_TARGET} INTERFACE _GLIBCXX_USE_CXX11_ABI=${_abi})

  # at::parallel_for is inline code: with torch's OpenMP backend its "#pragma omp parallel" is
  # compiled into the including objects, so they need -fopenmp (without it the loops run on
  # one thread) and torch's own OpenMP runtime (one runtime per process).
  file(STRINGS "${_root}/include/ATen/Config.h" _omp REGEX "#define AT_PARALLEL_OPENMP 1")
  if(_omp)
    target_compile_options(${arg_TARGET} INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
    file(GLOB _torch_gomp "${_root}/lib/libgomp*.so*")
    if(_torch_gomp)
      list(GET _torch_gomp 0 _torch_gomp)
      target_link_libraries(${arg_TARGET} INTERFACE "${_torch_gomp}")
    else()
      target_link_options(${arg_TARGET} INTERFACE -fopenmp)
    endif()
  endif()

  if(EXISTS "${_root}/lib/libtorch_cuda.so" OR EXISTS "${_root}/lib/libc10_cuda.so")
    set(TORCHLORA_TORCH_HAS_CUDA ON PARENT_SCOPE)
    if(arg_CUDA_TARGET)
      _torchlora_torch_libs("${_root}" _cuda_libs c10_cuda torch_cuda)
      if(_cuda_libs_ERROR)
        set(TORCHLORA_TORCH_ERROR "${_cuda_libs_ERROR}" PARENT_SCOPE)
        return()
      endif()
      add_library(${arg_CUDA_TARGET} INTERFACE IMPORTED)
      target_link_libraries(${arg_CUDA_TARGET} INTERFACE ${arg_TARGET} ${_cuda_libs})
    endif()
  endif()
endfunction()
