// Shared by the binding translation units: the Python-side types that own core
// objects. Every function here expects the GIL to be held unless it says so.
#pragma once

#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/archive.h"
#include "core/file_memory.h"
#include "core/storage_plan.h"

namespace fastckpt::bindings {

namespace py = pybind11;

// A file-system path argument: every binding that hands a path to the core
// takes one. Converted as Python's open() converts it (str, bytes or
// os.PathLike; str encoded with the file-system encoding), so a path with an
// embedded NUL raises ValueError("embedded null byte") instead of naming the
// shorter path the C string would stop at.
struct FsPath {
  std::string native;  // the bytes the system calls get
  py::object given;    // os.fspath() of the argument, for messages
};

// Sets OSError(code, strerror, filename): Python picks the subclass
// (FileNotFoundError, IsADirectoryError...) from the code. Requires the GIL.
[[noreturn]] void raise_os_error(int code, const std::string& filename);
[[noreturn]] void raise_os_error(int code, const FsPath& path);

// A core message as a str: file names in it are bytes of any encoding.
inline py::str message_text(const char* what) {
  PyObject* s = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "backslashreplace");
  if (s == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(s);
}

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

void register_archive(py::module_& m);
void register_unpickler(py::module_& m);
void register_writer(py::module_& m);
void register_reader(py::module_& m);
void register_plan(py::module_& m);

}  // namespace fastckpt::bindings

namespace pybind11::detail {

template <>
struct type_caster<fastckpt::bindings::FsPath> {
  PYBIND11_TYPE_CASTER(fastckpt::bindings::FsPath, const_name("os.PathLike"));
  // Throws (ValueError, TypeError) rather than returning false: a bad path is
  // the caller's error, not a reason to try another overload.
  bool load(handle src, bool) {
    PyObject* encoded = nullptr;
    if (PyUnicode_FSConverter(src.ptr(), &encoded) == 0) throw error_already_set();
    object bytes = reinterpret_steal<object>(encoded);
    value.native.assign(PyBytes_AS_STRING(encoded), static_cast<size_t>(PyBytes_GET_SIZE(encoded)));
    PyObject* given = PyOS_FSPath(src.ptr());
    if (given == nullptr) throw error_already_set();
    value.given = reinterpret_steal<object>(given);
    return true;
  }
  static handle cast(const fastckpt::bindings::FsPath& p, return_value_policy, handle) { return p.given.inc_ref(); }
};

}  // namespace pybind11::detail
