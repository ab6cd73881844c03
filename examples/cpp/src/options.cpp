#include "options.h"

#include <stdexcept>

namespace lora_server {

const char* const kUsage = R"(usage: lora_server [options] <model.pt2 | model.pt> [<name>=<adapter folder> ...]

Serves LoRA adapters saved by PEFT or torchlora on an exported model (.pt2, torchlora.export:
requests for different adapters batch into one forward) or a TorchScript model (.pt: one adapter
merged at a time; TorchScript is deprecated upstream).

  --backend exported|torchscript  override the choice made from the model file's extension
  --jsonl                 read JSON requests from stdin, one per line, instead of serving HTTP
  --host H                address to listen on (default 127.0.0.1)
  --port P                port (default 8080; 0 picks a free one)
  --threads N             HTTP worker threads (default 64)
  --max-batch N           requests per forward (default 32)
  --max-wait-ms T         how long a batch may wait to fill (default 2)
  --max-queue N           queued requests before 503 (default 1024)
  --queue-timeout-ms T    longest wait in the queue before 503 (default 10000)
  --max-cpu-loras N       adapters kept in host memory (default: the pool's)
  --max-body-bytes N      largest request body (default 8 MiB; larger: 413)
  --max-input-elements N  largest input tensor (default 1048576; larger: 400)
  --max-input-rank N      most input dimensions (default 8)
)";

namespace {

int64_t to_int(const std::string& flag, const std::string& value, int64_t min) {
  size_t end = 0;
  int64_t v = 0;
  try {
    v = std::stoll(value, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  if (end != value.size() || value.empty() || v < min) {
    throw std::invalid_argument(flag + " needs an integer >= " + std::to_string(min) + ", got '" + value + "'");
  }
  return v;
}

double to_double(const std::string& flag, const std::string& value) {
  size_t end = 0;
  double v = -1;
  try {
    v = std::stod(value, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  if (end != value.size() || value.empty() || !(v >= 0)) {
    throw std::invalid_argument(flag + " needs a number >= 0, got '" + value + "'");
  }
  return v;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

Options parse_options(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--jsonl") {
      o.jsonl = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0) {
      positional.push_back(arg);
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
    const std::string value = argv[++i];
    if (arg == "--backend") {
      if (value != "exported" && value != "torchscript") {
        throw std::invalid_argument("--backend is exported or torchscript, got '" + value + "'");
      }
      o.backend = value;
    } else if (arg == "--host") {
      o.host = value;
    } else if (arg == "--port") {
      o.port = static_cast<int>(to_int(arg, value, 0));
      if (o.port > 65535) throw std::invalid_argument("--port must be <= 65535");
    } else if (arg == "--threads") {
      o.threads = static_cast<int>(to_int(arg, value, 1));
    } else if (arg == "--max-batch") {
      o.max_batch = to_int(arg, value, 1);
    } else if (arg == "--max-wait-ms") {
      o.max_wait_ms = to_double(arg, value);
    } else if (arg == "--max-queue") {
      o.max_queue = to_int(arg, value, 1);
    } else if (arg == "--queue-timeout-ms") {
      o.queue_timeout_ms = to_int(arg, value, 1);
    } else if (arg == "--max-cpu-loras") {
      o.max_cpu_loras = to_int(arg, value, 0);
    } else if (arg == "--max-body-bytes") {
      o.max_body_bytes = to_int(arg, value, 1);
    } else if (arg == "--max-input-elements") {
      o.input.max_elements = to_int(arg, value, 1);
    } else if (arg == "--max-input-rank") {
      o.input.max_rank = to_int(arg, value, 1);
    } else {
      throw std::invalid_argument("unknown option " + arg);
    }
  }
  if (positional.empty()) throw std::invalid_argument("missing the model file");
  o.model = positional.front();
  for (size_t i = 1; i < positional.size(); ++i) {
    const auto& arg = positional[i];
    const auto eq = arg.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw std::invalid_argument("adapter arguments are <name>=<folder>, got '" + arg + "'");
    }
    o.adapters.emplace_back(arg.substr(0, eq), arg.substr(eq + 1));
  }
  if (o.backend.empty()) o.backend = ends_with(o.model, ".pt2") ? "exported" : "torchscript";
  return o;
}

}  // namespace lora_server
