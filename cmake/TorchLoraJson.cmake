# nlohmann_json (header-only), for the adapter-file API of the build and, installed beside
# TorchLoraConfig.cmake, for programs that ask find_package(TorchLora COMPONENTS
# nlohmann_json). Found the way torch is found, without apt: in this order
#   1. a nlohmann_json::nlohmann_json target the project already has;
#   2. the headers of the PyPI package `nlohmann-json` in TorchLora_JSON_SITE_PACKAGES (the
#      site-packages next to a pip-installed torchlora; the installed config sets it);
#   3. a system nlohmann_json 3.2+ CMake package;
#   4. the PyPI package that Python3_EXECUTABLE (else python3 on PATH) imports.
# Defines nlohmann_json::nlohmann_json and sets TorchLora_JSON_FOUND; the caller decides
# whether a miss is fatal (TorchLora_JSON_HINT says what to install).
set(TorchLora_JSON_FOUND FALSE)
set(TorchLora_JSON_HINT "pip install nlohmann-json (or a system nlohmann_json 3.2+ CMake package)")

function(_torchlora_json_headers_target include_dir)
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED GLOBAL)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${include_dir}")
  message(STATUS "torchlora: nlohmann_json headers from the Python package at ${include_dir}")
endfunction()

if(NOT TARGET nlohmann_json::nlohmann_json AND TorchLora_JSON_SITE_PACKAGES
   AND EXISTS "${TorchLora_JSON_SITE_PACKAGES}/nlohmann_json/include/nlohmann/json.hpp")
  _torchlora_json_headers_target("${TorchLora_JSON_SITE_PACKAGES}/nlohmann_json/include")
endif()
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_package(nlohmann_json 3.2 CONFIG QUIET)
endif()
if(NOT TARGET nlohmann_json::nlohmann_json)
  if(Python3_EXECUTABLE)
    set(_tl_json_python "${Python3_EXECUTABLE}")
  else()
    unset(_tl_json_python)
    find_program(_tl_json_python NAMES python3 python NO_CACHE)
  endif()
  if(_tl_json_python)
    execute_process(
      COMMAND "${_tl_json_python}" -c "import os, nlohmann_json; print(os.path.join(os.path.dirname(nlohmann_json.__file__), 'include'))"
      OUTPUT_VARIABLE _tl_json_out OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _tl_json_rc ERROR_QUIET)
    if(_tl_json_rc EQUAL 0 AND EXISTS "${_tl_json_out}/nlohmann/json.hpp")
      _torchlora_json_headers_target("${_tl_json_out}")
    endif()
  endif()
endif()
if(TARGET nlohmann_json::nlohmann_json)
  set(TorchLora_JSON_FOUND TRUE)
endif()
