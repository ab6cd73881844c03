// Validation of untrusted safetensors headers. Only c10's error type and nlohmann_json are
// used, so the fuzz target can build this file alone.
#include <torchlora/io/safetensors_header.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

namespace torchlora::io {
namespace {

using Json = nlohmann::ordered_json;

struct DtypeInfo {
  const char* name;
  SafetensorsDtype dtype;
  size_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {"F64", SafetensorsDtype::F64, 8}, {"F32", SafetensorsDtype::F32, 4}, {"F16", SafetensorsDtype::F16, 2},
    {"BF16", SafetensorsDtype::BF16, 2}, {"I64", SafetensorsDtype::I64, 8}, {"I32", SafetensorsDtype::I32, 4},
    {"I16", SafetensorsDtype::I16, 2}, {"I8", SafetensorsDtype::I8, 1}, {"U8", SafetensorsDtype::U8, 1},
    {"BOOL", SafetensorsDtype::BOOL, 1},
};

const DtypeInfo& info(SafetensorsDtype dtype) {
  for (const auto& d : kDtypes) {
    if (d.dtype == dtype) {
      return d;
    }
  }
  TORCH_CHECK(false, "torchlora: unknown safetensors dtype ", static_cast<int>(dtype));
}

// Little-endian u64 from 8 bytes, independent of the host's byte order.
uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) {
    v = (v << 8) | p[i];
  }
  return v;
}

int64_t checked_dim(const Json& value, const std::string& source, const std::string& key) {
  TORCH_CHECK(value.is_number_unsigned(), "torchlora: ", source, ": tensor '", key,
              "': shape entries must be non-negative integers, got ", value.dump());
  const auto dim = value.get<uint64_t>();
  TORCH_CHECK(dim <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "torchlora: ", source,
              ": tensor '", key, "': shape entry ", dim, " is too large");
  return static_cast<int64_t>(dim);
}

uint64_t checked_offset(const Json& value, const std::string& source, const std::string& key) {
  TORCH_CHECK(value.is_number_unsigned(), "torchlora: ", source, ": tensor '", key,
              "': data_offsets must be non-negative integers, got ", value.dump());
  return value.get<uint64_t>();
}

SafetensorsEntry parse_entry(const std::string& key, const Json& value, const std::string& source) {
  TORCH_CHECK(!key.empty(), "torchlora: ", source, ": a tensor has an empty name");
  TORCH_CHECK(value.is_object(), "torchlora: ", source, ": tensor '", key, "': expected an object, got ",
              value.type_name());
  for (const auto& item : value.items()) {
    TORCH_CHECK(item.key() == "dtype" || item.key() == "shape" || item.key() == "data_offsets", "torchlora: ",
                source, ": tensor '", key, "': unexpected field '", item.key(), "'");
  }
  TORCH_CHECK(value.contains("dtype") && value.contains("shape") && value.contains("data_offsets"), "torchlora: ",
              source, ": tensor '", key, "': needs the fields dtype, shape and data_offsets");

  SafetensorsEntry entry;
  entry.name = key;
  const auto& dtype = value["dtype"];
  TORCH_CHECK(dtype.is_string(), "torchlora: ", source, ": tensor '", key, "': dtype must be a string");
  const auto dtype_str = dtype.get<std::string>();
  const DtypeInfo* found = nullptr;
  for (const auto& d : kDtypes) {
    if (dtype_str == d.name) {
      found = &d;
    }
  }
  TORCH_CHECK(found != nullptr, "torchlora: ", source, ": tensor '", key, "': unsupported dtype '", dtype_str,
              "' (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
  entry.dtype = found->dtype;

  const auto& shape = value["shape"];
  TORCH_CHECK(shape.is_array(), "torchlora: ", source, ": tensor '", key, "': shape must be a list");
  TORCH_CHECK(shape.size() <= kMaxSafetensorsDims, "torchlora: ", source, ": tensor '", key, "': ", shape.size(),
              " dimensions (at most ", kMaxSafetensorsDims, ")");
  // numel and the product of max(dim, 1) (what stride computation needs) must fit in int64.
  uint64_t numel = 1;
  uint64_t span = 1;
  for (const auto& d : shape) {
    const auto dim = static_cast<uint64_t>(checked_dim(d, source, key));
    entry.shape.push_back(static_cast<int64_t>(dim));
    const bool overflow = __builtin_mul_overflow(numel, dim, &numel) ||
                          __builtin_mul_overflow(span, std::max<uint64_t>(dim, 1), &span) ||
                          span > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    TORCH_CHECK(!overflow, "torchlora: ", source, ": tensor '", key, "': shape ", shape.dump(),
                " has too many elements");
  }
  uint64_t nbytes = 0;
  TORCH_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(found->size), &nbytes), "torchlora: ", source,
              ": tensor '", key, "': shape ", shape.dump(), " is too large");

  const auto& offsets = value["data_offsets"];
  TORCH_CHECK(offsets.is_array() && offsets.size() == 2, "torchlora: ", source, ": tensor '", key,
              "': data_offsets must be a list [begin, end]");
  entry.begin = checked_offset(offsets[0], source, key);
  entry.end = checked_offset(offsets[1], source, key);
  TORCH_CHECK(entry.begin <= entry.end, "torchlora: ", source, ": tensor '", key, "': data_offsets [", entry.begin,
              ", ", entry.end, "] are reversed");
  TORCH_CHECK(entry.end - entry.begin == nbytes, "torchlora: ", source, ": tensor '", key, "': data_offsets [",
              entry.begin, ", ", entry.end, "] hold ", entry.end - entry.begin, " bytes but ", dtype_str, " shape ",
              shape.dump(), " needs ", nbytes);
  return entry;
}

Json parse_json(const uint8_t* begin, const uint8_t* end, const std::string& source) {
  std::set<std::string> top_keys;
  std::string duplicate;
  bool too_deep = false;
  // The callback sees every event; it rejects deep nesting before any value is built and
  // remembers duplicate top-level keys (which JSON parsers otherwise resolve silently).
  Json::parser_callback_t callback = [&](int depth, Json::parse_event_t event, Json& parsed) {
    if ((event == Json::parse_event_t::object_start || event == Json::parse_event_t::array_start) &&
        depth >= kMaxSafetensorsHeaderDepth) {
      too_deep = true;
      throw std::runtime_error("nesting too deep");
    }
    if (event == Json::parse_event_t::key && depth == 1) {
      const auto key = parsed.get<std::string>();
      if (!top_keys.insert(key).second) {
        duplicate = key;
        throw std::runtime_error("duplicate key");
      }
    }
    return true;
  };
  try {
    return Json::parse(begin, end, callback);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "torchlora: ", source, ": the safetensors header is not valid JSON: ", e.what());
  } catch (const std::runtime_error&) {
    TORCH_CHECK(!too_deep, "torchlora: ", source, ": the safetensors header nests deeper than ",
                kMaxSafetensorsHeaderDepth, " levels");
    TORCH_CHECK(false, "torchlora: ", source, ": the safetensors header has the key '", duplicate, "' twice");
  }
}

}  // namespace

size_t element_size(SafetensorsDtype dtype) { return info(dtype).size; }
const char* dtype_name(SafetensorsDtype dtype) { return info(dtype).name; }

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, const std::string& source) {
  TORCH_CHECK(data != nullptr || size == 0, "torchlora: ", source, ": null buffer");
  TORCH_CHECK(size >= 8, "torchlora: ", source, ": ", size,
              " bytes is too short for a safetensors file (needs an 8-byte header length)");
  const uint64_t header_len = read_u64_le(data);
  TORCH_CHECK(header_len <= kMaxSafetensorsHeaderBytes, "torchlora: ", source, ": header length ", header_len,
              " exceeds the limit of ", kMaxSafetensorsHeaderBytes, " bytes");
  TORCH_CHECK(header_len <= size - 8, "torchlora: ", source, ": header length ", header_len,
              " runs past the end of the file (", size, " bytes)");
  TORCH_CHECK(header_len >= 2 && data[8] == '{', "torchlora: ", source,
              ": the safetensors header must be a JSON object starting with '{'");

  const uint8_t* header_begin = data + 8;
  const Json header = parse_json(header_begin, header_begin + header_len, source);
  TORCH_CHECK(header.is_object(), "torchlora: ", source, ": the safetensors header is not a JSON object");

  SafetensorsHeader result;
  result.data_start = 8 + header_len;
  const uint64_t data_size = size - result.data_start;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") {
      TORCH_CHECK(item.value().is_object(), "torchlora: ", source, ": __metadata__ must be an object");
      for (const auto& meta : item.value().items()) {
        TORCH_CHECK(meta.value().is_string(), "torchlora: ", source, ": __metadata__ value of '", meta.key(),
                    "' must be a string");
        result.metadata[meta.key()] = meta.value().get<std::string>();
      }
      continue;
    }
    result.tensors.push_back(parse_entry(item.key(), item.value(), source));
  }

  // The data section must be covered exactly once: no overlaps (two tensors aliasing the
  // same bytes), no gaps (hidden data), nothing past the end.
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& t : result.tensors) {
    by_offset.push_back(&t);
  }
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const auto* a, const auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expected = 0;
  for (const auto* t : by_offset) {
    TORCH_CHECK(t->begin == expected, "torchlora: ", source, ": tensor '", t->name, "': data_offsets [", t->begin,
                ", ", t->end, "] ", (t->begin < expected ? "overlap another tensor" : "leave a gap before them"),
                " (expected to start at ", expected, ")");
    TORCH_CHECK(t->end <= data_size, "torchlora: ", source, ": tensor '", t->name, "': data_offsets [", t->begin,
                ", ", t->end, "] run past the end of the data section (", data_size, " bytes)");
    expected = t->end;
  }
  TORCH_CHECK(expected == data_size, "torchlora: ", source, ": the data section has ", data_size,
              " bytes but the tensors cover ", expected);
  return result;
}

}  // namespace torchlora::io
