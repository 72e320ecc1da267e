// The torch-free builder for the core pickle machine, and `read_tree`.
//
// It understands by name only the globals a checkpoint's tensors are made of
// (the table `kit.known`, fastckpt/_descriptors.py) and never imports
// anything the file names: storages become StorageInfo descriptors checked
// against their zip records, tensors become TensorInfo descriptors checked to
// lie inside their storage. Rare known calls (torch.Size, torch.device,
// OrderedDict, _rebuild_parameter ...) are made by `kit.call`, in Python and
// still torch-free. Any other global raises UnsafeGlobalError naming it, or,
// for `fastckpt inspect`, becomes a Placeholder (nothing is executed either way).
//
// Every function here runs with the GIL held.
#include <pybind11/pybind11.h>

#include <memory>
#include <unordered_map>

#include "bindings/common.h"
#include "bindings/storage_reference.h"
#include "bindings/value_builder.h"
#include "core/errors.h"
#include "core/pickle_vm.h"
#include "core/storage_rule.h"
#include "core/tensor_bounds.h"

namespace fastckpt::bindings {
namespace {

struct ReaderValue {
  py::object obj;
  uint32_t depth = 0;
  bool global = false;  // made by GLOBAL: may be called
};

// What the reader knows about a global, from kit.known.
enum class Kind { RebuildV2, RebuildV3, RebuildOld, Storage, Dtype, Call, Constant, Placeholder };

struct GlobalFacts {
  Kind kind;
  std::string name;       // "module.name"
  py::object dtype;       // Storage, Dtype: the dtype's name (a str)
  uint32_t itemsize = 0;  // Storage, Dtype: bytes per storage element
  uint32_t bits = 0;      // Dtype: bits per tensor element (4 and 2 for the packed quantized ones)
};

struct StorageFacts {
  uint64_t nbytes;
  py::object dtype;  // its name
  uint32_t bits;     // per element
};

class ReaderBuilder : public ValueBuilder<ReaderBuilder, ReaderValue> {
 public:
  using Value = ReaderValue;

  ReaderBuilder(py::object kit, std::shared_ptr<Archive> archive, bool placeholders)
      : kit_(std::move(kit)), archive_(std::move(archive)), placeholders_(placeholders) {
    known_ = kit_.attr("known");
    tensor_info_ = kit_.attr("TensorInfo");
    storage_info_ = kit_.attr("StorageInfo");
    global_cls_ = kit_.attr("Global");
    placeholder_ = kit_.attr("Placeholder");
    ordered_dict_ = kit_.attr("OrderedDict");
    call_ = kit_.attr("call");
  }

  // ---- globals and calls -------------------------------------------------
  Value global(std::string_view module, std::string_view name) {
    std::string full;
    full.reserve(module.size() + name.size() + 1);
    full.append(module).append(1, '.').append(name);
    auto it = globals_.find(full);
    if (it != globals_.end()) return it->second;
    py::object spec = known_.attr("get")(materialize_str(full));
    GlobalFacts facts{Kind::Placeholder, full, py::object(), 0, 0};
    py::object obj;
    if (spec.is_none()) {
      if (!placeholders_)
        unsafe("Unsupported global: GLOBAL " + full +
               " is not one the torch-free reader understands (it reads tensors, storages, dtypes, torch.Size, "
               "torch.device and OrderedDict; load the file with fastckpt.load if you trust it)");
      obj = placeholder_(full);
    } else {
      std::string kind = py::str(spec[py::int_(0)]).cast<std::string>();
      facts.kind = kind == "rebuild_v2"   ? Kind::RebuildV2
                   : kind == "rebuild_v3" ? Kind::RebuildV3
                   : kind == "rebuild"    ? Kind::RebuildOld
                   : kind == "storage"    ? Kind::Storage
                   : kind == "dtype"      ? Kind::Dtype
                   : kind == "call"       ? Kind::Call
                                          : Kind::Constant;
      if (facts.kind == Kind::Storage || facts.kind == Kind::Dtype) {
        facts.dtype = spec[py::int_(1)];
        facts.itemsize = spec[py::int_(2)].cast<uint32_t>();
        facts.bits = spec[py::int_(3)].cast<uint32_t>();
      }
      obj = global_cls_(full);
    }
    Value v{obj, 0, true};
    facts_.emplace(obj.ptr(), std::move(facts));
    globals_.emplace(std::move(full), v);
    return v;
  }
  Value stack_global(Value& module, Value& name) {
    if (!is_exact_str(module) || !is_exact_str(name)) unsafe("STACK_GLOBAL needs two strings");
    return global(module.obj.cast<std::string>(), name.obj.cast<std::string>());
  }

  Value reduce(Value& callable, Value& args) {
    const GlobalFacts* f = callable.global ? facts_of(callable.obj) : nullptr;
    if (f == nullptr) unsafe("REDUCE on " + describe(callable) + ", which is not a global");
    if (!PyTuple_CheckExact(args.obj.ptr())) unsafe("REDUCE arguments must be a tuple, got " + describe(args));
    py::object result;
    switch (f->kind) {
      case Kind::RebuildV2: case Kind::RebuildV3: case Kind::RebuildOld:
        result = rebuild(f->kind, args.obj);
        break;
      case Kind::Call: case Kind::Placeholder:
        result = call_(f->name, args.obj);
        break;
      default:
        unsafe("REDUCE on " + f->name + ", which is not callable");
    }
    return Value{std::move(result), args.depth, false};
  }
  Value newobj(Value& cls, Value& args) { return placeholder_object(cls, args, "NEWOBJ"); }
  Value newobj_ex(Value& cls, Value& args, Value&) { return placeholder_object(cls, args, "NEWOBJ_EX"); }
  void build(Value& obj, Value& state) {
    PyObject* target = obj.obj.ptr();
    // The state of an OrderedDict is a state dict's `_metadata` (module
    // versions): not part of the tree of values, so it is left out.
    if (Py_TYPE(target) == reinterpret_cast<PyTypeObject*>(ordered_dict_.ptr()) && PyDict_Check(state.obj.ptr())) return;
    if (Py_TYPE(target) == reinterpret_cast<PyTypeObject*>(placeholder_.ptr())) {
      obj.obj.attr("state") = state.obj;
      obj.depth = std::max(obj.depth, state.depth + 1);
      return;
    }
    unsafe("BUILD on " + describe(obj) + " is not allowed (only OrderedDict state is read)");
  }

  // ('storage', storage class, key, location, numel) -> StorageInfo, one per key.
  Value persistent_load(Value& pid_value) {
    const StorageId id = read_storage_reference(pid_value.obj, pid_scratch_);
    auto cached = storages_.find(id.key);
    if (cached != storages_.end()) return Value{cached->second, 0, false};  // the first reference decides, as in torch

    py::handle storage_type = PyTuple_GET_ITEM(pid_value.obj.ptr(), 1), key = PyTuple_GET_ITEM(pid_value.obj.ptr(), 2);
    const GlobalFacts* f = facts_of(storage_type);
    if (f == nullptr || f->kind != Kind::Storage)
      fail(ErrorKind::Metadata, "persistent id of storage '" + id.key + "' names " + describe_handle(storage_type) +
                                    ", not a storage type");
    const uint64_t nbytes = storage_nbytes(id, f->itemsize);
    const ZipRecord& record = archive_->record("data/" + id.key);
    check_record_holds(record, nbytes);
    archive_->stored_data(record);  // stored (not deflated) and inside the file
    py::object info = storage_info_(key, f->dtype, nbytes, record.name, record.data_offset, record.crc32, id.location);
    storage_facts_.emplace(info.ptr(), StorageFacts{nbytes, f->dtype, f->bits});
    storages_.emplace(id.key, info);
    return Value{std::move(info), 0, false};
  }

  py::object finish(Value& v, uint32_t max_depth) {
    check_linked_depth(v.obj, max_depth);
    return v.obj;
  }

 private:
  friend class ValueBuilder<ReaderBuilder, ReaderValue>;

  static Value plain(py::object o) { return Value{std::move(o), 0, false}; }
  static void made_mutable(Value&) {}
  void ready(const Value&) {}  // storages are descriptors here: no bytes reach Python code
  py::object materialize(Value& v) { return v.obj; }
  std::string describe(const Value& v) {
    if (v.global) return "GLOBAL " + facts_of(v.obj)->name;
    return describe_handle(v.obj);
  }
  static std::string describe_handle(py::handle h) { return "an object of type " + type_name(h); }
  bool is_settable_mapping(PyObject* target) {
    return target != nullptr && Py_TYPE(target) == reinterpret_cast<PyTypeObject*>(ordered_dict_.ptr());
  }

  const GlobalFacts* facts_of(py::handle obj) const {
    auto it = facts_.find(obj.ptr());
    return it == facts_.end() ? nullptr : &it->second;
  }

  Value placeholder_object(Value& cls, Value& args, const char* opcode) {
    const GlobalFacts* f = cls.global ? facts_of(cls.obj) : nullptr;
    if (f == nullptr || f->kind != Kind::Placeholder)
      unsafe(std::string(opcode) + " on " + describe(cls) + " is not allowed");
    return Value{call_(f->name, args.obj), args.depth, false};
  }

  // _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
  // _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])
  // _rebuild_tensor(storage, offset, size, stride)
  py::object rebuild(Kind kind, const py::object& args) {
    const Py_ssize_t n = PyTuple_GET_SIZE(args.ptr());
    const Py_ssize_t base = kind == Kind::RebuildV3 ? 7 : kind == Kind::RebuildV2 ? 6 : 4;
    if (n != base && !(kind != Kind::RebuildOld && n == base + 1))
      fail(ErrorKind::Metadata, "tensor rebuild call with " + std::to_string(n) + " arguments");
    py::handle storage = PyTuple_GET_ITEM(args.ptr(), 0);
    auto s = storage_facts_.find(storage.ptr());
    if (s == storage_facts_.end())
      fail(ErrorKind::Metadata, "tensor rebuild call on " + describe_handle(storage) + ", not a storage");
    // v2 tensors take the storage's dtype, v3 tensors name theirs.
    py::object dtype = s->second.dtype;
    uint32_t bits = s->second.bits;
    if (kind == Kind::RebuildV3) {
      const GlobalFacts* d = facts_of(PyTuple_GET_ITEM(args.ptr(), 6));
      if (d == nullptr || d->kind != Kind::Dtype) fail(ErrorKind::Metadata, "_rebuild_tensor_v3 without a dtype");
      dtype = d->dtype;
      bits = d->bits;
    }
    py::handle offset = PyTuple_GET_ITEM(args.ptr(), 1), size = PyTuple_GET_ITEM(args.ptr(), 2),
               stride = PyTuple_GET_ITEM(args.ptr(), 3);
    as_int64_list(size, "size", size_);
    as_int64_list(stride, "stride", stride_);
    check_tensor_in_storage(as_int64(offset, "storage offset"), size_, stride_, bits, s->second.nbytes);
    py::handle requires_grad = kind == Kind::RebuildOld ? Py_False : PyTuple_GET_ITEM(args.ptr(), 4);
    if (!PyBool_Check(requires_grad.ptr())) fail(ErrorKind::Metadata, "tensor requires_grad is not a bool");
    py::handle metadata = n == base + 1 ? PyTuple_GET_ITEM(args.ptr(), base) : Py_None;
    if (metadata.ptr() != Py_None && !PyDict_Check(metadata.ptr()))
      fail(ErrorKind::Metadata, "tensor metadata is " + describe_handle(metadata) + ", not a dict");
    // torch.Size is a tuple subclass; the descriptor holds plain tuples.
    py::object shape = steal(PySequence_Tuple(size.ptr())), strides = steal(PySequence_Tuple(stride.ptr()));
    PyObject* argv[] = {storage.ptr(), dtype.ptr(), shape.ptr(), strides.ptr(), offset.ptr(), requires_grad.ptr(),
                        metadata.ptr()};
    return steal(PyObject_Vectorcall(tensor_info_.ptr(), argv, 7, nullptr));
  }

  py::object kit_, known_, tensor_info_, storage_info_, global_cls_, placeholder_, ordered_dict_, call_;
  std::shared_ptr<Archive> archive_;
  bool placeholders_;
  std::unordered_map<std::string, Value> globals_;
  std::unordered_map<PyObject*, GlobalFacts> facts_;  // keyed by the global objects, held by globals_
  std::unordered_map<std::string, py::object> storages_;
  std::unordered_map<PyObject*, StorageFacts> storage_facts_;  // keyed by StorageInfo, held by storages_
  std::vector<int64_t> size_, stride_;                          // per-tensor scratch
  PersistentId pid_scratch_;                                    // per-storage scratch
};

}  // namespace

void register_reader(py::module_& m) {
  m.def(
      "read_tree",
      [](py::buffer pickle, py::object kit, std::shared_ptr<Archive> archive, bool placeholders) {
        BorrowedBuffer data(pickle, /*writable=*/false);
        ReaderBuilder builder(std::move(kit), std::move(archive), placeholders);
        PickleLimits limits;
        PickleMachine<ReaderBuilder> machine(builder, limits);
        ReaderValue result = machine.run(data.data(), data.size());
        return builder.finish(result, limits.max_depth);
      },
      py::arg("pickle"), py::arg("kit"), py::arg("archive"), py::arg("placeholders") = false,
      "Run the restricted pickle machine without torch: the object tree with tensors and storages as "
      "kit.TensorInfo / kit.StorageInfo descriptors checked against `archive`. Unknown globals raise "
      "UnsafeGlobalError, or become kit.Placeholder objects with `placeholders`.");
}

}  // namespace fastckpt::bindings
