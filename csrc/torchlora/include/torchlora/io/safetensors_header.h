// The safetensors container format, parsed without creating tensors: the 8-byte header
// length, the JSON header and every tensor's dtype, shape and byte range, all validated
// against the buffer. Files are untrusted input; nothing here reads outside [data, data+size).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torchlora/export.h>

namespace torchlora::io {

// The reference implementation's limit on the JSON header (100 MB).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;
// A valid header nests three levels (object -> tensor object -> shape list).
inline constexpr int kMaxSafetensorsHeaderDepth = 4;
inline constexpr size_t kMaxSafetensorsDims = 64;

enum class SafetensorsDtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

TORCHLORA_API size_t element_size(SafetensorsDtype dtype);
TORCHLORA_API const char* dtype_name(SafetensorsDtype dtype);

struct SafetensorsEntry {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> tensors;        // in header order
  std::map<std::string, std::string> metadata;  // "__metadata__" (string -> string)
  uint64_t data_start = 0;                      // offset of the data section in the buffer
};

// Parses and validates the header of a safetensors buffer. `source` (the file name) appears
// in every error. Raises c10::Error on: a buffer shorter than 8 bytes; a header length over
// kMaxSafetensorsHeaderBytes or past the end of the buffer; JSON that is invalid, not an
// object, nested deeper than kMaxSafetensorsHeaderDepth or with duplicate keys; an entry
// without exactly dtype/shape/data_offsets; an unknown dtype; negative, non-integer or
// overflowing shapes; offsets that are reversed, overlap, leave gaps or pass the buffer; a
// byte range whose length differs from numel * element size.
TORCHLORA_API SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, const std::string& source);

}  // namespace torchlora::io
