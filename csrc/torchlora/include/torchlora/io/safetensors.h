// Reading and writing safetensors files as ATen tensors (CPU), in the format of the
// `safetensors` package (8-byte little-endian header length, JSON header, raw data).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torchlora/export.h>
#include <torchlora/io/safetensors_header.h>

namespace torchlora::io {

struct SafetensorsContents {
  std::map<std::string, at::Tensor> tensors;    // CPU tensors that own their memory
  std::map<std::string, std::string> metadata;  // "__metadata__"
};

// Validates the buffer (see parse_safetensors_header) and copies every tensor out of it.
TORCHLORA_API SafetensorsContents parse_safetensors(const uint8_t* data, size_t size, const std::string& source);

// Reads a whole file and parses it; errors name `path`.
TORCHLORA_API SafetensorsContents load_safetensors(const std::string& path);

// The bytes of a safetensors file holding `tensors` (any device, made contiguous on the CPU;
// dtypes float64/32/16, bfloat16, int64/32/16/8, uint8, bool) and `metadata`.
TORCHLORA_API std::vector<uint8_t> serialize_safetensors(
    const std::map<std::string, at::Tensor>& tensors, const std::map<std::string, std::string>& metadata = {});

// Writes serialize_safetensors(...) to `path` (through a temporary file, then renamed, so a
// reader never sees a half-written file).
TORCHLORA_API void save_safetensors(
    const std::string& path, const std::map<std::string, at::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace torchlora::io
