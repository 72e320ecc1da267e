#include "core/copy_engine.h"

#include <cstring>
#include <thread>

#include "core/checked_math.h"
#include "core/crc32.h"
#include "core/errors.h"

namespace fastckpt {

unsigned default_thread_count() noexcept {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : n;
}

std::vector<CopyResult> run_copies(const MappedFile& file, const std::vector<CopyTask>& tasks,
                                   unsigned) {
  // Work in progress: serial memcpy version.
  std::vector<CopyResult> results(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    const CopyTask& t = tasks[i];
    if (!range_within(t.source_offset, t.length, file.size()))
      fail(ErrorKind::Record, "copy range outside the file");
    const uint8_t* src = file.data() + t.source_offset;
    if (t.destination != nullptr) std::memcpy(t.destination, src, t.length);
    if (t.compute_crc) results[i].crc32 = crc32(0, src, t.length);
  }
  return results;
}

}  // namespace fastckpt
