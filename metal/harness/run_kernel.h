// The CPU execution model of the Metal harness: one std::thread per thread of a threadgroup, a real
// std::barrier per threadgroup (threadgroup_barrier) and per SIMD group (simd_* exchanges).
//
// A launch creates the threadgroup's threads once; they walk the threadgroups of the grid one after
// another, meeting at a barrier between groups, so function-scope `threadgroup` arrays (mapped to
// `static` storage by metal_compat.h) act as the memory of the one threadgroup that is running.
// Each thread finds its context through a thread_local pointer, which is how the free functions
// threadgroup_barrier() / simd_sum() know their group.
//
// Included before metal_compat.h (its macros would rename `thread`), so plain C++ here.
#pragma once
#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

namespace mh {

constexpr unsigned kSimdWidth = 32;

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  unsigned count() const { return x * y * z; }
};

struct GroupShared {
  explicit GroupShared(unsigned n) : threads(n), group_barrier(n), slots(n) {
    for (unsigned s = 0; s < n; s += kSimdWidth) {
      const unsigned width = n - s < kSimdWidth ? n - s : kSimdWidth;
      simd_barriers.emplace_back(std::make_unique<std::barrier<>>(width));
    }
  }
  unsigned threads;
  std::barrier<> group_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> simd_barriers;
  std::vector<uint64_t> slots;  // one exchange slot per thread for the simd_* functions
};

// Everything a kernel parameter with a thread-position attribute can ask for.
struct Pos {
  Dim3 grid_pos;       // [[thread_position_in_grid]]
  Dim3 group_pos;      // [[threadgroup_position_in_grid]]
  Dim3 local_pos;      // [[thread_position_in_threadgroup]]
  Dim3 group_size;     // [[threads_per_threadgroup]]
  Dim3 groups;         // [[threadgroups_per_grid]]
  unsigned tid = 0;    // [[thread_index_in_threadgroup]]
  unsigned lane = 0;   // [[thread_index_in_simdgroup]]
  unsigned simd = 0;   // [[simdgroup_index_in_threadgroup]]
  unsigned simd_width = kSimdWidth;  // [[threads_per_simdgroup]]
};

struct ThreadCtx {
  GroupShared* shared;
  unsigned tid, lane, simd, simd_width;
};

inline thread_local ThreadCtx* tl_ctx = nullptr;

inline ThreadCtx& ctx() {
  if (!tl_ctx) throw std::logic_error("metal harness: a barrier or simd function ran outside a launch");
  return *tl_ctx;
}

inline void group_barrier() { ctx().shared->group_barrier.arrive_and_wait(); }

// SIMD-group exchange: every lane publishes its value, all lanes meet, each reads what it needs, all
// meet again before a slot may be reused. Calls must be reached by every lane (uniform control flow),
// exactly as on the GPU; a lane that skips one deadlocks here instead of silently passing.
template <class T, class F>
T simd_exchange(T v, F&& combine) {
  static_assert(sizeof(T) <= 8, "simd exchange of a type wider than 8 bytes");
  ThreadCtx& c = ctx();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  c.shared->slots[c.tid] = bits;
  std::barrier<>& b = *c.shared->simd_barriers[c.simd];
  b.arrive_and_wait();
  const unsigned base = c.simd * kSimdWidth;
  auto read = [&](unsigned lane) {
    T out;
    std::memcpy(&out, &c.shared->slots[base + lane], sizeof(T));
    return out;
  };
  T r = combine(read, c.lane, c.simd_width, v);
  b.arrive_and_wait();
  return r;
}

struct LaunchOptions {
  // Before its first threadgroup, thread t sleeps (threads - 1 - t) * skew_us microseconds, so the
  // highest thread index runs first and the lowest last: a read of another thread's threadgroup
  // write that is not ordered by a barrier then sees stale memory deterministically.
  unsigned skew_us = 0;
};

// Runs body(pos) for every thread of `groups` threadgroups of `group_size` threads.
template <class Body>
void launch(Dim3 groups, Dim3 group_size, const LaunchOptions& opt, Body&& body) {
  const unsigned n = group_size.count();
  if (n == 0 || n > 1024) throw std::invalid_argument("metal harness: threads per threadgroup must be in [1, 1024]");
  if (groups.count() == 0) return;
  GroupShared shared(n);
  std::exception_ptr error;
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (unsigned t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      ThreadCtx c{&shared, t, t % kSimdWidth, t / kSimdWidth,
                  (n - (t / kSimdWidth) * kSimdWidth) < kSimdWidth ? n - (t / kSimdWidth) * kSimdWidth : kSimdWidth};
      tl_ctx = &c;
      if (opt.skew_us) std::this_thread::sleep_for(std::chrono::microseconds(opt.skew_us * (n - 1 - t)));
      Pos p;
      p.group_size = group_size;
      p.groups = groups;
      p.tid = t;
      p.lane = c.lane;
      p.simd = c.simd;
      p.simd_width = c.simd_width;
      p.local_pos = Dim3{t % group_size.x, (t / group_size.x) % group_size.y, t / (group_size.x * group_size.y)};
      for (unsigned gz = 0; gz < groups.z; ++gz)
        for (unsigned gy = 0; gy < groups.y; ++gy)
          for (unsigned gx = 0; gx < groups.x; ++gx) {
            p.group_pos = Dim3{gx, gy, gz};
            p.grid_pos = Dim3{gx * group_size.x + p.local_pos.x, gy * group_size.y + p.local_pos.y,
                              gz * group_size.z + p.local_pos.z};
            body(p);
            // The next threadgroup reuses the `static` threadgroup arrays: nobody starts it before
            // everybody has finished this one.
            shared.group_barrier.arrive_and_wait();
          }
      tl_ctx = nullptr;
    });
  }
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace mh
