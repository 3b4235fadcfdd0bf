// The thread pool of pool.h: persistent workers that spin briefly for the next job, then sleep on a condition
// variable; jobs are shared_ptr-owned so a worker waking late never touches a finished job's state.

#include "pool.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace omnimini {
namespace {

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t total;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void run(Job& job) {
  for (int64_t c; (c = job.next.fetch_add(1, std::memory_order_relaxed)) < job.total;) {
    (*job.fn)(c);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return static_cast<int>(threads_.size()); }

  void submit(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
  }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      // spin ~50 us for the next job (a decode step issues them back to back), then sleep
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
        for (int i = 0; i < 64; ++i) _mm_pause();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        if (stop_) return;
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job) run(*job);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
  bool stop_ = false;
};

std::mutex pool_mutex;  // one job at a time (ops may be called from several Python threads)

}  // namespace

void parallel_chunks(int64_t n_chunks, const std::function<void(int64_t)>& fn) {
  const int threads = at::get_num_threads();
  if (n_chunks <= 1 || threads <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(c);
    return;
  }
  std::unique_lock<std::mutex> busy(pool_mutex, std::try_to_lock);
  if (!busy.owns_lock()) {  // another thread is using the pool: run here rather than queue behind it
    for (int64_t c = 0; c < n_chunks; ++c) fn(c);
    return;
  }
  static std::unique_ptr<Pool> pool;
  if (!pool || pool->size() != threads - 1) {
    pool.reset();
    pool = std::make_unique<Pool>(threads - 1);
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->total = n_chunks;
  pool->submit(job);
  run(*job);
  // only chunks a worker has taken remain: wait for those
  for (int spins = 0; job->done.load(std::memory_order_acquire) < n_chunks; ++spins) {
    if (spins < 4096) _mm_pause();
    else std::this_thread::yield();  // the worker holding the last chunk was preempted: give it the core
  }
}

}  // namespace omnimini
