// The one way the core spreads work over threads: units numbered 0..n-1 are
// pulled from a shared counter by up to `workers` threads, the caller's
// included. No Python, no GIL: callers release it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace fastckpt {

// Default worker count: the number of CPUs the process may run on.
unsigned default_thread_count() noexcept;

// Calls fn(unit, worker) for every unit in [0, units), worker in [0, workers)
// naming the thread (for per-thread scratch). The first exception stops the
// other threads from taking new units and is rethrown once all have joined.
// When no more threads can be started, the ones running finish the work.
template <class Fn>
void run_units(size_t units, unsigned workers, Fn&& fn) {
  if (workers == 0) workers = 1;
  if (workers > units) workers = static_cast<unsigned>(units == 0 ? 1 : units);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;
  auto work = [&](unsigned worker) noexcept {
    try {
      while (!failed.load(std::memory_order_relaxed)) {
        const size_t u = next.fetch_add(1, std::memory_order_relaxed);
        if (u >= units) break;
        fn(u, worker);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (unsigned w = 1; w < workers; ++w) {
    try {
      pool.emplace_back(work, w);
    } catch (const std::system_error&) {
      break;
    }
  }
  work(0);
  for (std::thread& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace fastckpt
