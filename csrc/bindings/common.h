// Shared by the binding translation units: the Python-side types that own core
// objects. Every function here expects the GIL to be held unless it says so.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "core/archive.h"
#include "core/file_memory.h"
#include "core/storage_plan.h"

namespace fastckpt::bindings {

namespace py = pybind11;

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

// Destroys a StoragePlan (which joins its eager reader) with the GIL released.
struct PlanDeleter {
  void operator()(StoragePlan* plan) const {
    py::gil_scoped_release release;
    delete plan;
  }
};
using PlanHolder = std::unique_ptr<StoragePlan, PlanDeleter>;

// StoragePlan::wait with the GIL released. Requires the GIL.
inline void wait_for(StoragePlan& plan, const StoragePlan::Entry& e) {
  py::gil_scoped_release release;
  plan.wait(e);
}

// Sets OSError(code, strerror, filename): Python picks the subclass
// (FileNotFoundError, IsADirectoryError...) from the code. Requires the GIL.
[[noreturn]] void raise_os_error(int code, const std::string& filename);

void register_archive(py::module_& m);
void register_unpickler(py::module_& m);
void register_writer(py::module_& m);
void register_reader(py::module_& m);
void register_plan(py::module_& m);

}  // namespace fastckpt::bindings
