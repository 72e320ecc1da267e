// StoragePlan for Python: the loader builds one per load, the native
// unpickler reads it directly, and Python's fallback paths (other devices,
// byte swaps, a callable map_location, torch's own unpickler) ask it for bytes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/common.h"
#include "core/errors.h"

namespace fastckpt::bindings {
namespace {

// map_location as a rule: None, a string, a dict of strings; anything else
// (a callable, a dict with other values) is asked per storage by Python.
LocationRule location_rule(py::handle targets) {
  if (targets.is_none()) return LocationRule::unchanged();
  if (py::isinstance<py::str>(targets)) return LocationRule::constant(targets.cast<std::string>());
  if (PyDict_CheckExact(targets.ptr())) {
    std::unordered_map<std::string, std::string> table;
    for (auto [k, v] : py::reinterpret_borrow<py::dict>(targets)) {
      if (!py::isinstance<py::str>(k) || !py::isinstance<py::str>(v)) return LocationRule::per_storage();
      table.emplace(k.cast<std::string>(), v.cast<std::string>());
    }
    return LocationRule::table(std::move(table));
  }
  return LocationRule::per_storage();
}

}  // namespace

void register_plan(py::module_& m) {
  py::class_<StoragePlan, PlanHolder> plan(m, "StoragePlan",
                                           "Where every storage of one load comes from and goes.");
  py::enum_<StoragePlan::Mode>(plan, "Mode")
      .value("mapped", StoragePlan::Mode::Mapped)
      .value("arena", StoragePlan::Mode::Arena)
      .value("meta", StoragePlan::Mode::Meta);
  py::enum_<StoragePlan::Source>(plan, "Source")
      .value("mapped", StoragePlan::Source::Mapped)
      .value("arena", StoragePlan::Source::Arena)
      .value("meta", StoragePlan::Source::Meta)
      .value("staged", StoragePlan::Source::Staged)
      .value("inflated", StoragePlan::Source::Inflated);
  plan.def(py::init([](std::shared_ptr<Archive> archive, StoragePlan::Mode mode, py::handle targets, bool native_cpu) {
             return PlanHolder(new StoragePlan(std::move(archive), mode, location_rule(targets), native_cpu));
           }),
           py::arg("archive"), py::arg("mode"), py::arg("targets"), py::arg("native_cpu"),
           "`targets`: map_location as None, a string or a dict of strings (else asked per storage); "
           "`native_cpu`: CPU storages may be made over the bytes as they are.")
      .def_property_readonly("mode", &StoragePlan::mode)
      .def("target", &StoragePlan::target, py::arg("location"),
           "Where a storage tagged `location` goes; None when map_location decides per storage.")
      .def("named_targets", &StoragePlan::named_targets,
           "The targets map_location names (a string, a dict's values; [] when it keeps every tag); "
           "None when it decides per storage. Every storage goes to one of them or stays where its tag says.")
      .def("stage", &StoragePlan::stage, py::arg("key"), "Before start(): the storage goes to a device elsewhere.")
      .def(
          "adopt",
          [](StoragePlan& p, const std::string& key, py::buffer data) {
            BorrowedBuffer bytes(data, /*writable=*/false);
            py::gil_scoped_release release;  // a copy of up to the inflation cap; `bytes` holds the buffer
            p.adopt(key, bytes.data(), bytes.size());
          },
          py::arg("key"), py::arg("data"), "Before start(): the inflated bytes of a deflated record.")
      .def("deflated_keys", &StoragePlan::deflated_keys, "Deflated records an eager load must adopt().")
      .def(
          "start",
          [](StoragePlan& p, bool check_crc, unsigned threads) {
            py::gil_scoped_release release;
            p.start(check_crc, threads);
          },
          py::arg("check_crc"), py::arg("threads") = 0,
          "Start the eager read, or (mapped) check every CRC-32 up front when `check_crc` (GIL released).")
      .def(
          "source", [](const StoragePlan& p, const std::string& key, uint64_t nbytes) { return p.entry(key, nbytes).source; },
          py::arg("key"), py::arg("nbytes"),
          "Where storage `key` of `nbytes` bytes comes from; RecordError when its record does not hold them.")
      .def(
          "data_offset",
          [](const StoragePlan& p, const std::string& key) { return p.lookup(key).record->data_offset; },
          py::arg("key"), "Where the storage's bytes start in the file (meta storages remember it).")
      .def(
          "bytes",
          [](StoragePlan& p, const std::string& key, uint64_t nbytes) {
            const StoragePlan::Entry& e = p.entry(key, nbytes);
            if (e.source == StoragePlan::Source::Meta || e.source == StoragePlan::Source::Staged)
              fail(ErrorKind::Record, "record 'data/" + key + "' is not read by this load");
            wait_for(p, e);
            if (!e.bytes.owner) return ByteView{MappedFile::anonymous(0), nullptr, 0};
            return e.bytes;
          },
          py::arg("key"), py::arg("nbytes"),
          "The bytes of storage `key` (`nbytes` long), once read and checked (waits, GIL released).")
      .def(
          "finish",
          [](StoragePlan& p) {
            py::gil_scoped_release release;
            p.finish();
          },
          "Wait for every read (GIL released); raises IntegrityError on a CRC mismatch.");
}

}  // namespace fastckpt::bindings
