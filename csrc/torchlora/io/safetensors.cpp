// Safetensors files <-> ATen tensors, on top of the validated header.
#include <torchlora/io/safetensors.h>

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <bit>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace torchlora::io {
namespace {

at::ScalarType to_scalar_type(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::F64: return at::kDouble;
    case SafetensorsDtype::F32: return at::kFloat;
    case SafetensorsDtype::F16: return at::kHalf;
    case SafetensorsDtype::BF16: return at::kBFloat16;
    case SafetensorsDtype::I64: return at::kLong;
    case SafetensorsDtype::I32: return at::kInt;
    case SafetensorsDtype::I16: return at::kShort;
    case SafetensorsDtype::I8: return at::kChar;
    case SafetensorsDtype::U8: return at::kByte;
    case SafetensorsDtype::BOOL: return at::kBool;
  }
  TORCH_CHECK(false, "torchlora: unknown safetensors dtype");
}

SafetensorsDtype from_scalar_type(at::ScalarType type, const std::string& key) {
  switch (type) {
    case at::kDouble: return SafetensorsDtype::F64;
    case at::kFloat: return SafetensorsDtype::F32;
    case at::kHalf: return SafetensorsDtype::F16;
    case at::kBFloat16: return SafetensorsDtype::BF16;
    case at::kLong: return SafetensorsDtype::I64;
    case at::kInt: return SafetensorsDtype::I32;
    case at::kShort: return SafetensorsDtype::I16;
    case at::kChar: return SafetensorsDtype::I8;
    case at::kByte: return SafetensorsDtype::U8;
    case at::kBool: return SafetensorsDtype::BOOL;
    default: break;
  }
  TORCH_CHECK(false, "torchlora: tensor '", key, "' has dtype ", type, ", which safetensors files here cannot hold");
}

void check_little_endian() {
  TORCH_CHECK(std::endian::native == std::endian::little,
              "torchlora: safetensors data is little-endian; big-endian hosts are not supported");
}

}  // namespace

SafetensorsContents parse_safetensors(const uint8_t* data, size_t size, const std::string& source) {
  check_little_endian();
  const auto header = parse_safetensors_header(data, size, source);
  SafetensorsContents contents;
  contents.metadata = header.metadata;
  for (const auto& entry : header.tensors) {
    // parse_safetensors_header proved data_start + end <= size and end - begin == nbytes.
    auto tensor = at::empty(entry.shape, at::TensorOptions().dtype(to_scalar_type(entry.dtype)));
    const auto nbytes = static_cast<size_t>(entry.end - entry.begin);
    TORCH_CHECK(tensor.nbytes() == nbytes, "torchlora: ", source, ": tensor '", entry.name, "': size mismatch");
    if (nbytes > 0) {
      std::memcpy(tensor.data_ptr(), data + header.data_start + entry.begin, nbytes);
    }
    contents.tensors.emplace(entry.name, std::move(tensor));
  }
  return contents;
}

SafetensorsContents load_safetensors(const std::string& path) {
  std::error_code ec;
  TORCH_CHECK(std::filesystem::is_regular_file(path, ec), "torchlora: ", path, ": no such file");
  const auto size = std::filesystem::file_size(path, ec);
  TORCH_CHECK(!ec, "torchlora: ", path, ": cannot read its size: ", ec.message());
  std::vector<uint8_t> bytes(size);
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "torchlora: ", path, ": cannot open it for reading");
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  TORCH_CHECK(in.gcount() == static_cast<std::streamsize>(size), "torchlora: ", path, ": short read (",
              in.gcount(), " of ", size, " bytes)");
  return parse_safetensors(bytes.data(), bytes.size(), path);
}

std::vector<uint8_t> serialize_safetensors(
    const std::map<std::string, at::Tensor>& tensors, const std::map<std::string, std::string>& metadata) {
  check_little_endian();
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    header["__metadata__"] = metadata;
  }
  std::vector<at::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [key, tensor] : tensors) {
    TORCH_CHECK(!key.empty() && key != "__metadata__", "torchlora: invalid safetensors tensor name '", key, "'");
    TORCH_CHECK(tensor.defined(), "torchlora: tensor '", key, "' is undefined");
    const auto dtype = from_scalar_type(tensor.scalar_type(), key);
    auto cpu = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t nbytes = cpu.nbytes();
    header[key] = {{"dtype", dtype_name(dtype)}, {"shape", cpu.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    contiguous.push_back(std::move(cpu));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data section 8-byte aligned
  std::vector<uint8_t> out(8 + text.size() + offset);
  uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<uint8_t>(len >> (8 * i));
  }
  std::memcpy(out.data() + 8, text.data(), text.size());
  size_t pos = 8 + text.size();
  for (const auto& t : contiguous) {
    if (t.nbytes() > 0) {
      std::memcpy(out.data() + pos, t.const_data_ptr(), t.nbytes());
    }
    pos += t.nbytes();
  }
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const auto bytes = serialize_safetensors(tensors, metadata);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out.good(), "torchlora: ", path, ": cannot open it for writing");
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    TORCH_CHECK(out.good(), "torchlora: ", path, ": write failed");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  TORCH_CHECK(!ec, "torchlora: ", path, ": cannot move the written file into place: ", ec.message());
}

}  // namespace torchlora::io
