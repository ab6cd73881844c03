// The JSON-lines mode, for scripting: one request per line on stdin, one answer per line on stdout.
//   {"id": 1, "adapter": "a", "input": [[...]], "dtype": "float32"} -> {"id": 1, "adapter": "a", "shape": [...], "output": [...]}
//   {"id": 2, "load_adapter": "c", "path": "/adapters/c"}           -> {"id": 2, "loaded": "c"}
//   {"id": 3, "unload_adapter": "c"}                                -> {"id": 3, "unloaded": "c"}
// Errors answer {"id": ..., "error": "...", "status": <HTTP status>} and the loop goes on.
#pragma once

#include <istream>
#include <ostream>

#include "backend.h"
#include "tensor_json.h"

namespace lora_server {

// Serves until `in` ends.
void serve_jsonl(Backend& backend, const InputLimits& limits, std::istream& in, std::ostream& out);

}  // namespace lora_server
