// The eager read of many records on a background thread, so the caller can
// unpickle meanwhile. Records get heap memory, as torch's CPU allocator gives
// each storage: freeing a tensor frees its bytes, and a later load reuses the
// pages (fresh mappings would fault every byte in again). Small records share
// blocks (one allocation per ~1 MiB of them, not one each). Completion is
// tracked per record.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "core/archive.h"

namespace fastckpt {

class ReadJob {
 public:
  // Starts reading at once; CRC-32 checked on the way when `check_crc`.
  ReadJob(std::shared_ptr<const Archive> archive, std::vector<const ZipRecord*> records, bool check_crc,
          unsigned threads);
  ~ReadJob();  // joins the reader
  ReadJob(const ReadJob&) = delete;
  ReadJob& operator=(const ReadJob&) = delete;

  const std::vector<const ZipRecord*>& records() const noexcept { return records_; }
  // Where records()[i] is read into (no owner for an empty record); complete
  // once wait_record(i) returned.
  const ByteView& memory(size_t i) const { return memory_.at(i); }

  // Blocks until records()[i] is complete; rethrows the job's failure, throws
  // Error(Integrity) if its CRC does not match.
  void wait_record(size_t i);
  // Blocks until every record is complete, then throws for the first failure
  // or CRC mismatch.
  void wait();

 private:
  void record_done(size_t i, uint32_t crc);  // on a worker thread
  void check(size_t i) const;

  std::shared_ptr<const Archive> archive_;
  std::vector<const ZipRecord*> records_;
  bool check_crc_;
  std::vector<ByteView> memory_;
  std::mutex mutex_;  // guards done_, crcs_, finished_, error_, waiting_
  std::condition_variable changed_;
  std::vector<uint8_t> done_;
  std::vector<uint32_t> crcs_;
  bool finished_ = false;
  unsigned waiting_ = 0;  // threads in wait_record: completions notify only when someone waits
  std::exception_ptr error_;
  std::thread worker_;
};

}  // namespace fastckpt
