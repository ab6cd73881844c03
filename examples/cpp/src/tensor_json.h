// Tensors to and from JSON: nested lists of numbers, row-major.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

namespace lora_server {

using Json = nlohmann::json;

struct InputLimits {
  int64_t max_elements = 1 << 20;
  int64_t max_rank = 8;
};

// "float32" (default), "float64", "int64"; HttpError(400) for anything else.
at::ScalarType parse_dtype(const Json& name);

// Nested lists -> a tensor of that shape and dtype. HttpError(400) naming what is wrong: not a
// list, ragged nesting, a non-number, a fractional value for int64, more elements or dimensions
// than `limits` allow.
at::Tensor tensor_from_json(const Json& value, at::ScalarType dtype, const InputLimits& limits);

// A tensor as nested lists of numbers (integers for integral dtypes).
Json tensor_to_json(const at::Tensor& tensor);

// A model output (a tensor, or tuples / lists of them) as JSON; `shape` receives its shape (a
// list of shapes for tuples).
Json output_to_json(const c10::IValue& value, Json& shape);

}  // namespace lora_server
