// Rows of a mixed batch grouped for the CPU kernels of the multi-adapter operators: the runs of
// consecutive rows that share a slot (a prefill request is one run of L rows; a decode batch is
// T runs of one row), computed once per call from the slot indices.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace torchlora::cpu {

struct SlotRun {
  int64_t begin, end, slot;  // rows [begin, end) all take `slot`
  int64_t rows() const { return end - begin; }
};

// The runs of rows with a slot (rows with -1 are left out), after checking every index is in
// [-1, slots); `op` names the operator in the error.
std::vector<SlotRun> slot_runs(const at::Tensor& slot_index, int64_t slots, const char* op);

// The runs cut into pieces of at most max_rows rows: units of work that balance across threads.
std::vector<SlotRun> split_runs(const std::vector<SlotRun>& runs, int64_t max_rows);

// The runs of each slot that has rows, one list per slot: reductions into a slot's gradient
// then never write from two threads.
std::vector<std::vector<SlotRun>> runs_by_slot(const std::vector<SlotRun>& runs, int64_t slots);

// Below this many rows a run takes the row kernels (dot products), above it a BLAS GEMM.
constexpr int64_t kGemmMinRows = 8;

// fn(i) for i in [0, n): in parallel when there are several units and threads (BLAS then runs on
// one thread inside each), else in order on this thread (so a single large GEMM threads itself).
template <typename Fn>
void for_each_unit(int64_t n, Fn&& fn) {
  if (n >= 2 && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) fn(i);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) fn(i);
  }
}

// sum_k a[k] * b[k] over contiguous vectors, in the vector's precision with independent lanes
// (so the compiler vectorises it without reassociating a single sum).
float dot_f32(const float* a, const float* b, int64_t n);
double dot_f64(const double* a, const double* b, int64_t n);

inline float dot(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
inline double dot(const double* a, const double* b, int64_t n) { return dot_f64(a, b, n); }

}  // namespace torchlora::cpu
