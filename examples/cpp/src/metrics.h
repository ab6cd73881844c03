// The server's Prometheus metrics: requests by route and status code, batch sizes, queue and
// forward times, plus counters a backend reports (the adapter pool's slot statistics).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace lora_server {

// A cumulative histogram with fixed upper bounds (Prometheus "le" buckets).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double value);
  // Appends the _bucket, _sum and _count lines of `name`.
  void render(const std::string& name, const std::string& help, std::string& out) const;

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // per bucket, not cumulative; the last one is +Inf
  double sum_ = 0;
  int64_t count_ = 0;
};

// One named value a backend exposes, e.g. {"torchlora_pool_slot_hits_total", "counter", ...}.
struct ExternalMetric {
  std::string name, type, help;
  double value = 0;
};

class Metrics {
 public:
  Metrics();
  void count_request(const std::string& route, int status);
  void observe_batch(int64_t requests, int64_t rows);
  void observe_queue_seconds(double seconds);
  void observe_forward_seconds(double seconds);
  // The Prometheus text exposition format (version 0.0.4).
  std::string render(const std::vector<ExternalMetric>& external) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, int>, int64_t> requests_;
  Histogram batch_requests_, batch_rows_, queue_seconds_, forward_seconds_;
};

}  // namespace lora_server
