// Collects concurrent requests and runs them as ONE forward of an exported model, whatever their
// adapters: each row carries its adapter's pool slot. A batch closes at max_batch requests or
// when its oldest request has waited max_wait; it holds requests of one trailing input shape and
// dtype (so they concatenate along the batch dimension) and only as many distinct adapters as
// the pool's slots allow (AdapterPool::fits). The queue is bounded, and a request that waited
// longer than queue_timeout gets 503 instead of running.
#pragma once

#include <ATen/core/ivalue.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <torchlora/serve/adapter_pool.h>
#include <torchlora/serve/exported_model.h>

#include "backend.h"
#include "metrics.h"

namespace lora_server {

struct BatchOptions {
  int64_t max_batch = 32;                          // requests per forward
  std::chrono::microseconds max_wait{2000};         // how long a batch may wait to fill
  size_t max_queue = 1024;                          // queued requests before 503
  std::chrono::milliseconds queue_timeout{10000};   // longest wait in the queue before 503
};

class BatchQueue {
 public:
  BatchQueue(const torchlora::serve::ExportedModel& model, torchlora::serve::AdapterPool& pool, Metrics& metrics,
             BatchOptions options);
  ~BatchQueue();

  // Queues one request; HttpError(503) if the queue is full or stopping.
  std::future<c10::IValue> submit(ForwardRequest request);
  // Runs everything queued, then stops the worker; later submits get 503. Idempotent.
  void stop();

 private:
  using Clock = std::chrono::steady_clock;
  struct Pending {
    torchlora::serve::AdapterRequest adapter;
    at::Tensor input;
    Clock::time_point queued;
    std::promise<c10::IValue> result;
  };
  using Batch = std::vector<std::unique_ptr<Pending>>;

  void run();
  Batch take_batch();  // with mutex_ held
  void execute(Batch batch);

  const torchlora::serve::ExportedModel& model_;
  torchlora::serve::AdapterPool& pool_;
  Metrics& metrics_;
  const BatchOptions options_;

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Pending>> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace lora_server
