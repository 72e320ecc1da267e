#include "core/read_job.h"

#include <stdexcept>

#include "core/copy_engine.h"
#include "core/errors.h"

namespace fastckpt {

ReadJob::ReadJob(std::shared_ptr<const Archive> archive, std::vector<const ZipRecord*> records, bool check_crc,
                 unsigned threads)
    : archive_(std::move(archive)), records_(std::move(records)), check_crc_(check_crc),
      memory_(records_.size()), done_(records_.size(), 0), crcs_(records_.size(), 0) {
  std::vector<CopyTask> tasks;
  tasks.reserve(records_.size());
  for (size_t i = 0; i < records_.size(); ++i) {
    const ZipRecord& r = *records_[i];
    archive_->stored_data(r);  // stored and inside the file: bounds the size before it sizes memory
    if (r.size != 0) memory_[i] = MappedFile::heap(static_cast<size_t>(r.size));
    tasks.push_back({r.data_offset, r.size, r.size != 0 ? memory_[i]->mutable_data() : nullptr, check_crc_});
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
  changed_.notify_all();
}

void ReadJob::check(size_t i) const {
  if (check_crc_) check_crc(*records_[i], crcs_[i]);
}

void ReadJob::wait_record(size_t i) {
  if (i >= records_.size()) throw std::out_of_range("ReadJob::wait_record");
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return done_[i] != 0 || finished_; });
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
