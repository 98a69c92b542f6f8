// Shared helpers of calibra's C++ benchmarks: median timing, command-line flags, tensor set-up.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "calibra/parallel.h"
#include "calibra/tensor_arg.h"
#include "tensor_args.h"

namespace calibra {
namespace bench {

struct Options {
  bool quick = false;
  int repeat = 7;
  int warmup = 2;
  int threads = 0;  // 0: keep the pool's default
};

inline Options parse(int argc, char** argv, const char* usage) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) o.quick = true;
    else if (!std::strcmp(argv[i], "--repeat") && i + 1 < argc) o.repeat = std::max(1, std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) o.threads = std::atoi(argv[++i]);
    else {
      std::printf("usage: %s %s\n", argv[0], usage);
      std::exit(std::strcmp(argv[i], "--help") ? 2 : 0);
    }
  }
  if (o.threads > 0) set_num_threads(o.threads);
  return o;
}

// Median wall time of fn() in microseconds, after o.warmup untimed runs.
template <class F>
double median_us(const Options& o, F&& fn) {
  for (int i = 0; i < o.warmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < o.repeat; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t.size() % 2 ? t[t.size() / 2] : 0.5 * (t[t.size() / 2 - 1] + t[t.size() / 2]);
}

template <class T>
std::vector<T> randn(size_t n, uint32_t seed = 0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(dist(gen));
  return v;
}

inline void header(const char* title, const char* cols) {
  std::printf("\n## %s (%d threads)\n%s\n", title, num_threads(), cols);
}

}  // namespace bench
}  // namespace calibra
