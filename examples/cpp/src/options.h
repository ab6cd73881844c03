// Command line of lora_server.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tensor_json.h"

namespace lora_server {

struct Options {
  std::string model;                                         // .pt2 (exported) or .pt (TorchScript)
  std::string backend;                                       // "exported" | "torchscript" (from the file)
  std::vector<std::pair<std::string, std::string>> adapters;  // name=folder loaded at start
  bool jsonl = false;
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port
  int threads = 64;
  int64_t max_batch = 32;
  double max_wait_ms = 2;
  int64_t max_queue = 1024;
  int64_t queue_timeout_ms = 10000;
  int64_t max_cpu_loras = 0;  // 0: the pool's default
  int64_t max_body_bytes = 8 << 20;
  InputLimits input;
};

extern const char* const kUsage;

// Parses argv; throws std::invalid_argument naming the bad flag or value.
Options parse_options(int argc, char** argv);

}  // namespace lora_server
