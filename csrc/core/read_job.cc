#include "core/read_job.h"

#include <stdexcept>

#include "core/copy_engine.h"
#include "core/errors.h"

namespace fastckpt {

ReadJob::ReadJob(std::shared_ptr<const Archive> archive, std::vector<const ZipRecord*> records, bool check_crc,
                 unsigned threads)
    : archive_(std::move(archive)), records_(std::move(records)), check_crc_(check_crc),
      memory_(records_.size()), done_(records_.size(), 0), crcs_(records_.size(), 0) {
  // Records below kSmall share blocks of up to kBlock bytes, each record 64-byte aligned in it.
  constexpr uint64_t kSmall = uint64_t{64} << 10, kBlock = uint64_t{1} << 20;
  std::vector<CopyTask> tasks;
  tasks.reserve(records_.size());
  for (size_t i = 0; i < records_.size();) {
    const ZipRecord& r = *records_[i];
    archive_->stored_data(r);  // stored and inside the file: bounds the size before it sizes memory
    if (r.size >= kSmall) {
      std::shared_ptr<FileMemory> own = FileMemory::heap(static_cast<size_t>(r.size));
      memory_[i] = {own, own->mutable_data(), static_cast<size_t>(r.size)};
      tasks.push_back({r.data_offset, r.size, own->mutable_data(), check_crc_});
      ++i;
      continue;
    }
    // A run of small records (each checked against the file, so the block is bounded by it).
    size_t end = i;
    uint64_t used = 0;
    std::vector<uint64_t> at;
    while (end < records_.size() && records_[end]->size < kSmall && (end == i || used + records_[end]->size <= kBlock)) {
      archive_->stored_data(*records_[end]);
      at.push_back(used);
      used = (used + records_[end]->size + 63) & ~uint64_t{63};
      ++end;
    }
    std::shared_ptr<FileMemory> block = used != 0 ? FileMemory::heap(static_cast<size_t>(used)) : nullptr;
    for (size_t j = i; j < end; ++j) {
      const ZipRecord& s = *records_[j];
      // SAFETY: at[j - i] + s.size <= used, the block's size, by construction of `at`.
      uint8_t* data = s.size != 0 ? block->mutable_data() + at[j - i] : nullptr;
      if (s.size != 0) memory_[j] = {block, data, static_cast<size_t>(s.size)};
      tasks.push_back({s.data_offset, s.size, data, check_crc_});
    }
    i = end;
  }
  worker_ = std::thread([this, tasks = std::move(tasks), threads]() {
    std::exception_ptr error;
    try {
      run_copies(*archive_->file, tasks, threads, [this](size_t i, uint32_t crc) { record_done(i, crc); });
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    finished_ = true;
    error_ = error;
    changed_.notify_all();
  });
}

ReadJob::~ReadJob() {
  if (worker_.joinable()) worker_.join();
}

void ReadJob::record_done(size_t i, uint32_t crc) {
  std::lock_guard<std::mutex> lock(mutex_);
  done_[i] = 1;
  crcs_[i] = crc;
  if (waiting_ != 0) changed_.notify_all();
}

void ReadJob::check(size_t i) const {
  if (check_crc_) archive_->check_crc(*records_[i], crcs_[i]);
}

void ReadJob::wait_record(size_t i) {
  if (i >= records_.size()) throw std::out_of_range("ReadJob::wait_record");
  std::unique_lock<std::mutex> lock(mutex_);
  ++waiting_;
  changed_.wait(lock, [&] { return done_[i] != 0 || finished_; });
  --waiting_;
  if (!done_[i]) {
    if (error_) std::rethrow_exception(error_);
    fail(ErrorKind::Record, "record '" + records_[i]->name + "' was not read");
  }
  check(i);
}

void ReadJob::wait() {
  if (worker_.joinable()) worker_.join();
  if (error_) std::rethrow_exception(error_);
  for (size_t i = 0; i < records_.size(); ++i) check(i);
}

}  // namespace fastckpt
