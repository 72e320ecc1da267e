// Shared by the binding translation units: the Python-side types that own core
// objects. Every function here expects the GIL to be held unless it says so.
#pragma once

#include <pybind11/pybind11.h>

#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <string>
#include <vector>

#include "core/copy_engine.h"
#include "core/mapped_file.h"
#include "core/zip_index.h"

namespace fastckpt::bindings {

namespace py = pybind11;

// A writable 1-D byte range over memory owned by `owner`; exports the buffer
// protocol and keeps `owner` alive for as long as any Python object (a
// memoryview, a torch tensor from torch.frombuffer) references it.
struct ByteView {
  std::shared_ptr<MappedFile> owner;
  uint8_t* data;
  size_t size;
};

// A contiguous buffer borrowed from a Python object for the duration of a call.
struct BorrowedBuffer {
  Py_buffer view{};
  BorrowedBuffer(py::handle obj, bool writable) {
    if (PyObject_GetBuffer(obj.ptr(), &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) != 0)
      throw py::error_already_set();
  }
  ~BorrowedBuffer() { PyBuffer_Release(&view); }
  uint8_t* data() const { return static_cast<uint8_t*>(view.buf); }
  size_t size() const { return static_cast<size_t>(view.len); }
};

// An opened archive: the bytes plus their validated index.
struct Archive {
  std::shared_ptr<MappedFile> file;
  ZipIndex index;

  const ZipRecord& record(const std::string& name) const;  // throws RecordError
  // The data of a stored record, checked to lie within the file and to have
  // compressed_size == size; throws RecordError otherwise.
  ByteView stored_view(const ZipRecord& record) const;
};

// The eager read of many records into one arena, running on a background
// thread so the caller can unpickle meanwhile. Completion is tracked per
// record: wait_record(i) returns as soon as record i is in the arena and
// checked, while the others are still being read.
class ReadJob {
 public:
  ReadJob(std::shared_ptr<Archive> archive, std::vector<const ZipRecord*> records, bool check_crc,
          unsigned threads);
  ~ReadJob();  // joins the reader (GIL released)
  ReadJob(const ReadJob&) = delete;
  ReadJob& operator=(const ReadJob&) = delete;

  ByteView buffer() const { return {arena_, arena_->mutable_data(), arena_->size()}; }
  const std::vector<const ZipRecord*>& records() const { return records_; }
  const std::vector<uint64_t>& offsets() const { return offsets_; }  // of records() in buffer()

  // Waits (GIL released) until records()[i] is complete; rethrows the job's
  // failure, raises IntegrityError if its CRC does not match. Requires the GIL.
  void wait_record(size_t i);
  // Waits for every record, then raises IntegrityError for the first whose
  // CRC does not match. Requires the GIL.
  void wait();

 private:
  void record_done(size_t i, uint32_t crc);  // on a worker thread
  void check(size_t i) const;

  std::shared_ptr<Archive> archive_;
  std::vector<const ZipRecord*> records_;
  bool check_crc_;
  std::vector<uint64_t> offsets_;
  std::shared_ptr<MappedFile> arena_;
  std::mutex mutex_;  // guards done_, crcs_, finished_, error_
  std::condition_variable changed_;
  std::vector<uint8_t> done_;
  std::vector<uint32_t> crcs_;
  bool finished_ = false;
  std::exception_ptr error_;
  std::thread worker_;
};

// Sets OSError(code, strerror, filename): Python picks the subclass
// (FileNotFoundError, IsADirectoryError...) from the code. Requires the GIL.
[[noreturn]] void raise_os_error(int code, const std::string& filename);

void register_archive(py::module_& m);
void register_unpickler(py::module_& m);
void register_writer(py::module_& m);
void register_reader(py::module_& m);

}  // namespace fastckpt::bindings
