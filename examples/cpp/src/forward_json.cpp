#include "forward_json.h"

#include "http_error.h"

namespace lora_server {

ForwardRequest parse_forward(const Json& body, const InputLimits& limits) {
  if (!body.is_object()) throw HttpError(400, "a request must be a JSON object");
  ForwardRequest request;
  if (body.contains("adapter") && !body["adapter"].is_null()) {
    if (!body["adapter"].is_string()) throw HttpError(400, "adapter must be a string, got " + body["adapter"].dump());
    request.adapter = body["adapter"].get<std::string>();
  }
  if (body.contains("scale")) {
    if (!body["scale"].is_number()) throw HttpError(400, "scale must be a number, got " + body["scale"].dump());
    request.scale = body["scale"].get<double>();
  }
  const auto dtype = parse_dtype(body.contains("dtype") ? body["dtype"] : Json("float32"));
  if (!body.contains("input")) throw HttpError(400, "a forward request needs \"input\"");
  request.input = tensor_from_json(body["input"], dtype, limits);
  return request;
}

Json run_forward(Backend& backend, const Json& body, const InputLimits& limits) {
  auto request = parse_forward(body, limits);
  const auto adapter = request.adapter.empty() ? std::string("__base__") : request.adapter;
  const auto output = backend.forward(std::move(request));
  Json response;
  Json shape;
  response["adapter"] = adapter;
  response["output"] = output_to_json(output, shape);
  response["shape"] = shape;
  return response;
}

}  // namespace lora_server
