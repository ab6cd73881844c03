#include "batch_queue.h"

#include <ATen/ops/cat.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <exception>
#include <string>

#include "http_error.h"

namespace lora_server {
namespace {

namespace serve = torchlora::serve;

std::exception_ptr http_error(int status, const std::string& message) {
  return std::make_exception_ptr(HttpError(status, message));
}

// Requests batch together when they concatenate along dim 0.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.dim() == b.dim() && a.sizes().slice(1) == b.sizes().slice(1);
}

}  // namespace

BatchQueue::BatchQueue(const serve::ExportedModel& model, serve::AdapterPool& pool, Metrics& metrics,
                       BatchOptions options)
    : model_(model), pool_(pool), metrics_(metrics), options_(options) {
  TORCH_CHECK(options_.max_batch >= 1, "max_batch must be >= 1, got ", options_.max_batch);
  TORCH_CHECK(options_.max_queue >= 1, "max_queue must be >= 1");
  worker_ = std::thread([this] { run(); });
}

BatchQueue::~BatchQueue() { stop(); }

std::future<c10::IValue> BatchQueue::submit(ForwardRequest request) {
  auto pending = std::make_unique<Pending>();
  pending->adapter = {request.adapter == "__base__" ? std::string() : request.adapter, request.scale};
  pending->input = std::move(request.input);
  pending->queued = Clock::now();
  auto future = pending->result.get_future();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) throw HttpError(503, "the server is shutting down");
    if (queue_.size() >= options_.max_queue) {
      throw HttpError(503, "the request queue is full (" + std::to_string(options_.max_queue) + " requests)");
    }
    queue_.push_back(std::move(pending));
  }
  wake_.notify_one();
  return future;
}

void BatchQueue::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void BatchQueue::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping with nothing left
    // Let the batch fill until it is full or its oldest request has waited long enough.
    const auto deadline = queue_.front()->queued + options_.max_wait;
    while (!stopping_ && static_cast<int64_t>(queue_.size()) < options_.max_batch && Clock::now() < deadline) {
      wake_.wait_until(lock, deadline);
    }
    auto batch = take_batch();
    lock.unlock();
    if (!batch.empty()) execute(std::move(batch));
    lock.lock();
  }
}

BatchQueue::Batch BatchQueue::take_batch() {
  const auto now = Clock::now();
  Batch batch;
  std::vector<serve::AdapterRequest> adapters;
  for (auto it = queue_.begin(); it != queue_.end() && static_cast<int64_t>(batch.size()) < options_.max_batch;) {
    auto& p = *it;
    if (now - p->queued > options_.queue_timeout) {
      p->result.set_exception(http_error(503, "the request waited in the queue longer than " +
                                                  std::to_string(options_.queue_timeout.count()) + " ms"));
      it = queue_.erase(it);
      continue;
    }
    bool joins = batch.empty();
    if (!joins && same_layout(batch.front()->input, p->input)) {
      try {
        joins = pool_.fits(adapters, p->adapter);
      } catch (const c10::Error&) {
        joins = true;  // acquire reports the problem for this request alone
      }
    }
    if (!joins) {
      ++it;
      continue;
    }
    adapters.push_back(p->adapter);
    batch.push_back(std::move(p));
    it = queue_.erase(it);
  }
  return batch;
}

void BatchQueue::execute(Batch batch) {
  const auto start = Clock::now();
  // All or nothing: acquire names the adapter it cannot serve; that adapter's requests fail
  // alone and the others try again.
  std::vector<serve::AdapterRequest> rows;
  std::optional<serve::BatchLease> lease;
  while (!batch.empty() && !lease) {
    rows.clear();
    for (const auto& p : batch) rows.insert(rows.end(), static_cast<size_t>(p->input.size(0)), p->adapter);
    std::string failed;
    int status = 0;
    std::string message;
    try {
      lease.emplace(pool_.acquire(rows));
    } catch (const serve::AdapterNotFound& e) {
      failed = e.adapter(), status = 404, message = e.what_without_backtrace();
    } catch (const serve::AdapterRejected& e) {
      failed = e.adapter(), status = 400, message = e.what_without_backtrace();
    } catch (const serve::PoolExhausted& e) {
      for (auto& p : batch) p->result.set_exception(http_error(503, e.what_without_backtrace()));
      return;
    } catch (const c10::Error& e) {
      for (auto& p : batch) p->result.set_exception(http_error(400, e.what_without_backtrace()));
      return;
    }
    if (lease) break;
    auto keep = batch.begin();
    for (auto& p : batch) {
      if (p->adapter.adapter == failed) {
        p->result.set_exception(http_error(status, message));
      } else {
        *keep++ = std::move(p);
      }
    }
    batch.erase(keep, batch.end());
  }
  if (batch.empty()) return;

  for (const auto& p : batch) metrics_.observe_queue_seconds(std::chrono::duration<double>(start - p->queued).count());
  metrics_.observe_batch(static_cast<int64_t>(batch.size()), static_cast<int64_t>(rows.size()));
  try {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> inputs;
    for (const auto& p : batch) inputs.push_back(p->input);
    const auto x = inputs.size() == 1 ? inputs.front() : at::cat(inputs, 0);
    const auto forward_start = Clock::now();
    const auto outputs = model_.forward({x}, pool_, *lease);
    lease->release();
    metrics_.observe_forward_seconds(std::chrono::duration<double>(Clock::now() - forward_start).count());
    // Row-aligned outputs are split back per request; others (e.g. a scalar) go to everyone.
    const auto total = x.size(0);
    int64_t offset = 0;
    for (auto& p : batch) {
      const auto n = p->input.size(0);
      std::vector<c10::IValue> parts;
      for (const auto& out : outputs) {
        parts.emplace_back(out.dim() > 0 && out.size(0) == total ? out.narrow(0, offset, n) : out);
      }
      offset += n;
      p->result.set_value(parts.size() == 1 ? parts.front() : c10::ivalue::Tuple::create(std::move(parts)));
    }
  } catch (const c10::Error& e) {
    for (auto& p : batch) {
      p->result.set_exception(http_error(400, std::string("the model rejected the input: ") + e.what_without_backtrace()));
    }
  } catch (const std::exception& e) {  // AOTInductor's input checks (dtype, shape) throw these
    for (auto& p : batch) {
      p->result.set_exception(http_error(400, std::string("the model rejected the input: ") + e.what()));
    }
  }
}

}  // namespace lora_server
