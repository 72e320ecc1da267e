// A small thread pool that moves byte ranges of a checkpoint into destination
// buffers and computes CRC-32 on the way. No Python, no GIL: callers release it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/file_memory.h"
#include "core/work_pool.h"  // default_thread_count

namespace fastckpt {

struct CopyTask {
  uint64_t source_offset;  // into the FileMemory (bounds-checked by the engine)
  uint64_t length;
  uint8_t* destination;    // nullptr: CRC only (verify)
  bool compute_crc;
};

struct CopyResult {
  uint32_t crc32 = 0;      // valid when the task asked for it
};

// Called once per task as soon as its bytes (and CRC, when asked) are
// complete, on the worker thread that completed it; must not throw.
using TaskDone = std::function<void(size_t task, uint32_t crc32)>;

// Runs every task, splitting large ones into chunks spread over `threads`
// workers (0 = default_thread_count()). Files with a descriptor are read with
// pread(2) so eager copies do not fault the mapping into the process, with
// read-ahead hints ahead of the workers; anonymous buffers are copied with
// memcpy. Throws std::system_error on I/O
// errors and fastckpt::Error(Record) when a range lies outside the file.
// FASTCKPT_TEST_READ_DELAY_US (tests only) delays every unit of work, so a
// test can catch a reader of bytes that are not there yet.
std::vector<CopyResult> run_copies(const FileMemory& file, const std::vector<CopyTask>& tasks,
                                   unsigned threads = 0, const TaskDone& on_done = {});

// One memory-to-memory copy: `length` bytes from `source` to `destination`.
struct MemoryCopy {
  uint8_t* destination;
  const uint8_t* source;
  uint64_t length;
};

// Copies every range in parallel (large ones split into chunks over
// `threads` workers, small ones batched), computing each destination's CRC-32
// on the way, step by step while the bytes are in cache, when asked (0
// otherwise). The ranges must be valid and must not overlap a destination.
std::vector<uint32_t> copy_memory(const std::vector<MemoryCopy>& copies, bool compute_crc, unsigned threads = 0);

}  // namespace fastckpt
