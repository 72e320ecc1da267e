// Parallel copy + CRC of byte ranges.
//
// Plan, then run. Every task is bounds-checked before any byte moves. Large
// tasks are cut into chunks so several workers share them (fresh destination
// memory faults at a few GB/s per core: first-touch is what parallelism buys);
// small tasks are batched so a checkpoint of thousands of tiny tensors costs a
// handful of work units and, for files, a handful of pread(2) calls. Workers
// pull units from an atomic counter; the caller's thread is one of them. Each
// piece of a task gets its own CRC, merged afterwards with crc32_combine.
#include "core/copy_engine.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

#include "core/checked_math.h"
#include "core/crc32.h"
#include "core/errors.h"

namespace fastckpt {
namespace {

// A large task is split into chunks of this size, the unit of work sharing.
constexpr uint64_t kChunkBytes = uint64_t{8} << 20;
// Tasks shorter than this are batched with their neighbours.
constexpr uint64_t kSmallTaskBytes = uint64_t{64} << 10;
// A batch holds at most this many bytes of tasks...
constexpr uint64_t kBatchBytes = uint64_t{4} << 20;
// ...and, for copies from a file, all its copies lie in one file span of at
// most this size, read with a single pread into a per-worker scratch buffer.
constexpr uint64_t kSpanBytes = uint64_t{1} << 20;
// Copy then CRC in steps this size, so the CRC reads bytes still in L2.
constexpr uint64_t kStepBytes = uint64_t{256} << 10;
// Below this much work per worker, starting a thread costs more than it saves.
constexpr uint64_t kBytesPerWorker = uint64_t{1} << 20;
// One pread call reads at most this much (Linux caps a call near 2 GiB).
constexpr uint64_t kMaxReadBytes = uint64_t{1} << 30;

// A byte range [offset, offset + length) of one task.
struct Piece {
  size_t task;
  uint64_t offset;
  uint64_t length;
};

// What one worker does at a time: consecutive pieces, plus the file span to
// pread first when the unit is a batch of small copies from a file.
struct Unit {
  size_t first_piece;
  size_t piece_count;
  uint64_t span_begin;
  uint64_t span_end;  // == span_begin: nothing to pread up front
};

struct Plan {
  std::vector<Piece> pieces;
  std::vector<Unit> units;
  std::vector<size_t> first_piece;  // per task, index into pieces
  std::vector<size_t> piece_count;  // per task
  uint64_t total_bytes = 0;         // saturating
};

bool has_work(const CopyTask& t) {
  return t.length != 0 && (t.destination != nullptr || t.compute_crc);
}

Plan make_plan(const MappedFile& file, const std::vector<CopyTask>& tasks) {
  const bool use_pread = file.fd() >= 0;
  Plan plan;
  plan.first_piece.resize(tasks.size());
  plan.piece_count.resize(tasks.size(), 0);
  bool batch_open = false;
  uint64_t batch_bytes = 0;

  for (size_t i = 0; i < tasks.size(); ++i) {
    const CopyTask& t = tasks[i];
    plan.first_piece[i] = plan.pieces.size();
    if (!has_work(t)) continue;
    if (!checked_add(plan.total_bytes, t.length, &plan.total_bytes)) plan.total_bytes = UINT64_MAX;

    if (t.length >= kSmallTaskBytes) {
      batch_open = false;
      for (uint64_t off = 0; off < t.length; off += kChunkBytes) {
        plan.units.push_back({plan.pieces.size(), 1, 0, 0});
        plan.pieces.push_back({i, off, std::min(kChunkBytes, t.length - off)});
        ++plan.piece_count[i];
      }
      continue;
    }

    // A small task: join the open batch when the batch stays bounded.
    const bool reads = use_pread && t.destination != nullptr;
    const uint64_t end = t.source_offset + t.length;  // inside the file: checked by the caller
    if (batch_open) {
      Unit& u = plan.units.back();
      bool fits = batch_bytes + t.length <= kBatchBytes;
      if (fits && reads && u.span_end != u.span_begin)
        fits = std::max(u.span_end, end) - std::min(u.span_begin, t.source_offset) <= kSpanBytes;
      batch_open = fits;
    }
    if (!batch_open) {
      plan.units.push_back({plan.pieces.size(), 0, 0, 0});
      batch_open = true;
      batch_bytes = 0;
    }
    Unit& u = plan.units.back();
    if (reads) {
      if (u.span_end == u.span_begin) {
        u.span_begin = t.source_offset;
        u.span_end = end;
      } else {
        u.span_begin = std::min(u.span_begin, t.source_offset);
        u.span_end = std::max(u.span_end, end);
      }
    }
    ++u.piece_count;
    batch_bytes += t.length;
    plan.pieces.push_back({i, 0, t.length});
    plan.piece_count[i] = 1;
  }
  return plan;
}

// Reads exactly n bytes at `offset`, retrying on EINTR and short reads.
void pread_full(const MappedFile& file, uint8_t* out, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const size_t want = static_cast<size_t>(std::min(n, kMaxReadBytes));
    const ssize_t got = ::pread(file.fd(), out, want, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::generic_category(), "pread " + file.path());
    }
    if (got == 0)
      fail(ErrorKind::Record, "unexpected end of file at offset " + std::to_string(offset) +
                                  " of " + file.path() + ": the file shrank after it was opened");
    const auto done = static_cast<uint64_t>(got);
    out += done;
    offset += done;
    n -= done;
  }
}

class Runner {
 public:
  Runner(const MappedFile& file, const std::vector<CopyTask>& tasks, const Plan& plan)
      : file_(file), tasks_(tasks), plan_(plan), piece_crc_(plan.pieces.size(), 0) {}

  // Pulls units until none is left or a worker failed. Never throws: the
  // first failure is kept for the caller.
  void work() noexcept {
    try {
      std::vector<uint8_t> scratch;
      while (!failed_.load(std::memory_order_relaxed)) {
        const size_t u = next_unit_.fetch_add(1, std::memory_order_relaxed);
        if (u >= plan_.units.size()) break;
        run_unit(plan_.units[u], scratch);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }

  // After every worker has joined.
  std::vector<CopyResult> results() const {
    if (error_) std::rethrow_exception(error_);
    std::vector<CopyResult> out(tasks_.size());
    for (size_t i = 0; i < tasks_.size(); ++i) {
      if (!tasks_[i].compute_crc || plan_.piece_count[i] == 0) continue;
      const size_t first = plan_.first_piece[i];
      uint32_t crc = piece_crc_[first];
      for (size_t j = first + 1; j < first + plan_.piece_count[i]; ++j)
        crc = crc32_combine(crc, piece_crc_[j], plan_.pieces[j].length);
      out[i].crc32 = crc;
    }
    return out;
  }

 private:
  void run_unit(const Unit& unit, std::vector<uint8_t>& scratch) {
    const uint64_t span = unit.span_end - unit.span_begin;
    if (span > 0) {
      if (scratch.size() < kSpanBytes) scratch.resize(kSpanBytes);
      pread_full(file_, scratch.data(), span, unit.span_begin);
    }
    for (size_t p = unit.first_piece; p < unit.first_piece + unit.piece_count; ++p) {
      const Piece& piece = plan_.pieces[p];
      const CopyTask& t = tasks_[piece.task];
      const uint64_t src = t.source_offset + piece.offset;
      const size_t n = static_cast<size_t>(piece.length);
      if (t.destination == nullptr) {
        // Verify only: CRC straight from the mapping.
        piece_crc_[p] = crc32(0, file_.data() + src, n);
      } else if (span > 0) {
        // SAFETY: [src, src+n) lies in [span_begin, span_end) by construction
        // of the batch, and span <= kSpanBytes <= scratch.size().
        uint8_t* dst = t.destination + piece.offset;
        std::memcpy(dst, scratch.data() + (src - unit.span_begin), n);
        if (t.compute_crc) piece_crc_[p] = crc32(0, dst, n);
      } else {
        piece_crc_[p] = copy(t, piece, src);
      }
    }
  }

  // Copies one piece in steps, CRC of each step read back from the
  // destination while it is still in cache.
  uint32_t copy(const CopyTask& t, const Piece& piece, uint64_t src) {
    uint8_t* dst = t.destination + piece.offset;
    const bool from_file = file_.fd() >= 0;
    const uint64_t step = t.compute_crc ? kStepBytes : piece.length;
    uint32_t crc = 0;
    for (uint64_t done = 0; done < piece.length; done += step) {
      const uint64_t n = std::min(step, piece.length - done);
      // SAFETY: the task's source range was checked against the file and the
      // piece lies inside the task; the destination is the caller's buffer
      // of at least t.length bytes.
      if (from_file)
        pread_full(file_, dst + done, n, src + done);
      else
        std::memcpy(dst + done, file_.data() + src + done, static_cast<size_t>(n));
      if (t.compute_crc) crc = crc32(crc, dst + done, static_cast<size_t>(n));
    }
    return crc;
  }

  const MappedFile& file_;
  const std::vector<CopyTask>& tasks_;
  const Plan& plan_;
  std::vector<uint32_t> piece_crc_;  // each slot written by one worker
  std::atomic<size_t> next_unit_{0};
  std::atomic<bool> failed_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

}  // namespace

unsigned default_thread_count() noexcept {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return static_cast<unsigned>(n);
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

std::vector<CopyResult> run_copies(const MappedFile& file, const std::vector<CopyTask>& tasks,
                                   unsigned threads) {
  for (size_t i = 0; i < tasks.size(); ++i) {
    const CopyTask& t = tasks[i];
    if (!range_within(t.source_offset, t.length, file.size()))
      fail(ErrorKind::Record, "copy task " + std::to_string(i) + ": bytes [" +
                                  std::to_string(t.source_offset) + ", +" +
                                  std::to_string(t.length) + ") lie outside " +
                                  (file.path().empty() ? std::string("the buffer") : file.path()) +
                                  " (" + std::to_string(file.size()) + " bytes)");
  }
  const Plan plan = make_plan(file, tasks);

  if (threads == 0) threads = default_thread_count();
  uint64_t workers = std::min<uint64_t>(threads, plan.units.size());
  workers = std::min(workers, std::max<uint64_t>(1, plan.total_bytes / kBytesPerWorker));

  Runner runner(file, tasks, plan);
  std::vector<std::thread> pool;
  if (workers > 1) {
    pool.reserve(static_cast<size_t>(workers - 1));
    for (uint64_t w = 1; w < workers; ++w) {
      try {
        pool.emplace_back([&runner] { runner.work(); });
      } catch (const std::system_error&) {
        break;  // no more threads to be had: the ones running finish the work
      }
    }
  }
  runner.work();
  for (std::thread& th : pool) th.join();
  return runner.results();
}

}  // namespace fastckpt
