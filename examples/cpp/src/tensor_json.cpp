#include "tensor_json.h"

#include <ATen/ops/from_blob.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "http_error.h"

namespace lora_server {
namespace {

[[noreturn]] void bad_input(const std::string& message) { throw HttpError(400, "input: " + message); }

// Walks the nesting depth-first, checking that it is rectangular, and appends the leaves.
template <typename T>
void flatten(const Json& v, const std::vector<int64_t>& shape, size_t depth, std::vector<T>& flat) {
  if (depth == shape.size()) {
    if (!v.is_number()) bad_input("expected a number at depth " + std::to_string(depth) + ", got " + v.dump());
    if constexpr (std::is_integral_v<T>) {
      if (!v.is_number_integer()) bad_input("int64 input needs integers, got " + v.dump());
      flat.push_back(v.get<T>());
    } else {
      flat.push_back(v.get<T>());
    }
    return;
  }
  if (!v.is_array() || static_cast<int64_t>(v.size()) != shape[depth]) {
    bad_input("ragged nesting (expected a list of " + std::to_string(shape[depth]) + " at depth " +
              std::to_string(depth) + ")");
  }
  for (const auto& item : v) flatten(item, shape, depth + 1, flat);
}

template <typename T>
at::Tensor build(const Json& value, const std::vector<int64_t>& shape, int64_t numel, at::ScalarType dtype) {
  std::vector<T> flat;
  flat.reserve(static_cast<size_t>(numel));
  flatten(value, shape, 0, flat);
  const auto kind = std::is_integral_v<T> ? at::kLong : at::kDouble;
  return at::from_blob(flat.data(), shape, at::TensorOptions().dtype(kind)).to(dtype, false, true);
}

// The double whose shortest decimal form is the float's shortest one, so that JSON carries
// "0.1" for 0.1f rather than the 17 digits of (double)0.1f (the value reads back to the same float).
double shortest(float v) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof(buf) - 1, v).ptr;
  *end = '\0';
  return std::strtod(buf, nullptr);
}

template <typename T>
Json encode(const T* data, const std::vector<int64_t>& shape, size_t depth, int64_t& offset) {
  if (depth == shape.size()) {
    if constexpr (std::is_same_v<T, float>) {
      return std::isfinite(data[offset]) ? Json(shortest(data[offset++])) : Json(data[offset++]);
    } else {
      return data[offset++];
    }
  }
  Json out = Json::array();
  for (int64_t i = 0; i < shape[depth]; ++i) out.push_back(encode(data, shape, depth + 1, offset));
  return out;
}

}  // namespace

at::ScalarType parse_dtype(const Json& name) {
  if (!name.is_string()) throw HttpError(400, "dtype must be a string, got " + name.dump());
  const auto& s = name.get_ref<const std::string&>();
  if (s == "float32") return at::kFloat;
  if (s == "float64") return at::kDouble;
  if (s == "int64") return at::kLong;
  throw HttpError(400, "dtype must be float32, float64 or int64, got '" + s + "'");
}

at::Tensor tensor_from_json(const Json& value, at::ScalarType dtype, const InputLimits& limits) {
  if (!value.is_array()) bad_input("expected nested lists of numbers, got " + std::string(value.type_name()));
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (const Json* level = &value; level->is_array(); level = &(*level)[0]) {
    shape.push_back(static_cast<int64_t>(level->size()));
    if (static_cast<int64_t>(shape.size()) > limits.max_rank) {
      bad_input("more than " + std::to_string(limits.max_rank) + " dimensions");
    }
    numel *= shape.back();
    if (numel > limits.max_elements) {
      bad_input("more than the limit of " + std::to_string(limits.max_elements) + " elements");
    }
    if (level->empty()) break;
  }
  if (numel == 0) bad_input("empty (a dimension of size 0)");
  return dtype == at::kLong ? build<int64_t>(value, shape, numel, dtype) : build<double>(value, shape, numel, dtype);
}

Json tensor_to_json(const at::Tensor& tensor) {
  const auto type = tensor.scalar_type();
  const auto integral = at::isIntegralType(type, /*includeBool=*/true);
  // float32 and narrower floats are written with float precision, float64 with double's
  const auto as = integral ? at::kLong : (type == at::kDouble ? at::kDouble : at::kFloat);
  const auto t = tensor.detach().to(at::kCPU, as).contiguous();
  const auto shape = t.sizes().vec();
  int64_t offset = 0;
  if (integral) return encode(t.const_data_ptr<int64_t>(), shape, 0, offset);
  if (as == at::kDouble) return encode(t.const_data_ptr<double>(), shape, 0, offset);
  return encode(t.const_data_ptr<float>(), shape, 0, offset);
}

Json output_to_json(const c10::IValue& value, Json& shape) {
  if (value.isTensor()) {
    shape = value.toTensor().sizes().vec();
    return tensor_to_json(value.toTensor());
  }
  if (value.isTuple() || value.isList()) {
    Json out = Json::array(), shapes = Json::array();
    const auto items = value.isTuple() ? value.toTupleRef().elements().vec() : value.toListRef().vec();
    for (const auto& item : items) {
      Json s;
      out.push_back(output_to_json(item, s));
      shapes.push_back(s);
    }
    shape = shapes;
    return out;
  }
  throw HttpError(500, std::string("the model returned a ") + value.tagKind() + ", which this server cannot encode");
}

}  // namespace lora_server
