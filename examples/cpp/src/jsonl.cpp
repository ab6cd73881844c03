#include "jsonl.h"

#include <c10/util/Exception.h>

#include <string>

#include "forward_json.h"
#include "http_error.h"

namespace lora_server {
namespace {

Json handle(Backend& backend, const Json& request, const InputLimits& limits) {
  if (!request.is_object()) throw HttpError(400, "a request must be a JSON object");
  if (request.contains("load_adapter")) {
    const auto name = request.at("load_adapter").get<std::string>();
    backend.load_adapter(name, request.at("path").get<std::string>());
    return {{"loaded", name}};
  }
  if (request.contains("unload_adapter")) {
    const auto name = request.at("unload_adapter").get<std::string>();
    if (!backend.unload_adapter(name)) throw HttpError(404, "unknown adapter '" + name + "'");
    return {{"unloaded", name}};
  }
  return run_forward(backend, request, limits);
}

}  // namespace

void serve_jsonl(Backend& backend, const InputLimits& limits, std::istream& in, std::ostream& out) {
  std::string line;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Json request, response;
    try {
      request = Json::parse(line);
      response = handle(backend, request, limits);
    } catch (const HttpError& e) {
      response = {{"error", e.what()}, {"status", e.status()}};
    } catch (const c10::Error& e) {
      response = {{"error", e.what_without_backtrace()}, {"status", 500}};
    } catch (const std::exception& e) {
      response = {{"error", e.what()}, {"status", 400}};
    }
    if (request.is_object() && request.contains("id")) response["id"] = request["id"];
    out << response.dump() << "\n" << std::flush;
  }
}

}  // namespace lora_server
