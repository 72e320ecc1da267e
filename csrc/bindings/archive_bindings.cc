// Archive, record views and verification. I/O, copies and CRC work run with the
// GIL released; everything touching Python objects holds it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>
#include <system_error>
#include <thread>

#include "bindings/common.h"
#include "core/checked_math.h"
#include "core/copy_engine.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/storage_scan.h"

namespace fastckpt::bindings {
namespace {

// Runs `tasks` with the GIL released and returns their CRCs.
std::vector<CopyResult> copies_without_gil(const Archive& a, const std::vector<CopyTask>& tasks,
                                           unsigned threads) {
  py::gil_scoped_release release;
  return run_copies(*a.file, tasks, threads);
}

// A record of `archive` (a Python Archive) as a Record that keeps it alive.
py::object record_of(const ZipRecord& r, py::handle archive) {
  return py::cast(&r, py::return_value_policy::reference_internal, archive);
}

}  // namespace

void raise_os_error(int code, const std::string& filename) {
  py::object args = py::make_tuple(code, std::strerror(code), filename);
  PyErr_SetObject(PyExc_OSError, args.ptr());
  throw py::error_already_set();
}

void raise_os_error(int code, const FsPath& path) {
  py::object args = py::make_tuple(code, std::strerror(code), path.given);
  PyErr_SetObject(PyExc_OSError, args.ptr());
  throw py::error_already_set();
}

namespace {

// Maps (via `map`, which may throw std::system_error) and indexes a file with
// the GIL released; OS errors become OSError naming `name`.
template <class Map, class Name>
std::shared_ptr<Archive> index_file(Map map, const Name& name) {
  std::shared_ptr<FileMemory> file;
  int os_error = 0;
  {
    py::gil_scoped_release release;
    try {
      file = map();
    } catch (const std::system_error& e) {
      os_error = e.code().value();
    }
  }
  if (os_error != 0) raise_os_error(os_error, name);
  py::gil_scoped_release release;
  // Header reads touch a few bytes each: no readahead of the data.
  file->advise(Advice::Random);
  ZipIndex index = ZipIndex::parse(file->data(), file->size());
  // Reading the headers mapped whole page-cache folios around them (large
  // folios can be 2 MiB); unmap them so an eager load, which reads with
  // pread, does not carry them in its RSS. Nothing has been written to the
  // private mapping yet, so nothing is lost.
  file->advise(Advice::DontNeed);
  file->advise(Advice::Normal);
  return std::make_shared<Archive>(Archive{std::move(file), std::move(index)});
}

}  // namespace

void register_archive(py::module_& m) {
  // The core reports OS failures (mapping, pread, threads) as
  // std::system_error; they reach Python as OSError, never RuntimeError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::system_error& e) {
      py::object args = py::make_tuple(e.code().value(), message_text(e.what()));
      PyErr_SetObject(PyExc_OSError, args.ptr());
    }
  });

  m.def(
      "scan_storages",
      [](py::bytes pickle) {
        std::string_view data = pickle;
        std::vector<StorageRef> refs;
        {
          py::gil_scoped_release release;
          refs = scan_storages(reinterpret_cast<const uint8_t*>(data.data()), data.size());
        }
        auto text = [](const std::string& s) {
          PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
          if (o == nullptr) throw py::error_already_set();
          return py::reinterpret_steal<py::str>(o);
        };
        py::list out;
        for (const StorageRef& r : refs) out.append(py::make_tuple(text(r.key), text(r.location)));
        return out;
      },
      py::arg("pickle"),
      "(key, location) of every storage a data pickle names, once each, in first-use order (GIL released).");

  py::class_<ByteView>(m, "ByteView", py::buffer_protocol(),
                       "Writable 1-D bytes that keep their archive's memory alive.")
      .def_buffer([](ByteView& v) {
        // SAFETY: [data, data+size) lies inside v.owner's memory (checked where
        // the view was made), and the exporting ByteView keeps it mapped.
        return py::buffer_info(v.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(v.size)}, {1}, /*readonly=*/false);
      })
      .def("__len__", [](const ByteView& v) { return v.size; });

  m.def(
      "allocate", [](size_t size) {
        auto f = FileMemory::anonymous(size);
        return ByteView{f, f->mutable_data(), f->size()};
      },
      py::arg("size"), "Zero-filled writable memory to read a file-like object into.");

  py::enum_<Method>(m, "Method", "A zip record's compression method: the index accepts no others.")
      .value("stored", Method::Stored)
      .value("deflated", Method::Deflated);
  py::class_<ZipRecord>(m, "Record", "One zip entry as the strict index read it; read-only, keeps its archive alive.")
      .def_readonly("name", &ZipRecord::name, "Without the archive prefix: 'data.pkl', 'data/0'.")
      .def_readonly("header_offset", &ZipRecord::header_offset)
      .def_readonly("data_offset", &ZipRecord::data_offset, "The first byte of its data in the file.")
      .def_readonly("compressed_size", &ZipRecord::compressed_size)
      .def_readonly("size", &ZipRecord::size)
      .def_readonly("crc32", &ZipRecord::crc32, "As stored; 0 on a non-empty record means not recorded.")
      .def_readonly("method", &ZipRecord::method)
      .def_readonly("flags", &ZipRecord::flags)
      .def_property_readonly("alignment", &ZipRecord::alignment,
                             "The largest power of two (at most 4096) dividing data_offset.")
      .def("__repr__", [](const ZipRecord& r) {
        return "Record('" + r.name + "', data_offset=" + std::to_string(r.data_offset) +
               ", size=" + std::to_string(r.size) + ")";
      });

  m.def(
      "check_crc",
      [](const std::string& name, uint32_t stored, uint64_t size, uint64_t data_offset, uint32_t computed,
         const std::string& file, const std::vector<std::string>& keys) {
        ZipRecord r{name, 0, data_offset, size, size, stored, Method::Stored, 0};
        check_crc(r, computed, file, keys);
      },
      py::arg("name"), py::arg("stored"), py::arg("size"), py::arg("data_offset"), py::arg("computed"),
      py::arg("file") = "", py::arg("keys") = std::vector<std::string>{},
      "The core's CRC verdict and message for a record known by its fields (no Archive at hand): "
      "IntegrityError with .record and .keys on a mismatch.");
  m.def(
      "judge_crc", [](const ZipRecord& r, uint32_t actual) { return std::string(crc_status_name(judge_crc(r, actual))); },
      py::arg("record"), py::arg("actual"),
      "'ok', 'mismatch' or 'unrecorded' (a stored CRC of 0 on a non-empty record): the one verdict rule.");

  py::class_<Archive, std::shared_ptr<Archive>>(m, "Archive")
      .def_static(
          "open",
          [](const FsPath& path) {
            return index_file([&] { return FileMemory::open(path.native); }, path);
          },
          py::arg("path"), "Map the file at `path` and index it (GIL released).")
      .def_static(
          "open_fd",
          [](int fd, uint64_t start, const std::string& name) {
            return index_file([&] { return FileMemory::open_fd(fd, start, name); }, name);
          },
          py::arg("fd"), py::arg("start"), py::arg("name"),
          "Map the regular file open as descriptor `fd` (duplicated) from byte `start` on, and index it "
          "(GIL released): a file object's checkpoint, read like a path's.")
      .def_static(
          "from_buffer",
          [](const ByteView& bytes) {
            if (bytes.data != bytes.owner->data() || bytes.size != bytes.owner->size())
              throw py::value_error("from_buffer needs a whole buffer from allocate()");
            py::gil_scoped_release release;
            ZipIndex index = ZipIndex::parse(bytes.owner->data(), bytes.owner->size());
            return std::make_shared<Archive>(Archive{bytes.owner, std::move(index)});
          },
          py::arg("buffer"), "Index an in-memory archive filled through allocate().")
      .def_property_readonly("prefix", [](const Archive& a) { return a.index.prefix(); })
      .def_property_readonly("size", [](const Archive& a) { return a.file->size(); })
      .def_property_readonly("path",
                             [](const Archive& a) {
                               const std::string& p = a.file->path();  // as given: file-system bytes
                               PyObject* s = PyUnicode_DecodeFSDefaultAndSize(p.data(), static_cast<Py_ssize_t>(p.size()));
                               if (s == nullptr) throw py::error_already_set();
                               return py::reinterpret_steal<py::str>(s);
                             })
      .def_property_readonly("central_directory_offset",
                             [](const Archive& a) { return a.index.central_directory_offset(); })
      .def("records",
           [](py::object self) {
             py::list out;
             for (const ZipRecord& r : self.cast<const Archive&>().index.records()) out.append(record_of(r, self));
             return out;
           })
      .def(
          "names",
          [](const Archive& a, const std::string& prefix, std::optional<Method> method) {
            py::list out;
            for (const ZipRecord& r : a.index.records())
              if (r.name.compare(0, prefix.size(), prefix) == 0 && (!method || r.method == *method))
                out.append(py::str(r.name));
            return out;
          },
          py::arg("prefix") = "", py::arg("method") = py::none(),
          "Record names in archive order, optionally only those starting with `prefix` / of one method.")
      .def("__contains__", [](const Archive& a, const std::string& name) {
        return a.index.find(name) != nullptr;
      })
      .def("record", [](py::object self, const std::string& name) {
             return record_of(self.cast<const Archive&>().record(name), self);
           }, py::arg("name"))
      .def("view", [](const Archive& a, const std::string& name) { return a.stored_view(a.record(name)); },
           py::arg("name"), "Zero-copy writable view of a stored record (copy-on-write for files).")
      .def("whole", [](const Archive& a) { return ByteView{a.file, a.file->mutable_data(), a.file->size()}; },
           "Zero-copy view of the whole archive.")
      .def(
          "read",
          [](const Archive& a, const std::string& name, bool check_crc) {
            const ZipRecord& r = a.record(name);
            ByteView v = a.stored_view(r);
            if (check_crc) {
              uint32_t actual;
              {
                py::gil_scoped_release release;
                actual = crc32(0, v.data, v.size);
              }
              a.check_crc(r, actual);
            }
            return py::bytes(reinterpret_cast<const char*>(v.data), v.size);
          },
          py::arg("name"), py::arg("check_crc") = true, "The bytes of a small stored record, CRC-checked.")
      .def(
          "compressed_view",
          [](const Archive& a, const std::string& name) {
            const ZipRecord& r = a.record(name);
            if (!range_within(r.data_offset, r.compressed_size, a.file->size()))
              fail(ErrorKind::Record, describe_record(r) + " does not lie within the file");
            // SAFETY: the range was checked against the mapping just above.
            return ByteView{a.file, a.file->mutable_data() + r.data_offset,
                            static_cast<size_t>(r.compressed_size)};
          },
          py::arg("name"), "The stored bytes of a deflated record, for capped inflation by the caller.")
      .def(
          "read_into",
          [](const Archive& a, const std::string& name, py::buffer dest, bool check_crc, unsigned threads) {
            const ZipRecord& r = a.record(name);
            a.stored_data(r);
            BorrowedBuffer out(dest, /*writable=*/true);
            if (out.size() != r.size)
              fail(ErrorKind::Record, describe_record(r) + " holds " + std::to_string(r.size) +
                                          " bytes but the destination has " + std::to_string(out.size()));
            auto results = copies_without_gil(a, {{r.data_offset, r.size, out.data(), check_crc}}, threads);
            if (!check_crc) return std::string("unchecked");
            a.check_crc(r, results[0].crc32);
            return std::string(crc_status_name(judge_crc(r, results[0].crc32)));
          },
          py::arg("name"), py::arg("dest"), py::arg("check_crc") = true, py::arg("threads") = 0,
          "Copy a stored record into a writable buffer of exactly its size (GIL released).")
      .def(
          "read_ranges",
          [](const Archive& a, py::buffer dest, const std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>& ranges,
             bool check_crc, unsigned threads) {
            BorrowedBuffer out(dest, /*writable=*/true);
            std::vector<CopyTask> tasks;
            tasks.reserve(ranges.size());
            for (const auto& [file_offset, length, dest_offset] : ranges) {
              if (!range_within(dest_offset, length, out.size()))
                throw py::value_error("read_ranges: a range runs past the end of the destination");
              // SAFETY: [dest_offset, dest_offset + length) lies inside `out` (checked above);
              // the file side is bounds-checked by the copy engine.
              tasks.push_back({file_offset, length, out.data() + dest_offset, check_crc});
            }
            std::vector<CopyResult> results = copies_without_gil(a, tasks, threads);
            std::vector<uint32_t> crcs;
            crcs.reserve(results.size());
            for (const CopyResult& r : results) crcs.push_back(r.crc32);
            return crcs;
          },
          py::arg("dest"), py::arg("ranges"), py::arg("check_crc") = true, py::arg("threads") = 0,
          "Copy (file offset, length, dest offset) ranges into `dest` (GIL released); the CRC-32 of each "
          "range (0 when check_crc is false). Ranges may be parts of records: combine with crc32_combine.")
      .def(
          "check_crcs",
          [](const Archive& a, const std::vector<std::string>& names, const std::vector<uint32_t>& crcs) {
            if (names.size() != crcs.size()) throw py::value_error("check_crcs: one CRC per name");
            for (size_t i = 0; i < names.size(); ++i) {
              const ZipRecord& r = a.record(names[i]);
              a.check_crc(r, crcs[i]);
            }
          },
          py::arg("names"), py::arg("crcs"),
          "Raise IntegrityError for the first record whose computed CRC-32 does not match its stored one.")
      .def(
          "check_crc",
          [](const Archive& a, const std::string& name, uint32_t computed, const std::vector<std::string>& keys) {
            a.check_crc(a.record(name), computed, keys);
          },
          py::arg("name"), py::arg("computed"), py::arg("keys") = std::vector<std::string>{},
          "The core's CRC verdict for record `name`: IntegrityError (with .record and .keys, the tensors "
          "it holds when the caller knows them) on a mismatch.")
      .def(
          "verify",
          [](py::object self, std::optional<std::vector<std::string>> names, unsigned threads) {
            const Archive& a = self.cast<const Archive&>();
            std::vector<const ZipRecord*> records;
            if (names) {
              for (const std::string& n : *names) records.push_back(&a.record(n));
            } else {
              for (const ZipRecord& r : a.index.records()) records.push_back(&r);
            }
            std::vector<CopyTask> tasks;
            std::vector<std::string> problems(records.size());
            for (size_t i = 0; i < records.size(); ++i) {
              const ZipRecord& r = *records[i];
              // A deflated record's CRC covers the inflated bytes: checked by
              // the Python layer, which owns the inflation cap.
              if (r.method != Method::Stored) {
                problems[i] = "compressed";
                continue;
              }
              tasks.push_back({r.data_offset, r.size, nullptr, true});
            }
            std::vector<CopyResult> results;
            {
              py::gil_scoped_release release;
              // CRC straight over a fresh read-only mapping (no copy into a
              // buffer first), read ahead in file order.
              std::shared_ptr<FileMemory> view = FileMemory::shared_view(*a.file);
              if (view) view->advise(Advice::Sequential);
              results = run_copies(view ? *view : *a.file, tasks, threads);
            }
            py::list out;
            size_t k = 0;
            for (size_t i = 0; i < records.size(); ++i) {
              const ZipRecord& r = *records[i];
              if (!problems[i].empty()) {
                out.append(py::make_tuple(record_of(r, self), problems[i], py::none()));
              } else {
                uint32_t actual = results[k++].crc32;
                out.append(py::make_tuple(record_of(r, self), crc_status_name(judge_crc(r, actual)), actual));
              }
            }
            return out;
          },
          py::arg("names") = py::none(), py::arg("threads") = 0,
          "CRC-32 of records in parallel (GIL released): (record, status, computed CRC or None) each.");

}

}  // namespace fastckpt::bindings
