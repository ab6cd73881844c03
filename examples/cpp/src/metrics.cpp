#include "metrics.h"

#include <algorithm>
#include <sstream>

namespace lora_server {
namespace {

std::string number(double v) {
  std::ostringstream s;
  s.precision(12);
  s << v;
  return s.str();
}

void header(const std::string& name, const std::string& type, const std::string& help, std::string& out) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

const std::vector<double> kSizeBounds = {1, 2, 4, 8, 16, 32, 64, 128, 256};
const std::vector<double> kSecondBounds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                          0.1,    0.25,  0.5,    1,     2.5,  5,     10};

}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  const auto it = std::lower_bound(bounds_.begin(), bounds_.end(), value);
  ++counts_[static_cast<size_t>(it - bounds_.begin())];
  sum_ += value;
  ++count_;
}

void Histogram::render(const std::string& name, const std::string& help, std::string& out) const {
  header(name, "histogram", help, out);
  int64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    out += name + "_bucket{le=\"" + number(bounds_[i]) + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count_) + "\n";
  out += name + "_sum " + number(sum_) + "\n";
  out += name + "_count " + std::to_string(count_) + "\n";
}

Metrics::Metrics()
    : batch_requests_(kSizeBounds), batch_rows_(kSizeBounds), queue_seconds_(kSecondBounds),
      forward_seconds_(kSecondBounds) {}

void Metrics::count_request(const std::string& route, int status) {
  std::lock_guard<std::mutex> lock(mutex_);
  ++requests_[{route, status}];
}

void Metrics::observe_batch(int64_t requests, int64_t rows) {
  std::lock_guard<std::mutex> lock(mutex_);
  batch_requests_.observe(static_cast<double>(requests));
  batch_rows_.observe(static_cast<double>(rows));
}

void Metrics::observe_queue_seconds(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  queue_seconds_.observe(seconds);
}

void Metrics::observe_forward_seconds(double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  forward_seconds_.observe(seconds);
}

std::string Metrics::render(const std::vector<ExternalMetric>& external) const {
  std::string out;
  std::lock_guard<std::mutex> lock(mutex_);
  header("lora_server_requests_total", "counter", "HTTP requests by route and status code.", out);
  for (const auto& [key, count] : requests_) {
    out += "lora_server_requests_total{route=\"" + key.first + "\",code=\"" + std::to_string(key.second) + "\"} " +
           std::to_string(count) + "\n";
  }
  batch_requests_.render("lora_server_batch_requests", "Requests per model forward.", out);
  batch_rows_.render("lora_server_batch_rows", "Rows (samples) per model forward.", out);
  queue_seconds_.render("lora_server_queue_seconds", "Time a request waited before its forward started.", out);
  forward_seconds_.render("lora_server_forward_seconds", "Time of one model forward.", out);
  for (const auto& m : external) {
    header(m.name, m.type, m.help, out);
    out += m.name + " " + number(m.value) + "\n";
  }
  return out;
}

}  // namespace lora_server
