// Shared by the binding translation units: the Python-side types that own core
// objects. Every function here expects the GIL to be held unless it says so.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "core/archive.h"
#include "core/mapped_file.h"
#include "core/read_job.h"

namespace fastckpt::bindings {

namespace py = pybind11;

// A writable 1-D byte range over memory owned by `owner`; exports the buffer
// protocol and keeps `owner` alive for as long as any Python object (a
// memoryview, a torch tensor from torch.frombuffer) references it.
struct ByteView {
  std::shared_ptr<MappedFile> owner;
  uint8_t* data = nullptr;
  size_t size = 0;
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

// The data of a stored record as a view that keeps the archive's memory alive;
// throws Error(Record) unless it is stored and inside the file.
inline ByteView stored_view(const Archive& a, const ZipRecord& r) {
  return {a.file, a.stored_data(r), static_cast<size_t>(r.size)};
}

// Destroys a ReadJob (which joins its reader) with the GIL released.
struct ReadJobDeleter {
  void operator()(ReadJob* job) const {
    py::gil_scoped_release release;
    delete job;
  }
};
using ReadJobHolder = std::unique_ptr<ReadJob, ReadJobDeleter>;

// ReadJob::wait_record with the GIL released. Requires the GIL.
inline void wait_record(ReadJob& job, size_t i) {
  py::gil_scoped_release release;
  job.wait_record(i);
}

// Sets OSError(code, strerror, filename): Python picks the subclass
// (FileNotFoundError, IsADirectoryError...) from the code. Requires the GIL.
[[noreturn]] void raise_os_error(int code, const std::string& filename);

void register_archive(py::module_& m);
void register_unpickler(py::module_& m);
void register_writer(py::module_& m);
void register_reader(py::module_& m);

}  // namespace fastckpt::bindings
