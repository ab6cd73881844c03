#include "http_routes.h"

#include <c10/util/Exception.h>

#include <exception>
#include <functional>
#include <string>

#include "forward_json.h"
#include "http_error.h"

namespace lora_server {
namespace {

constexpr const char* kJson = "application/json";

void send(httplib::Response& res, int status, const Json& body) {
  res.status = status;
  res.set_content(body.dump(), kJson);
}

// Runs `handler`, turning every failure into a status and {"error": message}.
void guarded(httplib::Response& res, const std::function<Json()>& handler) {
  try {
    send(res, 200, handler());
  } catch (const HttpError& e) {
    send(res, e.status(), {{"error", e.what()}});
  } catch (const Json::exception& e) {
    send(res, 400, {{"error", std::string("bad JSON: ") + e.what()}});
  } catch (const c10::Error& e) {
    send(res, 500, {{"error", e.what_without_backtrace()}});
  } catch (const std::exception& e) {
    send(res, 500, {{"error", e.what()}});
  }
}

Json parse_body(const httplib::Request& req) {
  try {
    return Json::parse(req.body);
  } catch (const Json::parse_error& e) {
    throw HttpError(400, std::string("the body is not valid JSON: ") + e.what());
  }
}

// The route a request matched, as a bounded set of metric labels.
std::string route_label(const httplib::Request& req) {
  const auto& p = req.path;
  if (p == "/v1/forward" || p == "/v1/adapters" || p == "/health" || p == "/metrics") return p;
  if (p.rfind("/v1/adapters/", 0) == 0) return "/v1/adapters/{name}";
  return "other";
}

bool valid_name(const std::string& name) {
  return !name.empty() && name != "__base__" && name.find('/') == std::string::npos;
}

// {"compose": [{"adapter": "a", "weight": 0.7}, ...], "combination_type": "svd", "svd_rank": 8, "svd_clamp": 0.99,
//  "svd_full_matrices": true, "density": 0.5, "majority_sign_method": "total"}: add_weighted_adapter's arguments.
void compose_from(Backend& backend, const std::string& name, const Json& body) {
  const auto& parts_json = body["compose"];
  if (!parts_json.is_array() || parts_json.empty()) {
    throw HttpError(400, "compose: needs a non-empty list of {\"adapter\": string, \"weight\": number}");
  }
  std::vector<std::pair<std::string, double>> parts;
  for (const auto& p : parts_json) {
    if (!p.is_object() || !p.contains("adapter") || !p["adapter"].is_string() || !p.contains("weight") ||
        !p["weight"].is_number()) {
      throw HttpError(400, "compose: every entry needs {\"adapter\": string, \"weight\": number}, got " + p.dump());
    }
    parts.emplace_back(p["adapter"].get<std::string>(), p["weight"].get<double>());
  }
  const auto field = [&](const char* key, bool (Json::*is)() const noexcept, const char* what) -> const Json* {
    if (!body.contains(key) || body[key].is_null()) return nullptr;
    if (!(body[key].*is)()) throw HttpError(400, std::string(key) + ": must be " + what);
    return &body[key];
  };
  torchlora::peft::WeightedAdapterOptions o;
  if (const auto* v = field("combination_type", &Json::is_string, "a string")) o.combination_type = v->get<std::string>();
  if (const auto* v = field("svd_rank", &Json::is_number_integer, "an integer")) o.svd_rank = v->get<int64_t>();
  if (const auto* v = field("svd_clamp", &Json::is_number, "a number")) o.svd_clamp = v->get<double>();
  if (const auto* v = field("svd_full_matrices", &Json::is_boolean, "true or false")) o.svd_full_matrices = v->get<bool>();
  if (const auto* v = field("density", &Json::is_number, "a number")) o.density = v->get<double>();
  if (const auto* v = field("majority_sign_method", &Json::is_string, "a string")) {
    o.majority_sign_method = v->get<std::string>();
  }
  backend.compose_adapter(name, parts, o);
}

}  // namespace

void add_routes(httplib::Server& server, Backend& backend, Metrics& metrics, const InputLimits& limits,
                size_t max_body_bytes) {
  server.Post("/v1/forward", [&backend, limits](const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] { return run_forward(backend, parse_body(req), limits); });
  });

  server.Post("/v1/adapters", [&backend](const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const auto body = parse_body(req);
      if (body.is_object() && body.contains("compose") && body.contains("name") && body["name"].is_string()) {
        const auto name = body["name"].get<std::string>();
        if (!valid_name(name)) throw HttpError(400, "name: '" + name + "' is empty, reserved or contains '/'");
        compose_from(backend, name, body);
        return Json{{"composed", name}};
      }
      if (!body.is_object() || !body.contains("name") || !body["name"].is_string() || !body.contains("path") ||
          !body["path"].is_string()) {
        throw HttpError(400, "loading an adapter needs {\"name\": string, \"path\": string} (or \"compose\" "
                             "instead of \"path\")");
      }
      const auto name = body["name"].get<std::string>();
      if (!valid_name(name)) throw HttpError(400, "name: '" + name + "' is empty, reserved or contains '/'");
      backend.load_adapter(name, body["path"].get<std::string>());
      return Json{{"loaded", name}};
    });
  });

  server.Delete(R"(/v1/adapters/([^/]+))", [&backend](const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string name = req.matches[1];
      if (!backend.unload_adapter(name)) throw HttpError(404, "unknown adapter '" + name + "'");
      return Json{{"unloaded", name}};
    });
  });

  server.Get("/v1/adapters", [&backend](const httplib::Request&, httplib::Response& res) {
    guarded(res, [&] { return backend.adapters(); });
  });

  server.Get("/health", [&backend](const httplib::Request&, httplib::Response& res) {
    send(res, 200, {{"status", "ok"}, {"backend", backend.kind()}});
  });

  server.Get("/metrics", [&backend, &metrics](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics.render(backend.metrics()), "text/plain; version=0.0.4");
  });

  // Statuses httplib sets by itself (413, 404 for unknown routes, ...) get a message too.
  const httplib::Server::HandlerWithResponse on_error = [max_body_bytes](const httplib::Request& req,
                                                                         httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    std::string message = "HTTP " + std::to_string(res.status);
    if (res.status == 413) {
      message = "the request body is larger than the limit of " + std::to_string(max_body_bytes) + " bytes";
    } else if (res.status == 404) {
      message = "no route " + req.method + " " + req.path;
    } else if (res.status == 400) {
      message = "malformed HTTP request";
    }
    send(res, res.status, {{"error", message}});
    return httplib::Server::HandlerResponse::Handled;
  };
  server.set_error_handler(on_error);

  server.set_logger([&metrics](const httplib::Request& req, const httplib::Response& res) {
    metrics.count_request(route_label(req), res.status);
  });
}

}  // namespace lora_server
