// The extension module fastckpt._core: error translation and registration.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/common.h"
#include "bindings/storage_reference.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/tensor_bounds.h"

namespace fastckpt::bindings {
namespace {

const char* exception_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::Format: return "FormatError";
    case ErrorKind::Integrity: return "IntegrityError";
    case ErrorKind::Record: return "RecordError";
    case ErrorKind::Limit: return "LimitError";
    case ErrorKind::Unpickling: return "UnpicklingError";
    case ErrorKind::UnsafeGlobal: return "UnsafeGlobalError";
    case ErrorKind::Metadata: return "MetadataError";
  }
  return "CheckpointError";
}

// The Python classes live in fastckpt.errors; looked up when first needed so
// the extension stays importable on its own.
// An error about one record carries its name and keys as attributes
// (IntegrityError.record / .keys), set here rather than parsed from the text.
void translate(const Error& e) {
  py::object cls = py::module_::import("fastckpt.errors").attr(exception_name(e.kind()));
  py::object exc = cls(message_text(e.what()));
  if (e.record().empty()) {
    PyErr_SetObject(cls.ptr(), exc.ptr());
    return;
  }
  exc.attr("record") = e.record();
  exc.attr("keys") = py::tuple(py::cast(e.keys()));
  PyErr_SetObject(cls.ptr(), exc.ptr());
}

}  // namespace
}  // namespace fastckpt::bindings

PYBIND11_MODULE(_core, m) {
  namespace py = pybind11;
  using namespace fastckpt;
  m.doc() = "fastckpt native core: strict zip index, mmap, CRC-32, restricted unpickler, zip writer";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      bindings::translate(e);
    }
  });

  m.def(
      "crc32",
      [](py::buffer data, uint32_t value) {
        bindings::BorrowedBuffer in(data, /*writable=*/false);
        py::gil_scoped_release release;
        return crc32(value, in.data(), in.size());
      },
      py::arg("data"), py::arg("value") = 0,
      "CRC-32 of a contiguous buffer, continuing `value` (like zlib.crc32). Releases the GIL.");
  m.def("crc32_combine", &crc32_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"));
  m.def("crc32_implementation", &crc32_implementation);
  m.def(
      "check_tensor_in_storage",
      [](int64_t offset, const std::vector<int64_t>& size, const std::vector<int64_t>& stride, uint32_t element_bits,
         uint64_t storage_nbytes) { check_tensor_in_storage(offset, size, stride, element_bits, storage_nbytes); },
      py::arg("offset"), py::arg("size"), py::arg("stride"), py::arg("element_bits"), py::arg("storage_nbytes"),
      "Raise MetadataError unless the tensor lies inside its storage (the rule the builder applies).");

  m.def(
      "storage_reference",
      [](py::handle pid) {
        PersistentId scratch;
        StorageId id = bindings::read_storage_reference(pid, scratch);
        return py::make_tuple(id.key, id.location, id.numel);
      },
      py::arg("pid"),
      "(key, location, numel) of a storage's persistent id ('storage', type, key, location, numel), judged by "
      "the rule both native builders apply (UnsafeGlobalError / MetadataError otherwise).");
  m.def(
      "storage_nbytes",
      [](const std::string& key, uint64_t numel, uint32_t itemsize) {
        return storage_nbytes(StorageId{key, std::string(), numel}, itemsize);
      },
      py::arg("key"), py::arg("numel"), py::arg("itemsize"),
      "numel * itemsize, overflow-checked (MetadataError naming storage `key`).");

  bindings::register_archive(m);
  bindings::register_unpickler(m);
  bindings::register_writer(m);
  bindings::register_reader(m);
  bindings::register_plan(m);
}
