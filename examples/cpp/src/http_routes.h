// The HTTP API of lora_server (cpp-httplib):
//   POST   /v1/forward          {adapter?, scale?, input, dtype?} -> {adapter, shape, output}
//   POST   /v1/adapters         {name, path}: loads a PEFT adapter folder
//                                {name, compose: [{adapter, weight}, ...], combination_type, density, ...}:
//                                registers a weighted composition of loaded adapters
//   DELETE /v1/adapters/{name}
//   GET    /v1/adapters         the backend's adapters and their slots
//   GET    /health
//   GET    /metrics             Prometheus text format
// Errors answer {"error": message} with 400 (bad JSON, shapes, dtype, adapter files), 404
// (unknown adapter or route), 413 (body too large) or 503 (pool or queue full, shutting down).
#pragma once

#include <httplib.h>

#include "backend.h"
#include "metrics.h"
#include "tensor_json.h"

namespace lora_server {

void add_routes(httplib::Server& server, Backend& backend, Metrics& metrics, const InputLimits& limits,
                size_t max_body_bytes);

}  // namespace lora_server
