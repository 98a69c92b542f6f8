// A small persistent thread pool for the CPU kernels. We do not use OpenMP: torch ships its own
// OpenMP runtime, and two runtimes in one process fight over threads (or crash).
#pragma once
#include <cstdint>
#include <functional>

namespace calibra {

// Number of threads parallel_for uses (including the caller). Defaults to the CALIBRA_NUM_THREADS
// environment variable, else the hardware concurrency; Python sets it from torch.get_num_threads().
int num_threads();
void set_num_threads(int n);

// Calls fn(begin, end) on disjoint chunks covering [0, n), each at least `grain` long (except
// possibly the last), on up to num_threads() threads; returns when all chunks are done. Nested
// calls run serially on the calling thread. fn must not throw.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace calibra
