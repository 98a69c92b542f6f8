// Persistent pool behind calibra::parallel_for (see parallel.h for why not OpenMP).
#include "calibra/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace calibra {
namespace {

int default_threads() {
  if (const char* env = std::getenv("CALIBRA_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

thread_local bool t_inside_parallel = false;

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // leaked on purpose: workers may outlive static destructors
    return *pool;
  }

  int threads() const { return threads_.load(); }
  void set_threads(int n) { threads_.store(std::max(1, n)); }

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    grain = std::max<int64_t>(1, grain);
    int64_t chunks = std::min<int64_t>(threads(), (n + grain - 1) / grain);
    if (chunks <= 1 || t_inside_parallel) {
      fn(0, n);
      return;
    }
    std::lock_guard<std::mutex> serialize(run_mutex_);  // one parallel region at a time
    ensure_workers(static_cast<int>(chunks) - 1);
    const int64_t per = (n + chunks - 1) / chunks;
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = &fn;
      job_n_ = n;
      job_per_ = per;
      job_chunks_ = chunks;
      next_chunk_ = 1;
      pending_ = static_cast<int>(chunks) - 1;
      ++generation_;
    }
    cv_.notify_all();
    t_inside_parallel = true;
    fn(0, std::min(n, per));
    t_inside_parallel = false;
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  Pool() : threads_(default_threads()) {}

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      workers_.emplace_back([this] { worker_loop(); });
      workers_.back().detach();
    }
  }

  void worker_loop() {
    t_inside_parallel = true;
    uint64_t seen = 0;
    {
      std::lock_guard<std::mutex> lk(m_);
      seen = generation_;  // a worker born during a job joins from the next one
      // (the job that created it still counts it in pending_, so let it take chunks now)
      if (job_ != nullptr) seen = generation_ - 1;
    }
    for (;;) {
      const std::function<void(int64_t, int64_t)>* job;
      int64_t n, per, chunks;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_ != seen && job_ != nullptr; });
        seen = generation_;
        job = job_;
        n = job_n_;
        per = job_per_;
        chunks = job_chunks_;
      }
      for (;;) {
        int64_t c;
        {
          // Claim under the lock and re-check the generation: a worker that is still here when the
          // caller has moved on to a new job must not run the new job's chunks with the old job.
          std::lock_guard<std::mutex> lk(m_);
          if (generation_ != seen || next_chunk_ >= chunks) break;
          c = next_chunk_++;
        }
        int64_t b = c * per, e = std::min(n, b + per);
        if (b < e) (*job)(b, e);
        std::lock_guard<std::mutex> lk(m_);
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::atomic<int> threads_;
  std::mutex run_mutex_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0, job_per_ = 0, job_chunks_ = 0;
  int64_t next_chunk_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace

int num_threads() { return Pool::get().threads(); }
void set_num_threads(int n) { Pool::get().set_threads(n); }
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Pool::get().run(n, grain, fn);
}

}  // namespace calibra
