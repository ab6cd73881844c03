#include "slot_runs.h"

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "../detail/multi_lora_checks.h"

namespace torchlora::cpu {

std::vector<SlotRun> slot_runs(const at::Tensor& slot_index, int64_t slots, const char* op) {
  detail::check_slot_values(slot_index, slots, op);
  const at::Tensor idx = slot_index.contiguous();
  std::vector<SlotRun> runs;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "torchlora_slot_runs", [&] {
    const index_t* p = idx.const_data_ptr<index_t>();
    const int64_t n = idx.numel();
    for (int64_t t = 0; t < n;) {
      int64_t e = t + 1;
      while (e < n && p[e] == p[t]) ++e;
      if (p[t] >= 0) runs.push_back({t, e, static_cast<int64_t>(p[t])});
      t = e;
    }
  });
  return runs;
}

std::vector<SlotRun> split_runs(const std::vector<SlotRun>& runs, int64_t max_rows) {
  std::vector<SlotRun> units;
  units.reserve(runs.size());
  for (const auto& run : runs) {
    for (int64_t b = run.begin; b < run.end; b += max_rows) units.push_back({b, std::min(run.end, b + max_rows), run.slot});
  }
  return units;
}

std::vector<std::vector<SlotRun>> runs_by_slot(const std::vector<SlotRun>& runs, int64_t slots) {
  std::vector<int64_t> group(static_cast<size_t>(slots), -1);
  std::vector<std::vector<SlotRun>> groups;
  for (const auto& run : runs) {
    auto& g = group[static_cast<size_t>(run.slot)];
    if (g < 0) {
      g = static_cast<int64_t>(groups.size());
      groups.emplace_back();
    }
    groups[static_cast<size_t>(g)].push_back(run);
  }
  return groups;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TORCHLORA_DOT_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define TORCHLORA_DOT_CLONES
#endif

namespace {
template <typename T, int kLanes>
inline __attribute__((always_inline)) T dot_lanes(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[k + l] * b[k + l];
  }
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}
}  // namespace

// Short vectors (the rank, in the expand) take 8 lanes, long ones (the input features) 32.
TORCHLORA_DOT_CLONES
float dot_f32(const float* a, const float* b, int64_t n) {
  return n < 64 ? dot_lanes<float, 8>(a, b, n) : dot_lanes<float, 32>(a, b, n);
}

TORCHLORA_DOT_CLONES
double dot_f64(const double* a, const double* b, int64_t n) {
  return n < 32 ? dot_lanes<double, 4>(a, b, n) : dot_lanes<double, 16>(a, b, n);
}

}  // namespace torchlora::cpu
