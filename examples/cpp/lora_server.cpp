// lora_server: serves LoRA adapters (saved by PEFT or torchlora) on a TorchScript model, with
// no Python in the process.
//
//   lora_server <model.pt> [<name>=<adapter folder> ...]
//
// Reads one JSON request per line on stdin and writes one JSON response per line on stdout:
//   {"id": 1, "adapter": "a", "input": [[0.1, 0.2, ...]], "dtype": "float32"}
//   -> {"id": 1, "adapter": "a", "shape": [1, 8], "output": [[...]]}
// "adapter" is optional ("__base__" or absent: the base model); "dtype" is float32 (default),
// float64 or int64 (token ids). Requests may also load adapters at run time:
//   {"load_adapter": "c", "path": "/adapters/c"}  -> {"loaded": "c"}
// Errors come back as {"id": ..., "error": "..."} and the server keeps going.
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <torchlora/apply/script_model.h>

namespace {

using Json = nlohmann::json;

// Nested JSON lists of numbers -> a tensor of that shape.
at::Tensor tensor_from_json(const Json& value, at::ScalarType dtype) {
  std::vector<int64_t> shape;
  const Json* level = &value;
  while (level->is_array()) {
    shape.push_back(static_cast<int64_t>(level->size()));
    if (level->empty()) break;
    level = &(*level)[0];
  }
  std::vector<double> flat;
  // Depth-first in row-major order, checking that the nesting is rectangular.
  std::function<void(const Json&, size_t)> walk = [&](const Json& v, size_t depth) {
    if (depth == shape.size()) {
      TORCH_CHECK(v.is_number(), "input: expected a number at depth ", depth, ", got ", v.dump());
      flat.push_back(v.get<double>());
      return;
    }
    TORCH_CHECK(v.is_array() && static_cast<int64_t>(v.size()) == shape[depth],
                "input: ragged nesting (expected a list of ", shape[depth], " at depth ", depth, ")");
    for (const auto& item : v) walk(item, depth + 1);
  };
  walk(value, 0);
  auto t = at::tensor(flat, at::kDouble).reshape(shape);
  return t.to(dtype);
}

Json tensor_to_json(const at::Tensor& tensor) {
  const auto t = tensor.detach().to(at::kCPU, at::kDouble).contiguous();
  if (t.dim() == 0) return t.item<double>();
  Json out = Json::array();
  for (int64_t i = 0; i < t.size(0); ++i) out.push_back(tensor_to_json(t[i]));
  return out;
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
  TORCH_CHECK(false, "the model returned a ", value.tagKind(), ", which this server cannot encode");
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float64") return at::kDouble;
  if (name == "int64") return at::kLong;
  TORCH_CHECK(false, "dtype must be float32, float64 or int64, got '", name, "'");
}

Json handle(torchlora::apply::LoraScriptModel& model, const Json& request) {
  TORCH_CHECK(request.is_object(), "a request must be a JSON object");
  Json response;
  if (request.contains("id")) response["id"] = request["id"];
  if (request.contains("load_adapter")) {
    const auto name = request.at("load_adapter").get<std::string>();
    model.load_adapter(name, request.at("path").get<std::string>());
    response["loaded"] = name;
    return response;
  }
  TORCH_CHECK(request.contains("input"), "a request needs \"input\"");
  const auto adapter = request.value("adapter", std::string("__base__"));
  const auto dtype = parse_dtype(request.value("dtype", std::string("float32")));
  auto input = tensor_from_json(request.at("input"), dtype);
  const auto output = model.forward({input}, adapter);
  Json shape;
  response["adapter"] = adapter;
  response["output"] = output_to_json(output, shape);
  response["shape"] = shape;
  return response;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " <model.pt> [<name>=<adapter folder> ...]\n";
    return 2;
  }
  std::unique_ptr<torchlora::apply::LoraScriptModel> model;
  try {
    model = std::make_unique<torchlora::apply::LoraScriptModel>(torch::jit::load(argv[1]));
    for (int i = 2; i < argc; ++i) {
      const std::string arg = argv[i];
      const auto eq = arg.find('=');
      TORCH_CHECK(eq != std::string::npos && eq > 0, "adapter arguments are <name>=<folder>, got '", arg, "'");
      model->load_adapter(arg.substr(0, eq), arg.substr(eq + 1));
    }
  } catch (const std::exception& e) {
    std::cerr << "lora_server: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "lora_server: ready (adapters:";
  for (const auto& name : model->adapter_names()) std::cerr << " " << name;
  std::cerr << ")\n";

  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Json response;
    Json request;
    try {
      request = Json::parse(line);
      response = handle(*model, request);
    } catch (const c10::Error& e) {
      response = {{"error", e.what_without_backtrace()}};
    } catch (const std::exception& e) {
      response = {{"error", e.what()}};
    }
    if (!response.contains("id") && request.is_object() && request.contains("id")) response["id"] = request["id"];
    std::cout << response.dump() << "\n" << std::flush;
  }
  return 0;
}
