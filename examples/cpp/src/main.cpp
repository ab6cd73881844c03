// lora_server: serves LoRA adapters saved by PEFT or torchlora over HTTP (or JSON lines on
// stdin/stdout), with no Python in the process. See ../README.md and `lora_server --help`.
#include <httplib.h>

#include <c10/util/Exception.h>

#include <csignal>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <pthread.h>
#include <sys/socket.h>
#include <thread>

#include "backend.h"
#include "http_routes.h"
#include "jsonl.h"
#include "metrics.h"
#include "options.h"
#include "script_backend.h"
#ifdef LORA_SERVER_WITH_EXPORTED
#include "exported_backend.h"
#endif

namespace {

using namespace lora_server;

std::unique_ptr<Backend> make_backend(const Options& o, Metrics& metrics) {
  if (o.backend == "torchscript") return std::make_unique<ScriptBackend>(o.model, metrics);
#ifdef LORA_SERVER_WITH_EXPORTED
  // The package checks every input's dtype, shape and device against the export, so a bad
  // request is an error rather than a read out of bounds (set AOTI_RUNTIME_CHECK_INPUTS=0 to skip).
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);
  BatchOptions batching;
  batching.max_batch = o.max_batch;
  batching.max_wait = std::chrono::microseconds(static_cast<int64_t>(o.max_wait_ms * 1000));
  batching.max_queue = static_cast<size_t>(o.max_queue);
  batching.queue_timeout = std::chrono::milliseconds(o.queue_timeout_ms);
  return std::make_unique<ExportedBackend>(o.model, o.max_cpu_loras, batching, metrics);
#else
  throw std::invalid_argument("this lora_server was built without the exported-model backend "
                              "(its torchlora has no torchlora::serve implementation)");
#endif
}

int serve_http(const Options& o, Backend& backend, Metrics& metrics, const sigset_t& signals) {
  httplib::Server server;
  const auto threads = static_cast<size_t>(o.threads);
  // Every request blocks a worker until its batch ran: batches fill only with enough workers.
  server.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server.set_payload_max_length(static_cast<size_t>(o.max_body_bytes));
  server.set_keep_alive_max_count(1000);
  server.set_keep_alive_timeout(1);  // idle connections let go soon after a shutdown starts
  add_routes(server, backend, metrics, o.input, static_cast<size_t>(o.max_body_bytes));
  // httplib listens with a backlog of 5: a burst of new connections would overflow it and some
  // clients see their connection reset. Remember the socket to listen again with a larger one.
  socket_t listening = INVALID_SOCKET;
  server.set_socket_options([&listening](socket_t sock) {
    httplib::default_socket_options(sock);
    listening = sock;
  });

  const int port = o.port == 0 ? server.bind_to_any_port(o.host) : (server.bind_to_port(o.host, o.port) ? o.port : -1);
  if (port < 0) {
    std::cerr << "lora_server: cannot listen on " << o.host << ":" << o.port << "\n";
    return 1;
  }
  if (listening != INVALID_SOCKET) ::listen(listening, SOMAXCONN);
  // SIGTERM / SIGINT: stop accepting, let the workers finish what they accepted.
  std::thread on_signal([&server, signals] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (sig == SIGTERM || sig == SIGINT) {
      std::cerr << "lora_server: " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", finishing in-flight requests\n";
    }
    server.stop();
  });
  std::cerr << "lora_server: " << backend.kind() << " backend, listening on http://" << o.host << ":" << port
            << std::endl;
  const bool ok = server.listen_after_bind();
  // listen_after_bind returns once stop() ran and the workers finished; wake the signal thread
  // if it was something else that ended the loop.
  if (!ok) pthread_kill(on_signal.native_handle(), SIGTERM);
  on_signal.join();
  backend.drain();
  std::cerr << "lora_server: stopped\n";
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage << "\nbackends: torchscript"
#ifdef LORA_SERVER_WITH_EXPORTED
                << " exported"
#endif
                << "\n";
      return 0;
    }
  }
  Options options;
  try {
    options = parse_options(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "lora_server: " << e.what() << "\n" << kUsage;
    return 2;
  }
  // Signals go to the waiting thread only: block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  if (!options.jsonl) pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  Metrics metrics;
  std::unique_ptr<Backend> backend;
  try {
    backend = make_backend(options, metrics);
    for (const auto& [name, folder] : options.adapters) backend->load_adapter(name, folder);
  } catch (const c10::Error& e) {
    std::cerr << "lora_server: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "lora_server: " << e.what() << "\n";
    return 1;
  }
  if (backend->kind() == "torchscript") {
    std::cerr << "lora_server: note: TorchScript is deprecated upstream (torch 2.10+); a model exported with "
                 "torchlora.export (.pt2) serves adapters in shared batches\n";
  }
  if (options.jsonl) {
    std::cerr << "lora_server: " << backend->kind() << " backend, ready (JSON lines on stdin)\n";
    serve_jsonl(*backend, options.input, std::cin, std::cout);
    backend->drain();
    return 0;
  }
  return serve_http(options, *backend, metrics, signals);
}
