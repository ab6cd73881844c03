# ---- C++ API of libtorchlora: LibTorch modules (nn/), adapter files (io/), applying adapters
# to module trees and TorchScript models (apply/). Compiled as an object library (it needs the
# full torch C++ API, unlike the operators) and linked into libtorchlora.
#
# The adapter-file part (safetensors, adapter_config.json, PEFT folders, TorchScript serving)
# needs nlohmann_json (Debian: nlohmann-json3-dev); without it, it is left out and the rest
# still builds.

find_package(nlohmann_json 3.2 QUIET)
set(TORCHLORA_WITH_ADAPTER_IO OFF)
if(nlohmann_json_FOUND)
  set(TORCHLORA_WITH_ADAPTER_IO ON)
  message(STATUS "torchlora: nlohmann_json ${nlohmann_json_VERSION} found: adapter files (safetensors, adapter_config.json) are built")
else()
  message(STATUS "torchlora: nlohmann_json not found (Debian/Ubuntu: apt install nlohmann-json3-dev): "
                 "the C++ adapter-file API (safetensors, adapter_config.json, TorchScript serving) is NOT built")
endif()
set(TORCHLORA_WITH_ADAPTER_IO ${TORCHLORA_WITH_ADAPTER_IO} PARENT_SCOPE)

set(TORCHLORA_CPP_API_SOURCES
  nn/lora_layer.cpp
  nn/lora_pair.cpp
  nn/lora_linear.cpp
  nn/lora_embedding.cpp
  nn/lora_conv2d.cpp
  io/adapter_config.cpp
  io/peft_adapter.cpp
  apply/target_match.cpp
  apply/inject.cpp
)
set(TORCHLORA_ADAPTER_IO_SOURCES
  io/safetensors_header.cpp
  io/safetensors.cpp
  io/adapter_config_json.cpp
  io/peft_adapter_files.cpp
  apply/adapter_registry.cpp
  apply/script_model.cpp
)
if(TORCHLORA_WITH_ADAPTER_IO)
  list(APPEND TORCHLORA_CPP_API_SOURCES ${TORCHLORA_ADAPTER_IO_SOURCES})
endif()

add_library(torchlora_cpp_api OBJECT ${TORCHLORA_CPP_API_SOURCES})
target_include_directories(torchlora_cpp_api PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/include)
target_compile_definitions(torchlora_cpp_api PRIVATE TORCHLORA_BUILDING_LIBRARY)
target_link_libraries(torchlora_cpp_api PRIVATE torchlora_torch)
if(TORCHLORA_WITH_ADAPTER_IO)
  # header-only: nothing of it is linked or exported
  target_link_libraries(torchlora_cpp_api PRIVATE nlohmann_json::nlohmann_json)
  target_compile_definitions(torchlora PUBLIC TORCHLORA_WITH_ADAPTER_IO=1)
endif()
set_target_properties(torchlora_cpp_api PROPERTIES
  CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON POSITION_INDEPENDENT_CODE ON)
target_compile_options(torchlora_cpp_api PRIVATE -Wall -Wextra -Wno-unused-parameter)
target_sources(torchlora PRIVATE $<TARGET_OBJECTS:torchlora_cpp_api>)
