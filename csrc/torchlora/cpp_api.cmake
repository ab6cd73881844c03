# ---- C++ API of libtorchlora: LibTorch modules (nn/), adapter files (io/), applying adapters
# to module trees and TorchScript models (apply/). Compiled as an object library (it needs the
# full torch C++ API, unlike the operators) and linked into libtorchlora. Always built: a
# missing dependency fails the configure step instead of leaving part of the API out.

include(TorchLoraJson)
if(NOT TorchLora_JSON_FOUND)
  message(FATAL_ERROR "torchlora: nlohmann_json not found; the adapter-file API needs it: ${TorchLora_JSON_HINT}")
endif()

set(TORCHLORA_CPP_API_SOURCES
  peft/scaling.cpp
  peft/keys.cpp
  peft/config_schema.cpp
  peft/mutated_init.cpp
  peft/adapter_combination.cpp
  peft/weighted_adapter.cpp
  peft/parameter_lora.cpp
  nn/adapter_stack.cpp
  nn/lora_layer.cpp
  nn/lora_layer_dora.cpp
  nn/lora_pair.cpp
  nn/lora_linear.cpp
  nn/lora_embedding.cpp
  nn/lora_conv2d.cpp
  io/adapter_config.cpp
  io/peft_adapter.cpp
  apply/target_match.cpp
  apply/inject.cpp
  io/safetensors_header.cpp
  io/safetensors.cpp
  io/adapter_config_json.cpp
  io/peft_adapter_files.cpp
  io/weight_conversion.cpp
  io/trainable_tokens.cpp
  io/parameter_adapters.cpp
  apply/trainable_tokens.cpp
  apply/adapter_registry.cpp
  apply/script_model.cpp
  serve/adapter_checks.cpp
  serve/slot_tensors.cpp
  serve/adapter_pool.cpp
  serve/module_slots.cpp
  serve/exported_model.cpp
)

add_library(torchlora_cpp_api OBJECT ${TORCHLORA_CPP_API_SOURCES})
target_include_directories(torchlora_cpp_api PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/include)
target_compile_definitions(torchlora_cpp_api PRIVATE TORCHLORA_BUILDING_LIBRARY)
target_link_libraries(torchlora_cpp_api PRIVATE torchlora_torch)
# header-only: nothing of it is linked or exported
target_link_libraries(torchlora_cpp_api PRIVATE nlohmann_json::nlohmann_json)
set_target_properties(torchlora_cpp_api PROPERTIES
  CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON POSITION_INDEPENDENT_CODE ON)
target_compile_options(torchlora_cpp_api PRIVATE -Wall -Wextra -Wno-unused-parameter)
target_sources(torchlora PRIVATE $<TARGET_OBJECTS:torchlora_cpp_api>)
