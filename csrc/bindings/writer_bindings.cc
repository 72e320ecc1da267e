// fastckpt._core.write_zip: torch.save's archive from Python records. The
// records are gathered with the GIL held; the core runs without it, taking it
// back only to hand bytes to a Python file object's write().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <system_error>
#include <vector>

#include "bindings/common.h"
#include "core/copy_engine.h"
#include "core/zip_writer.h"

namespace fastckpt::bindings {
namespace {

// The records' sources, valid while this object lives (requires the GIL to
// build and to destroy).
struct Sources {
  std::vector<ZipSource> records;
  std::vector<std::unique_ptr<BorrowedBuffer>> buffers;
};

// Each record is (name, data[, crc[, size]]): data is a bytes-like object, or
// an (address, nbytes) pair for memory the caller keeps alive and unchanged
// for the whole call (a torch storage's data_ptr() and nbytes()). `crc`, when
// given and not None, is the bytes' CRC-32, taken as it is. `size`, when
// given, says the record's `size` bytes are in the file already (written by
// write_pieces) and `data` holds their first min(size, 8) bytes.
Sources gather(const py::list& records) {
  Sources s;
  s.records.reserve(records.size());
  for (py::handle item : records) {
    auto fields = item.cast<py::tuple>();
    if (fields.size() < 2 || fields.size() > 4) throw py::value_error("a record is a (name, data[, crc[, size]]) tuple");
    ZipSource source{fields[0].cast<std::string>(), nullptr, 0};
    py::handle data = fields[1];
    if (py::isinstance<py::tuple>(data)) {
      auto raw = data.cast<std::pair<uintptr_t, uint64_t>>();
      // SAFETY: the caller vouches for [address, address + nbytes) (see above).
      source.data = reinterpret_cast<const uint8_t*>(raw.first);
      source.size = raw.second;
    } else {
      s.buffers.push_back(std::make_unique<BorrowedBuffer>(data, /*writable=*/false));
      const BorrowedBuffer& b = *s.buffers.back();
      source.data = b.data();
      source.size = b.size();
    }
    if (fields.size() >= 3 && !fields[2].is_none()) source.crc = fields[2].cast<uint32_t>();
    if (fields.size() == 4) {
      const auto size = fields[3].cast<uint64_t>();
      if (source.size != std::min<uint64_t>(size, 8))
        throw py::value_error("record '" + source.name + "' in the file: data must hold its first min(size, 8) bytes");
      source.size = size;
      source.in_file = true;
    }
    s.records.push_back(std::move(source));
  }
  return s;
}

// Hands `n` bytes to write(), repeating for the rest when a raw file object
// reports a short write. Requires the GIL.
void write_all(const py::object& write, const uint8_t* data, size_t n) {
  while (n > 0) {
    py::object written = write(py::memoryview::from_memory(static_cast<const void*>(data), static_cast<py::ssize_t>(n)));
    const size_t done = py::isinstance<py::int_>(written) ? written.cast<size_t>() : n;
    if (done == 0 || done > n) throw py::value_error("write() of the target reported " + std::to_string(done) +
                                                     " of " + std::to_string(n) + " bytes written");
    data += done;
    n -= done;
  }
}

// The body of the callable made by type_dispatch: `state` is (table,
// default). A pickler calls persistent_id for every object it saves (about 19
// per tensor) and reducer_override for most: answering in C for every type
// the table does not name keeps that from costing a Python call each.
// Requires the GIL.
PyObject* dispatch_by_type(PyObject* state, PyObject* obj) {
  PyObject* fn = PyDict_GetItemWithError(PyTuple_GET_ITEM(state, 0), reinterpret_cast<PyObject*>(Py_TYPE(obj)));
  if (fn != nullptr) return PyObject_CallOneArg(fn, obj);
  if (PyErr_Occurred()) return nullptr;
  return Py_NewRef(PyTuple_GET_ITEM(state, 1));
}

PyMethodDef dispatch_def = {"type_dispatch", dispatch_by_type, METH_O,
                            "table[type(obj)](obj) when the table names type(obj), else the default"};

}  // namespace

void register_writer(py::module_& m) {
  m.def(
      "replace_file",
      [](const FsPath& temporary, const FsPath& target) {
        int error = 0;
        {
          py::gil_scoped_release release;
          try {
            replace_file(temporary.native, target.native);
          } catch (const std::system_error& e) {
            error = e.code().value();
          }
        }
        if (error != 0) raise_os_error(error, target);
      },
      py::arg("temporary"), py::arg("target"),
      "Moves `temporary` over `target` atomically, by exchange then unlink where the target exists "
      "(see core/zip_writer.h). Releases the GIL.");
  m.def(
      "copy_memory",
      [](const py::list& copies, bool compute_crc32, unsigned threads) {
        std::vector<MemoryCopy> tasks;
        tasks.reserve(copies.size());
        for (py::handle item : copies) {
          auto c = item.cast<std::tuple<uintptr_t, uintptr_t, uint64_t>>();
          // SAFETY: the caller vouches for both ranges (see the docstring).
          tasks.push_back({reinterpret_cast<uint8_t*>(std::get<0>(c)), reinterpret_cast<const uint8_t*>(std::get<1>(c)),
                           std::get<2>(c)});
        }
        py::gil_scoped_release release;
        return copy_memory(tasks, compute_crc32, threads);
      },
      py::arg("copies"), py::arg("compute_crc32"), py::arg("threads") = 0,
      "Copies (destination address, source address, nbytes) ranges in parallel, returning each "
      "destination's CRC-32 (0 without compute_crc32). The caller keeps both ranges valid, the sources "
      "unchanged and the destinations untouched by others for the call. Releases the GIL.");
  m.def(
      "write_pieces",
      [](int fd, const py::list& pieces, bool compute_crc32, unsigned threads, const std::string& path) {
        std::vector<FilePiece> tasks;
        tasks.reserve(pieces.size());
        for (py::handle item : pieces) {
          auto p = item.cast<std::tuple<uint64_t, uintptr_t, uint64_t>>();
          // SAFETY: the caller vouches for the memory (see the docstring).
          tasks.push_back({std::get<0>(p), reinterpret_cast<const uint8_t*>(std::get<1>(p)), std::get<2>(p)});
        }
        std::vector<uint32_t> crcs;
        int error = 0;
        {
          py::gil_scoped_release release;
          try {
            crcs = write_pieces(fd, tasks, compute_crc32, threads);
          } catch (const std::system_error& e) {
            error = e.code().value();
          }
        }
        if (error != 0) raise_os_error(error, path);
        return crcs;
      },
      py::arg("fd"), py::arg("pieces"), py::arg("compute_crc32"), py::arg("threads") = 0, py::arg("path") = "",
      "Writes (file offset, address, nbytes) pieces to `fd` with parallel pwrite, returning each piece's "
      "CRC-32 (0 without compute_crc32); the caller keeps the memory valid and unchanged for the call. "
      "`path` names the file in an OSError. Releases the GIL.");
  m.def(
      "zip_data_offsets",
      [](const std::vector<std::pair<std::string, uint64_t>>& records, std::string prefix, uint64_t alignment) {
        ZipWriteOptions options;
        options.prefix = std::move(prefix);
        options.alignment = alignment;
        const ZipLayout layout = zip_layout(records, options);
        std::vector<uint64_t> offsets;
        offsets.reserve(records.size());
        for (size_t i = 0; i < records.size(); ++i) offsets.push_back(layout.entries()[i].data_offset);
        return offsets;
      },
      py::arg("records"), py::arg("prefix"), py::arg("alignment"),
      "Where write_zip puts the data of each (name, size) record, for write_pieces.");
  m.def(
      "type_dispatch",
      [](py::dict table, py::object default_value) {
        // The state tuple keeps both alive for as long as the callable lives.
        PyObject* fn = PyCFunction_New(&dispatch_def, py::make_tuple(table, default_value).ptr());
        if (fn == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(fn);
      },
      py::arg("table"), py::arg("default"),
      "A one-argument callable for a pickler's persistent_id or reducer_override: table[type(obj)](obj) "
      "when `table` (a dict of classes to callables) names exactly type(obj), `default` otherwise (answered in C).");
  m.def(
      "write_zip",
      [](py::object target, const py::list& records, std::string prefix, uint64_t alignment, bool compute_crc32,
         unsigned threads, const std::string& path) {
        Sources sources = gather(records);
        ZipWriteOptions options;
        options.prefix = std::move(prefix);
        options.alignment = alignment;
        options.compute_crc32 = compute_crc32;
        options.threads = threads;
        if (!py::isinstance<py::int_>(target)) {
          py::object write = target.attr("write");
          py::gil_scoped_release release;
          stream_zip(sources.records, options, [&write](const uint8_t* data, size_t n) {
            py::gil_scoped_acquire acquire;
            write_all(write, data, n);
          });
          return uint64_t{0};
        }
        const int fd = target.cast<int>();
        int error = 0;
        uint64_t size = 0;
        {
          py::gil_scoped_release release;
          try {
            size = write_zip_file(fd, sources.records, options);
          } catch (const std::system_error& e) {
            error = e.code().value();
          }
        }
        if (error != 0) raise_os_error(error, path);
        return size;
      },
      py::arg("target"), py::arg("records"), py::arg("prefix"), py::arg("alignment"), py::arg("compute_crc32"),
      py::arg("threads") = 0, py::arg("path") = "",
      "Writes torch.save's archive of `records` (name, data[, crc[, size]]) plus the serialization id: to a file "
      "descriptor from offset 0 with parallel pwrite (returns the size), or in order through "
      "target.write(memoryview) (returns 0). `path` names the file in an OSError. Releases the GIL except inside write().");
}

}  // namespace fastckpt::bindings
