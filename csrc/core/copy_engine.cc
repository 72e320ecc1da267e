// Parallel copy + CRC of byte ranges.
//
// Split into work units, then run. Every task is bounds-checked before any byte moves. Large
// tasks are cut into chunks so several workers share them (fresh destination
// memory faults at a few GB/s per core: first-touch is what parallelism buys);
// runs of small tasks are batched so a checkpoint of thousands of tiny tensors
// costs a handful of work units and, for files, a handful of pread(2) calls.
// Units run on the shared work pool (core/work_pool.h); chunk CRCs are
// merged with crc32_combine when a task's last chunk is done.
#include "core/copy_engine.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <system_error>
#include <thread>

#include "core/checked_math.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/work_pool.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

namespace fastckpt {
namespace {

// A large task is split into chunks of this size, the unit of work sharing.
constexpr uint64_t kChunkBytes = uint64_t{8} << 20;
// Tasks shorter than this are batched with their neighbours.
constexpr uint64_t kSmallTaskBytes = uint64_t{64} << 10;
// A batch holds at most this many tasks and bytes, so units stay small
// enough to balance across workers...
constexpr size_t kBatchTasks = 4096;
constexpr uint64_t kBatchBytes = uint64_t{4} << 20;
// ...and, for copies from a file, all its copies lie in one file span of at
// most this size, read with a single pread into a per-worker scratch buffer
// (small enough to stay in L2 for the copies out of it).
constexpr uint64_t kSpanBytes = uint64_t{256} << 10;
// Copy then CRC in steps this size, so the CRC reads bytes still in L2.
constexpr uint64_t kStepBytes = uint64_t{256} << 10;
// Below this much work per worker, starting a thread costs more than it saves.
constexpr uint64_t kBytesPerWorker = uint64_t{1} << 20;
// One pread call reads at most this much (Linux caps a call near 2 GiB).
constexpr uint64_t kMaxReadBytes = uint64_t{1} << 30;
// Reading from a file, the kernel is asked (POSIX_FADV_WILLNEED) to have
// this much beyond the unit being started on its way from the disk, so the
// disk stays busy while workers populate, copy and checksum (devices with
// the common 128 KiB read_ahead_kb need it).
constexpr uint64_t kReadAheadBytes = uint64_t{64} << 20;

// What one worker does at a time: either one chunk of a large task, or a
// batch of consecutive small tasks (plus the file span to pread first when
// the batch copies from a file).
struct Unit {
  size_t first_task;
  size_t end_task;         // batch: tasks [first_task, end_task); chunk: first_task + 1
  bool chunk;
  uint64_t chunk_offset;   // chunk: byte range of the task
  uint64_t chunk_length;
  uint64_t span_begin;     // batch: file range to pread up front
  uint64_t span_end;       // == span_begin: nothing
};

bool has_work(const CopyTask& t) {
  return t.length != 0 && (t.destination != nullptr || t.compute_crc);
}

struct WorkUnits {
  std::vector<Unit> units;
  uint64_t total_bytes = 0;  // saturating
};

WorkUnits split_into_units(const FileMemory& file, const std::vector<CopyTask>& tasks) {
  const bool use_pread = file.fd() >= 0;
  WorkUnits work;
  bool batch_open = false;
  uint64_t batch_bytes = 0;

  for (size_t i = 0; i < tasks.size(); ++i) {
    const CopyTask& t = tasks[i];
    if (!has_work(t)) continue;  // inside a batch's range it is skipped at run time
    if (!checked_add(work.total_bytes, t.length, &work.total_bytes)) work.total_bytes = UINT64_MAX;

    if (t.length >= kSmallTaskBytes) {
      batch_open = false;
      for (uint64_t off = 0; off < t.length; off += kChunkBytes)
        work.units.push_back({i, i + 1, true, off, std::min(kChunkBytes, t.length - off), 0, 0});
      continue;
    }

    // A small task: join the open batch while the batch stays bounded.
    const bool reads = use_pread;  // copies and verify-only tasks both read the file
    const uint64_t end = t.source_offset + t.length;  // inside the file: checked by the caller
    if (batch_open) {
      const Unit& u = work.units.back();
      bool fits = u.end_task - u.first_task < kBatchTasks && batch_bytes + t.length <= kBatchBytes;
      if (fits && reads && u.span_end != u.span_begin)
        fits = std::max(u.span_end, end) - std::min(u.span_begin, t.source_offset) <= kSpanBytes;
      batch_open = fits;
    }
    if (!batch_open) {
      work.units.push_back({i, i, false, 0, 0, 0, 0});
      batch_open = true;
      batch_bytes = 0;
    }
    Unit& u = work.units.back();
    if (reads) {
      const bool empty = u.span_end == u.span_begin;
      u.span_begin = empty ? t.source_offset : std::min(u.span_begin, t.source_offset);
      u.span_end = empty ? end : std::max(u.span_end, end);
    }
    u.end_task = i + 1;
    batch_bytes += t.length;
  }
  return work;
}

// Reads exactly n bytes at `offset`, retrying on EINTR and short reads.
void pread_full(const FileMemory& file, uint8_t* out, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const size_t want = static_cast<size_t>(std::min(n, kMaxReadBytes));
    const ssize_t got = ::pread(file.fd(), out, want, static_cast<off_t>(file.file_offset() + offset));
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
  Runner(const FileMemory& file, const std::vector<CopyTask>& tasks, const WorkUnits& work, const TaskDone& on_done,
         unsigned workers)
      : file_(file), tasks_(tasks), work_(work), on_done_(on_done), results_(tasks.size()),
        chunk_crc_(work.units.size(), 0), chunks_left_(new std::atomic<uint32_t>[tasks.size()]),
        first_chunk_(tasks.size(), 0), scratch_(workers == 0 ? 1 : workers) {
    for (size_t i = 0; i < tasks.size(); ++i) chunks_left_[i].store(0, std::memory_order_relaxed);
    for (size_t u = work.units.size(); u-- > 0;) {
      if (!work.units[u].chunk) continue;
      chunks_left_[work.units[u].first_task].fetch_add(1, std::memory_order_relaxed);
      first_chunk_[work.units[u].first_task] = u;  // chunks of a task are consecutive units
    }
    if (const char* delay = std::getenv("FASTCKPT_TEST_READ_DELAY_US")) delay_us_ = std::atol(delay);
  }

  // Runs one unit on `worker`'s thread.
  void run_unit(size_t u, unsigned worker) {
    std::unique_ptr<uint8_t[]>& scratch = scratch_[worker];  // allocated on first use, left uninitialised
    const Unit& unit = work_.units[u];
    if (delay_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us_));
    if (file_.fd() >= 0) read_ahead(u);
    if (unit.chunk) {
      const CopyTask& t = tasks_[unit.first_task];
      if (t.destination != nullptr) {
        chunk_crc_[u] = copy(t, unit.chunk_offset, unit.chunk_length);
      } else if (file_.fd() >= 0) {
        if (!scratch) scratch.reset(new uint8_t[kSpanBytes]);
        chunk_crc_[u] = crc_of_file(t.source_offset + unit.chunk_offset, unit.chunk_length, scratch.get());
      } else {
        chunk_crc_[u] = crc32(0, file_.data() + t.source_offset + unit.chunk_offset,
                              static_cast<size_t>(unit.chunk_length));
      }
      // The last chunk of a task to finish completes it (acq_rel: it sees the others' CRCs).
      if (chunks_left_[unit.first_task].fetch_sub(1, std::memory_order_acq_rel) == 1) complete_chunked(unit.first_task);
    } else {
      if (unit.span_end != unit.span_begin && !scratch) scratch.reset(new uint8_t[kSpanBytes]);
      run_batch(unit, scratch.get());
    }
  }

  // Hints the units from `u` on that start within kReadAheadBytes of u's
  // end, each unit once (the claimed prefix only grows), contiguous ones in
  // one call; only bytes some unit will read are hinted, so a partial load
  // reads no gaps.
  void read_ahead(size_t u) {
    const std::vector<Unit>& units = work_.units;
    const uint64_t horizon = unit_end(units[u]) + kReadAheadBytes;
    size_t seen = next_hint_.load(std::memory_order_relaxed);
    size_t to;
    do {
      to = std::max(seen, u);
      while (to < units.size() && unit_begin(units[to]) < horizon) ++to;
      if (to <= seen) return;
    } while (!next_hint_.compare_exchange_weak(seen, to, std::memory_order_relaxed));
    for (size_t v = std::max(seen, u); v < to;) {
      const uint64_t begin = unit_begin(units[v]);
      uint64_t end = unit_end(units[v]);
      while (++v < to && unit_begin(units[v]) >= end && unit_begin(units[v]) - end < kSmallTaskBytes)
        end = unit_end(units[v]);
      ::posix_fadvise(file_.fd(), static_cast<off_t>(file_.file_offset() + begin), static_cast<off_t>(end - begin),
                      POSIX_FADV_WILLNEED);
    }
  }

  // The file range a unit reads.
  uint64_t unit_begin(const Unit& w) const {
    return w.chunk ? tasks_[w.first_task].source_offset + w.chunk_offset : w.span_begin;
  }
  uint64_t unit_end(const Unit& w) const { return w.chunk ? unit_begin(w) + w.chunk_length : w.span_end; }

  // After every worker has joined.
  std::vector<CopyResult> take_results() {
    return std::move(results_);
  }

 private:
  // Merges a task's chunk CRCs, in order, and reports the task done.
  void complete_chunked(size_t task) {
    if (tasks_[task].compute_crc) {
      uint32_t crc = 0;
      for (size_t u = first_chunk_[task]; u < work_.units.size() && work_.units[u].chunk &&
                                          work_.units[u].first_task == task; ++u)
        crc = work_.units[u].chunk_offset == 0 ? chunk_crc_[u]
                                               : crc32_combine(crc, chunk_crc_[u], work_.units[u].chunk_length);
      results_[task].crc32 = crc;
    }
    if (on_done_) on_done_(task, results_[task].crc32);
  }

  void run_batch(const Unit& unit, uint8_t* scratch) {
    const uint64_t span = unit.span_end - unit.span_begin;
    if (span > 0) pread_full(file_, scratch, span, unit.span_begin);
    for (size_t i = unit.first_task; i < unit.end_task; ++i) {
      const CopyTask& t = tasks_[i];
      if (!has_work(t)) continue;
      const auto n = static_cast<size_t>(t.length);
      if (t.destination == nullptr) {
        // Verify only: CRC of the file's bytes (read into the span), or of
        // the buffer's.
        results_[i].crc32 = crc32(0, span > 0 ? scratch + (t.source_offset - unit.span_begin)
                                              : file_.data() + t.source_offset, n);
        if (on_done_) on_done_(i, results_[i].crc32);
        continue;
      }
      // SAFETY: the task's source range was checked against the file; with a
      // span, it lies inside [span_begin, span_end) by construction of the
      // batch, and span <= kSpanBytes, the scratch size.
      const uint8_t* src = span > 0 ? scratch + (t.source_offset - unit.span_begin)
                                    : file_.data() + t.source_offset;
      std::memcpy(t.destination, src, n);
      if (t.compute_crc) results_[i].crc32 = crc32(0, t.destination, n);
      if (on_done_) on_done_(i, results_[i].crc32);
    }
  }

  // CRC of [offset, offset + length) of the file, read through `scratch` in
  // steps: verifying reads the file itself (not pages a caller may have
  // written through the private mapping) and maps nothing into the process.
  uint32_t crc_of_file(uint64_t offset, uint64_t length, uint8_t* scratch) {
    uint32_t crc = 0;
    for (uint64_t done = 0; done < length; done += kStepBytes) {
      const uint64_t n = std::min(kStepBytes, length - done);
      // SAFETY: the range was checked against the file; n <= kStepBytes <= kSpanBytes.
      pread_full(file_, scratch, n, offset + done);
      crc = crc32(crc, scratch, static_cast<size_t>(n));
    }
    return crc;
  }

  // Faults in the destination's whole pages with one call: fresh memory costs
  // a page fault per 4 KiB otherwise, taken one by one inside pread (about
  // 13% of a 2 GB eager load here). A hint: older kernels refuse it, harmlessly.
  static void populate(uint8_t* dst, uint64_t length) {
    const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(dst) + page - 1) & ~(page - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(dst) + length) & ~(page - 1);
    if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
  }

  // Copies [offset, offset + length) of a task in steps, the CRC of each
  // step read back from the destination while it is still in cache.
  uint32_t copy(const CopyTask& t, uint64_t offset, uint64_t length) {
    const uint64_t src = t.source_offset + offset;
    uint8_t* dst = t.destination + offset;
    populate(dst, length);
    const uint64_t step = t.compute_crc ? kStepBytes : length;
    uint32_t crc = 0;
    for (uint64_t done = 0; done < length; done += step) {
      const uint64_t n = std::min(step, length - done);
      // SAFETY: the task's source range was checked against the file and the
      // chunk lies inside the task; the destination is the caller's buffer
      // of at least t.length bytes.
      if (file_.fd() >= 0)
        pread_full(file_, dst + done, n, src + done);
      else
        std::memcpy(dst + done, file_.data() + src + done, static_cast<size_t>(n));
      if (t.compute_crc) crc = crc32(crc, dst + done, static_cast<size_t>(n));
    }
    return crc;
  }

  const FileMemory& file_;
  const std::vector<CopyTask>& tasks_;
  const WorkUnits& work_;
  const TaskDone& on_done_;
  // Each element is written by the one worker that owns its task or unit.
  std::vector<CopyResult> results_;
  std::vector<uint32_t> chunk_crc_;
  std::unique_ptr<std::atomic<uint32_t>[]> chunks_left_;  // per task: chunks not yet done
  std::vector<size_t> first_chunk_;                       // per chunked task: its first unit
  long delay_us_ = 0;
  std::atomic<size_t> next_hint_{0};  // units before it are hinted
  std::vector<std::unique_ptr<uint8_t[]>> scratch_;  // one span buffer per worker
};

// Copies [offset, offset + length) of `c`, CRC of each step read back from
// the destination while it is in cache. Returns the CRC (0 when not asked).
uint32_t copy_range(const MemoryCopy& c, uint64_t offset, uint64_t length, bool compute_crc) {
  uint32_t crc = 0;
  const uint64_t step = compute_crc ? kStepBytes : length;
  for (uint64_t done = 0; done < length; done += step) {
    const uint64_t n = std::min(step, length - done);
    // SAFETY: the range lies inside the copy, whose source and destination
    // hold c.length bytes (the caller's contract).
    std::memcpy(c.destination + offset + done, c.source + offset + done, static_cast<size_t>(n));
    if (compute_crc) crc = crc32(crc, c.destination + offset + done, static_cast<size_t>(n));
  }
  return crc;
}

}  // namespace

std::vector<uint32_t> copy_memory(const std::vector<MemoryCopy>& copies, bool compute_crc, unsigned threads) {
  // Units as run_copies makes them: a chunk of a large copy, or a batch of
  // consecutive small ones.
  struct MemoryUnit {
    size_t first, end;  // copies [first, end)
    uint64_t offset, length;  // chunk: a byte range of copies[first]; batch: length 0
  };
  std::vector<MemoryUnit> units;
  uint64_t total = 0, batch_bytes = 0;
  bool batch_open = false;
  for (size_t i = 0; i < copies.size(); ++i) {
    const MemoryCopy& c = copies[i];
    if (c.length == 0) continue;
    if (c.destination == nullptr || c.source == nullptr)
      fail(ErrorKind::Record, "copy " + std::to_string(i) + " of " + std::to_string(c.length) + " bytes has no memory");
    if (!checked_add(total, c.length, &total)) fail(ErrorKind::Limit, "copies of more than 2^64 bytes");
    if (c.length >= kSmallTaskBytes) {
      batch_open = false;
      for (uint64_t off = 0; off < c.length; off += kChunkBytes)
        units.push_back({i, i + 1, off, std::min(kChunkBytes, c.length - off)});
      continue;
    }
    if (batch_open) {
      const MemoryUnit& u = units.back();
      batch_open = u.end - u.first < kBatchTasks && batch_bytes + c.length <= kBatchBytes;
    }
    if (!batch_open) {
      units.push_back({i, i, 0, 0});
      batch_open = true;
      batch_bytes = 0;
    }
    units.back().end = i + 1;
    batch_bytes += c.length;
  }
  if (threads == 0) threads = default_thread_count();
  uint64_t workers = std::min<uint64_t>(threads, units.size());
  workers = std::min(workers, std::max<uint64_t>(1, total / kBytesPerWorker));

  std::vector<uint32_t> crcs(copies.size(), 0);
  std::vector<uint32_t> chunk_crc(units.size(), 0);
  run_units(units.size(), static_cast<unsigned>(workers), [&](size_t u, unsigned) {
    const MemoryUnit& unit = units[u];
    if (unit.length != 0) {
      chunk_crc[u] = copy_range(copies[unit.first], unit.offset, unit.length, compute_crc);
      return;
    }
    for (size_t i = unit.first; i < unit.end; ++i)
      crcs[i] = copy_range(copies[i], 0, copies[i].length, compute_crc);
  });
  for (size_t u = 0; u < units.size(); ++u) {
    const MemoryUnit& unit = units[u];
    if (unit.length == 0) continue;
    uint32_t& value = crcs[unit.first];
    value = unit.offset == 0 ? chunk_crc[u] : crc32_combine(value, chunk_crc[u], unit.length);
  }
  return crcs;
}

std::vector<CopyResult> run_copies(const FileMemory& file, const std::vector<CopyTask>& tasks,
                                   unsigned threads, const TaskDone& on_done) {
  for (size_t i = 0; i < tasks.size(); ++i) {
    const CopyTask& t = tasks[i];
    if (!range_within(t.source_offset, t.length, file.size()))
      fail(ErrorKind::Record, "copy task " + std::to_string(i) + ": bytes [" +
                                  std::to_string(t.source_offset) + ", +" +
                                  std::to_string(t.length) + ") lie outside " +
                                  (file.path().empty() ? std::string("the buffer") : file.path()) +
                                  " (" + std::to_string(file.size()) + " bytes)");
  }
  const WorkUnits work = split_into_units(file, tasks);

  if (threads == 0) threads = default_thread_count();
  uint64_t workers = std::min<uint64_t>(threads, work.units.size());
  workers = std::min(workers, std::max<uint64_t>(1, work.total_bytes / kBytesPerWorker));

  if (on_done)  // tasks without work are complete from the start
    for (size_t i = 0; i < tasks.size(); ++i)
      if (!has_work(tasks[i])) on_done(i, 0);
  Runner runner(file, tasks, work, on_done, static_cast<unsigned>(workers));
  run_units(work.units.size(), static_cast<unsigned>(workers),
            [&runner](size_t u, unsigned worker) { runner.run_unit(u, worker); });
  return runner.take_results();
}

}  // namespace fastckpt
