// The JSON of a forward request and its answer, shared by the HTTP routes and the JSON-lines loop:
//   {"adapter"?: name, "scale"?: number, "input": nested lists, "dtype"?: "float32"|"float64"|"int64"}
//   -> {"adapter": name, "shape": [...], "output": nested lists}
#pragma once

#include <nlohmann/json.hpp>

#include "backend.h"
#include "tensor_json.h"

namespace lora_server {

// HttpError(400) naming the field that is missing or wrong.
ForwardRequest parse_forward(const Json& body, const InputLimits& limits);

// Runs the request on `backend` and builds the answer (HttpError on failure).
Json run_forward(Backend& backend, const Json& body, const InputLimits& limits);

}  // namespace lora_server
