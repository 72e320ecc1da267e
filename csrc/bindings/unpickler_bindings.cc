// The Python object builder for the core pickle machine, and `unpickle`.
//
// The policy (what a global resolves to, what REDUCE, NEWOBJ and BUILD may
// do) is decided in Python, in fastckpt/_policy.py, and read once into a
// Policy; where storages come from is the load's StoragePlan. This file does
// the per-opcode work that must be fast: storages and the tensors made by
// torch._utils._rebuild_tensor_v2/_v3 (containers, strings and numbers come
// from ValueBuilder, shared with the torch-free reader). Storages are
// kept lazy (a slot, not a Python object) until something other than a fast
// tensor rebuild needs them, so a tensor costs one call into torch.
//
// Every function here runs with the GIL held.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <deque>
#include <memory>
#include <unordered_map>

#include "bindings/common.h"
#include "bindings/dlpack_tensor.h"
#include "bindings/storage_reference.h"
#include "bindings/value_builder.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/pickle_vm.h"
#include "core/storage_rule.h"
#include "core/tensor_bounds.h"

namespace fastckpt::bindings {
namespace {

// A storage as it will be seen by tensors: its entry in the plan (where its
// bytes are), and the Python objects made for it so far.
struct StorageSlot {
  const StoragePlan::Entry* entry = nullptr;
  uint64_t nbytes = 0;
  py::object buffer;      // a memoryview of the entry's bytes, made on first need
  py::object dtype;       // from the first persistent id naming this key
  py::object first_tensor;  // the tensor made over the whole storage, if any
  py::object untyped;     // torch.UntypedStorage, made on first need
  py::object typed;       // torch.storage.TypedStorage, made on first need
};

struct Lazy;

// A counted reference to a Lazy node. Values are copied several times per
// opcode (stack, memo) and only ever under the GIL, so the count is a plain
// integer rather than shared_ptr's atomic one.
class LazyRef {
 public:
  LazyRef() = default;
  explicit LazyRef(Lazy* node);
  LazyRef(const LazyRef& other) : LazyRef(other.node_) {}
  LazyRef(LazyRef&& other) noexcept : node_(other.node_) { other.node_ = nullptr; }
  LazyRef& operator=(LazyRef other) noexcept {
    std::swap(node_, other.node_);
    return *this;
  }
  ~LazyRef();
  Lazy* operator->() const { return node_; }
  Lazy& operator*() const { return *node_; }
  explicit operator bool() const { return node_ != nullptr; }

 private:
  Lazy* node_ = nullptr;
};

// Which storage slots a value may reach, so that their bytes are waited for
// before the value is handed to Python code: none, the slots made up to
// slots_[n - 1] (storages, tensors and tuples of them), or every slot made so
// far (lists, dicts, objects: they can still be filled after they are made).
constexpr uint32_t kReachesAllSlots = UINT32_MAX;

struct PyValue {
  py::object obj;              // null while the value is lazy
  LazyRef lazy;                // a storage slot, or a tuple holding one
  uint32_t depth = 0;          // container nesting, for the cap
  bool global = false;         // resolved by GLOBAL: may be called / instantiated
  uint32_t slots = 0;          // slots it may reach (see kReachesAllSlots)
  bool checked = false;        // a GLOBAL the weights_only policy sees on every REDUCE
};

struct Lazy {
  uint32_t refs = 0;
  StorageSlot* slot = nullptr;  // a storage ...
  std::vector<PyValue> items;   // ... or a tuple with a lazy item
  uint32_t nesting = 0;         // lazy tuples inside this one
  py::object materialized;
};

LazyRef::LazyRef(Lazy* node) : node_(node) {
  if (node_ != nullptr) ++node_->refs;
}
LazyRef::~LazyRef() {
  if (node_ != nullptr && --node_->refs == 0) delete node_;
}

constexpr uint32_t kMaxLazyNesting = 8;

// The policy of one unpickling, read once from its Python context through the
// protocol written down in fastckpt/_policy.py.
struct Policy {
  explicit Policy(py::handle ctx)
      : permissive(ctx.attr("permissive").cast<bool>()),
        encoding(ctx.attr("encoding").cast<std::string>()),
        resolve_global(ctx.attr("resolve_global")),
        newobj(ctx.attr("newobj")),
        build(ctx.attr("build")),
        persistent_load(ctx.attr("persistent_load")),
        storage_dtype(ctx.attr("storage_dtype")),
        dtype_bits(ctx.attr("dtype_bits")),
        dlpack_dtype(ctx.attr("dlpack_dtype")),
        rebuild_v2(ctx.attr("rebuild_tensor_v2")),
        rebuild_v3(ctx.attr("rebuild_tensor_v3")),
        rebuild_qtensor(ctx.attr("rebuild_qtensor")),
        rebuild_tensor(ctx.attr("rebuild_tensor")) {
    if (permissive) return;
    reduce = ctx.attr("reduce");
    settable_mappings = ctx.attr("settable_mappings");
    for (py::handle c : ctx.attr("checked_callables")) checked_callables.push_back(py::reinterpret_borrow<py::object>(c));
  }
  // Whether REDUCE on a callable resolved by GLOBAL goes through `reduce`
  // (weights_only: the few that allocate by a size from the file, sparse
  // tensors); others are called directly.
  bool checks(const py::object& callable) const {
    for (const py::object& c : checked_callables)
      if (c.is(callable)) return true;
    return false;
  }

  // pickle's semantics: any global, any callable, appends/setitems on any
  // object, REDUCE on any iterable, the file's own errors pass through.
  // Otherwise torch's weights_only rules, with `reduce` and the lists below.
  bool permissive;
  std::string encoding;  // of Python 2 strings; "bytes" keeps them bytes
  py::object resolve_global, newobj, build, persistent_load;
  py::object storage_dtype, dtype_bits, dlpack_dtype;  // dtype facts, asked once per dtype
  py::object rebuild_v2, rebuild_v3, rebuild_qtensor, rebuild_tensor;  // made or checked natively
  py::object reduce, settable_mappings;  // weights_only only
  std::vector<py::object> checked_callables;
};

class PyBuilder : public ValueBuilder<PyBuilder, PyValue> {
 public:
  using Value = PyValue;

  PyBuilder(py::handle ctx, StoragePlan& plan) : policy_(ctx), plan_(plan) {
    py::module_ torch = py::module_::import("torch");
    frombuffer_ = torch.attr("frombuffer");
    from_dlpack_ = torch.attr("_C").attr("_from_dlpack");
    empty_ = torch.attr("empty");
    uint8_ = torch.attr("uint8");
    typed_storage_ = py::module_::import("torch.storage").attr("TypedStorage");
    py::module_ errors = py::module_::import("fastckpt.errors");
    checkpoint_error_ = errors.attr("CheckpointError");
    unpickling_error_ = errors.attr("UnpicklingError");
    encoding_ = policy_.encoding;
    permissive_ = policy_.permissive;
    empty_shape_ = py::make_tuple(0);
    // Names used per tensor, made once: attribute lookups by C string would
    // build and hash a new str on every call.
    name_set_ = py::str("set_");
    name_untyped_storage_ = py::str("untyped_storage");
    name_requires_grad_ = py::str("requires_grad_");
    name_backward_hooks_ = py::str("_backward_hooks");
    frombuffer_kwnames_ = py::make_tuple("dtype", "count");
    empty_kwnames_ = py::make_tuple("dtype");
  }

  // A tuple holding a lazy storage stays lazy, so a rebuild call can take the slot.
  Value tuple(Value* items, size_t n) {
    uint32_t depth = 0, slots = 0;
    bool any_lazy = false;
    for (size_t i = 0; i < n; ++i) {
      depth = std::max(depth, items[i].depth);
      slots = std::max(slots, items[i].slots);
      any_lazy |= items[i].obj.ptr() == nullptr;
    }
    if (any_lazy) {
      LazyRef node(new Lazy());
      node->items.reserve(n);
      for (size_t i = 0; i < n; ++i) {
        Value& item = items[i];
        // Keep materialisation recursion shallow whatever the file nests.
        if (item.lazy && item.lazy->slot == nullptr && item.lazy->nesting >= kMaxLazyNesting) materialize(item);
        if (item.lazy && item.lazy->slot == nullptr) node->nesting = std::max(node->nesting, item.lazy->nesting + 1);
        node->items.push_back(std::move(item));
      }
      return Value{py::object(), std::move(node), depth + 1, false, slots};
    }
    Value v = ValueBuilder::tuple(items, n);
    v.slots = slots;
    return v;
  }
  // ---- globals and calls -------------------------------------------------
  Value global(std::string_view module, std::string_view name) {
    std::string key;
    key.reserve(module.size() + name.size() + 1);
    key.append(module).append(1, '\n').append(name);
    auto it = globals_.find(key);
    if (it != globals_.end()) return it->second;
    py::object m = materialize_str(module), n = materialize_str(name);
    Value v{policy_.resolve_global(m, n), LazyRef(), 0, true};
    v.checked = policy_.checks(v.obj);  // decided once per global, not per REDUCE
    globals_.emplace(std::move(key), v);
    return v;
  }
  Value stack_global(Value& module, Value& name) {
    if (!is_exact_str(module) || !is_exact_str(name)) unsafe("STACK_GLOBAL needs two strings");
    std::string m = module.obj.cast<std::string>(), n = name.obj.cast<std::string>();
    return global(m, n);
  }

  Value reduce(Value& callable, Value& args) {
    if (args.lazy && args.lazy->slot == nullptr &&
        (callable.obj.is(policy_.rebuild_v2) || callable.obj.is(policy_.rebuild_v3))) {
      py::object t;
      try {
        t = fast_rebuild(callable.obj.is(policy_.rebuild_v3), args.lazy->items);
      } catch (py::error_already_set& e) {  // torch refused the file's metadata, as its own function would
        e.restore();
        reraise_as_checkpoint_error(callable.obj);
      }
      if (t) return Value{std::move(t), LazyRef(), 0, false, args.slots};  // bytes not read: no wait
    }
    ready(args);
    py::object a = materialize(args);
    if (!PyTuple_CheckExact(a.ptr())) {
      if (!permissive_) unsafe("REDUCE arguments must be a tuple, got " + describe(args));
      a = steal(PySequence_Tuple(a.ptr()));  // pickle calls func(*args) with any iterable
    }
    if (callable.obj.is(policy_.rebuild_v2) || callable.obj.is(policy_.rebuild_v3) || callable.obj.is(policy_.rebuild_qtensor) ||
        callable.obj.is(policy_.rebuild_tensor))
      check_rebuild_args(callable.obj.is(policy_.rebuild_v3), a);
    // weights_only: the policy decides for callables not named by GLOBAL (torch's rules) and for
    // the few it checks (file-sized allocations, sparse tensors); the others are called directly.
    const bool direct = permissive_ || (callable.global && !callable.checked);
    PyObject* r = direct ? PyObject_Call(callable.obj.ptr(), a.ptr(), nullptr)
                         : PyObject_CallFunctionObjArgs(policy_.reduce.ptr(), callable.obj.ptr(), a.ptr(),
                                                        callable.global ? Py_True : Py_False, nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(callable.obj);
    return Value{steal(r), LazyRef(), args.depth, false, kReachesAllSlots};
  }
  Value newobj(Value& cls, Value& args) {
    ready(args);
    py::object a = materialize(args);
    if (!PyTuple_CheckExact(a.ptr())) unsafe("NEWOBJ arguments must be a tuple, got " + describe(args));
    PyObject* r = PyObject_CallFunctionObjArgs(policy_.newobj.ptr(), cls.obj.ptr(), a.ptr(), nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(cls.obj);
    return Value{steal(r), LazyRef(), args.depth, false, kReachesAllSlots};
  }
  Value newobj_ex(Value& cls, Value& args, Value& kwargs) {
    ready(args);
    ready(kwargs);
    py::object a = materialize(args), k = materialize(kwargs);
    if (!PyTuple_CheckExact(a.ptr()) || !PyDict_CheckExact(k.ptr()))
      unsafe("NEWOBJ_EX needs a tuple and a dict");
    PyObject* r = PyObject_CallFunctionObjArgs(policy_.newobj.ptr(), cls.obj.ptr(), a.ptr(), k.ptr(), nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(cls.obj);
    return Value{steal(r), LazyRef(), args.depth, false, kReachesAllSlots};
  }
  void build(Value& obj, Value& state) {
    ready(obj);
    ready(state);
    py::object o = materialize(obj), st = materialize(state);
    PyObject* r = PyObject_CallFunctionObjArgs(policy_.build.ptr(), o.ptr(), st.ptr(), nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(py::type::handle_of(o));
    Py_DECREF(r);
    obj.depth = std::max(obj.depth, state.depth + 1);
  }

  // ---- storages ------------------------------------------------------------
  Value persistent_load(Value& pid_value) {
    ready(pid_value);
    py::object pid = materialize(pid_value);
    const StorageId id = read_storage_reference(pid, pid_scratch_);
    const StoragePlan::Entry* known = plan_.find(id.key);
    PyValue* cached = known != nullptr && known->id < cached_.size() && cached_[known->id].lazy ? &cached_[known->id] : nullptr;
    if (cached == nullptr && !native_location(PyTuple_GET_ITEM(pid.ptr(), 3), id.location))
      return plain(policy_.persistent_load(pid));

    const DtypeInfo& info = storage_dtype(PyTuple_GET_ITEM(pid.ptr(), 1));
    const uint64_t nbytes = storage_nbytes(id, info.itemsize);
    if (cached != nullptr) {  // only storages with bytes are cached, as in torch
      const StorageSlot& first = *cached->lazy->slot;
      if (first.dtype.is(info.dtype) && first.nbytes == nbytes) return *cached;
      fail(ErrorKind::Metadata, "storage '" + id.key + "' is read as " + std::to_string(id.numel) + " × " +
                                    py::str(info.dtype).cast<std::string>() + " here but as " +
                                    std::to_string(first.nbytes / first.dtype.attr("itemsize").cast<uint64_t>()) + " × " +
                                    py::str(first.dtype).cast<std::string>() +
                                    " before: one non-empty record cannot hold both");
    }
    const StoragePlan::Entry& entry = plan_.entry(id.key, nbytes);
    if (entry.source == StoragePlan::Source::Staged) return plain(policy_.persistent_load(pid));
    slots_.emplace_back();
    StorageSlot& slot = slots_.back();
    slot.entry = &entry;
    slot.nbytes = nbytes;
    slot.dtype = info.dtype;
    LazyRef node(new Lazy());
    node->slot = &slot;
    Value v{py::object(), std::move(node), 0, false, static_cast<uint32_t>(slots_.size())};
    if (nbytes != 0) {  // an empty storage takes each reference's dtype
      if (cached_.empty()) cached_.resize(plan_.entry_count());
      cached_[entry.id] = v;
    }
    return v;
  }

  py::object finish(Value& v, uint32_t max_depth) {
    py::object result = materialize(v);
    check_linked_depth(result, max_depth);
    return result;
  }

 private:
  friend class ValueBuilder<PyBuilder, PyValue>;  // calls plain, materialize, describe, is_settable_mapping

  struct DtypeInfo {
    py::object dtype;
    uint32_t itemsize;
  };

  static Value plain(py::object o) { return Value{std::move(o), LazyRef(), 0, false}; }
  static void made_mutable(Value& v) { v.slots = kReachesAllSlots; }
  // Bytes reach Python code only once read and checked: waits for the records
  // of the slots `v` may reach (in slot order, each at most once per load).
  void ready(const Value& v) {
    const size_t upto = v.slots == kReachesAllSlots ? slots_.size() : v.slots;
    for (; ready_slots_ < upto; ++ready_slots_) {
      const StoragePlan::Entry& entry = *slots_[ready_slots_].entry;
      if (entry.source == StoragePlan::Source::Eager) wait_for(plan_, entry);
    }
  }

  // An allowlisted function refused the file's arguments (a KeyError from
  // _get_layout, a TypeError from a rebuild): still bad input, so it surfaces
  // as fastckpt.UnpicklingError, chained to the original exception.
  [[noreturn]] void reraise_as_checkpoint_error(py::handle callee) {
    py::error_already_set e;
    // weights_only=False runs the file's own code: its errors pass through, as in torch. So do
    // a Ctrl-C or an exit (no Exception) and running out of memory: no verdict on the file.
    if (permissive_ || e.matches(checkpoint_error_) || !e.matches(PyExc_Exception) || e.matches(PyExc_MemoryError))
      throw e;
    std::string what = "calling " + py::repr(callee).cast<std::string>() + " with the file's arguments failed: " + e.what();
    e.restore();
    py::raise_from(unpickling_error_.ptr(), what.c_str());
    throw py::error_already_set();
  }

  std::string describe(const Value& v) {
    if (v.obj.ptr() == nullptr) return v.lazy->slot ? "a storage" : "a tuple";
    return "an object of type " + type_name(v.obj);
  }

  bool is_settable_mapping(PyObject* target) {
    if (target == nullptr) return false;
    return PySequence_Contains(policy_.settable_mappings.ptr(), reinterpret_cast<PyObject*>(Py_TYPE(target))) == 1;
  }

  // Whether the plan makes storages tagged `location` natively; torch.save
  // memoizes the location string, so one object serves all storages.
  bool native_location(py::handle location, const std::string& text) {
    if (location.ptr() == last_location_.ptr()) return last_location_native_;
    last_location_ = py::reinterpret_borrow<py::object>(location);
    last_location_native_ = plan_.native(text);
    return last_location_native_;
  }

  const DtypeInfo& storage_dtype(py::handle storage_type) {
    auto it = dtypes_.find(storage_type.ptr());
    if (it != dtypes_.end()) return it->second;
    py::tuple info = policy_.storage_dtype(storage_type);  // raises for non-storage types
    keep_alive_.push_back(py::reinterpret_borrow<py::object>(storage_type));
    return dtypes_.emplace(storage_type.ptr(), DtypeInfo{info[0], info[1].cast<uint32_t>()}).first->second;
  }

  // The DLPack type of a torch dtype, or nullptr when DLPack has none.
  const DLDataType* dlpack_dtype(py::handle dtype) {
    auto it = dlpack_types_.find(dtype.ptr());
    if (it == dlpack_types_.end()) {
      py::object code_bits = policy_.dlpack_dtype(dtype);
      std::optional<DLDataType> dl;
      if (!code_bits.is_none()) {
        auto pair = code_bits.cast<std::pair<uint8_t, uint8_t>>();
        dl = DLDataType{pair.first, pair.second, 1};
      }
      keep_alive_.push_back(py::reinterpret_borrow<py::object>(dtype));
      it = dlpack_types_.emplace(dtype.ptr(), dl).first;
    }
    return it->second ? &*it->second : nullptr;
  }

  static void contiguous_strides(const std::vector<int64_t>& size, std::vector<int64_t>& strides) {
    strides.resize(size.size());
    int64_t step = 1;
    for (size_t i = size.size(); i-- > 0;) {
      strides[i] = step;
      step *= size[i];
    }
  }

  // Bits per element of a tensor dtype (4 and 2 for the packed quantized ones).
  uint32_t dtype_bits(py::handle dtype) {
    auto it = element_bits_.find(dtype.ptr());
    if (it != element_bits_.end()) return it->second;
    uint32_t bits = policy_.dtype_bits(dtype).cast<uint32_t>();  // raises for non-dtypes
    keep_alive_.push_back(py::reinterpret_borrow<py::object>(dtype));
    element_bits_.emplace(dtype.ptr(), bits);
    return bits;
  }

  py::object& untyped(StorageSlot& slot) {
    if (!slot.untyped) {
      if (slot.first_tensor) {
        slot.untyped = call_method(slot.first_tensor, name_untyped_storage_);
      } else if (slot.nbytes == 0) {
        // Over no bytes and not resizable, as torch's are (UntypedStorage(0) could be
        // grown by a later set_ to a size from the file).
        DLDataType u8{1, 8, 1};
        std::vector<int64_t> shape{0}, strides{1};
        py::capsule capsule = dlpack_capsule(plan_.archive().file, nullptr, u8, shape, strides);  // data_ptr 0, as torch's
        slot.untyped = call_method(steal(PyObject_CallOneArg(from_dlpack_.ptr(), capsule.ptr())), name_untyped_storage_);
      } else {
        slot.untyped = call_method(frombuffer(slot, uint8_, slot.nbytes), name_untyped_storage_);
      }
    }
    return slot.untyped;
  }

  py::object materialize(Value& v) {
    if (v.obj.ptr() != nullptr) return v.obj;
    Lazy& node = *v.lazy;
    if (!node.materialized) {
      if (node.slot != nullptr) {
        StorageSlot& slot = *node.slot;
        if (!slot.typed)
          slot.typed = typed_storage_(py::arg("wrap_storage") = untyped(slot), py::arg("dtype") = slot.dtype,
                                      py::arg("_internal") = true);
        node.materialized = slot.typed;
      } else {
        PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(node.items.size()));
        if (t == nullptr) throw py::error_already_set();
        py::object tuple = steal(t);
        for (size_t i = 0; i < node.items.size(); ++i)
          PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), materialize(node.items[i]).release().ptr());
        node.materialized = std::move(tuple);
      }
    }
    return node.materialized;
  }

  // The storage, offset, size and stride of a rebuild call must describe a
  // tensor inside its storage before torch is asked to make it.
  void check_rebuild_args(bool v3, const py::object& args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args.ptr());
    if (n < 4) fail(ErrorKind::Metadata, "tensor rebuild call with " + std::to_string(n) + " arguments");
    py::handle storage = PyTuple_GET_ITEM(args.ptr(), 0);
    if (!py::isinstance(storage, typed_storage_))
      fail(ErrorKind::Metadata, "tensor rebuild call on a " + type_name(storage) + ", not a storage");
    uint32_t bits;
    if (v3) {
      if (n < 7) fail(ErrorKind::Metadata, "_rebuild_tensor_v3 call without a dtype");
      bits = dtype_bits(PyTuple_GET_ITEM(args.ptr(), 6));
    } else {
      bits = dtype_bits(storage.attr("dtype"));
    }
    uint64_t nbytes = storage.attr("_untyped_storage").attr("nbytes")().cast<uint64_t>();
    as_int64_list(PyTuple_GET_ITEM(args.ptr(), 2), "size", size_);
    as_int64_list(PyTuple_GET_ITEM(args.ptr(), 3), "stride", stride_);
    check_tensor_in_storage(as_int64(PyTuple_GET_ITEM(args.ptr(), 1), "storage offset"), size_, stride_, bits, nbytes);
  }

  // _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
  // _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])
  // Returns a null object to fall back to torch's own function (conj/neg metadata).
  py::object fast_rebuild(bool v3, std::vector<PyValue>& items) {
    const size_t base_arity = v3 ? 7 : 6;
    if (items.size() != base_arity && items.size() != base_arity + 1) return py::object();
    if (!items[0].lazy || items[0].lazy->slot == nullptr) return py::object();
    for (size_t i = 1; i < items.size(); ++i)
      if (items[i].obj.ptr() == nullptr) return py::object();
    if (items.size() == base_arity + 1) {
      PyObject* metadata = items[base_arity].obj.ptr();
      if (metadata != Py_None && !(PyDict_Check(metadata) && PyDict_GET_SIZE(metadata) == 0)) return py::object();
    }
    StorageSlot& slot = *items[0].lazy->slot;
    py::object dtype = v3 ? items[6].obj : slot.dtype;
    const uint32_t bits = dtype_bits(dtype);
    if (bits % 8 != 0) return py::object();  // packed dtypes: torch's own function
    const uint32_t itemsize = bits / 8;
    const int64_t offset = as_int64(items[1].obj, "storage offset");
    std::vector<int64_t>& size = size_;
    std::vector<int64_t>& stride = stride_;
    as_int64_list(items[2].obj, "size", size);
    as_int64_list(items[3].obj, "stride", stride);
    check_tensor_in_storage(offset, size, stride, bits, slot.nbytes);
    PyObject* requires_grad = items[4].obj.ptr();
    if (!PyBool_Check(requires_grad)) fail(ErrorKind::Metadata, "tensor requires_grad is not a bool");

    py::object tensor;
    const uint64_t numel = tensor_numel(size);
    const DLDataType* dl = dlpack_dtype(dtype);
    if (!slot.untyped && !slot.first_tensor && slot.nbytes != 0 && offset == 0 && numel * itemsize == slot.nbytes &&
        is_contiguous(size, stride) && dl != nullptr) {
      // The common case: the first tensor over its storage covers it whole.
      // One torch call makes both, over the bytes in place, shaped.
      contiguous_strides(size, contiguous_);
      // SAFETY: the slot's bytes were checked to be nbytes long when the slot
      // was made (a stored record inside the file, or memory the plan owns);
      // the tensor (numel * itemsize == nbytes, contiguous from offset 0)
      // covers exactly that range, and the capsule holds their owner until
      // torch frees the tensor.
      py::capsule capsule = dlpack_capsule(slot.entry->bytes.owner, slot.entry->bytes.data, *dl, size,
                                           contiguous_);
      tensor = steal(PyObject_CallOneArg(from_dlpack_.ptr(), capsule.ptr()));
      slot.first_tensor = tensor;
    } else if (!slot.untyped && !slot.first_tensor && slot.nbytes != 0 && offset == 0 &&
               numel * itemsize == slot.nbytes && size.size() == 1 && is_contiguous(size, stride)) {
      // Same, for dtypes DLPack cannot name.
      tensor = frombuffer(slot, dtype, numel);
      slot.first_tensor = tensor;
    } else {
      PyObject* args[] = {empty_shape_.ptr(), dtype.ptr()};
      tensor = steal(PyObject_Vectorcall(empty_.ptr(), args, 1, empty_kwnames_.ptr()));
      call_method(tensor, name_set_, {untyped(slot).ptr(), items[1].obj.ptr(), items[2].obj.ptr(), items[3].obj.ptr()});
    }
    if (requires_grad == Py_True) call_method(tensor, name_requires_grad_, {Py_True});
    if (PyObject_SetAttr(tensor.ptr(), name_backward_hooks_.ptr(), items[5].obj.ptr()) != 0) throw py::error_already_set();
    return tensor;
  }

  // torch.frombuffer(the slot's bytes, dtype=, count=) without building a kwargs dict.
  py::object frombuffer(StorageSlot& slot, py::handle dtype, uint64_t count) {
    if (!slot.buffer) slot.buffer = steal(PyMemoryView_FromObject(py::cast(slot.entry->bytes).ptr()));
    py::object n = steal(PyLong_FromUnsignedLongLong(count));
    PyObject* args[] = {slot.buffer.ptr(), dtype.ptr(), n.ptr()};
    return steal(PyObject_Vectorcall(frombuffer_.ptr(), args, 1, frombuffer_kwnames_.ptr()));
  }
  Policy policy_;
  StoragePlan& plan_;
  py::str name_set_, name_untyped_storage_, name_requires_grad_, name_backward_hooks_;
  py::object frombuffer_kwnames_, empty_kwnames_;
  py::object frombuffer_, from_dlpack_, empty_, uint8_, typed_storage_;
  py::object empty_shape_;
  py::object checkpoint_error_, unpickling_error_;
  std::unordered_map<std::string, Value> globals_;
  std::vector<Value> cached_;  // by plan entry id: the storage made for it (non-empty ones, as torch caches)
  std::deque<StorageSlot> slots_;  // stable addresses for Lazy::slot
  size_t ready_slots_ = 0;         // slots_[0, ready_slots_) have their bytes
  py::object last_location_;
  bool last_location_native_ = false;
  PersistentId pid_scratch_;
  std::unordered_map<PyObject*, DtypeInfo> dtypes_;
  std::unordered_map<PyObject*, uint32_t> element_bits_;
  std::unordered_map<PyObject*, std::optional<DLDataType>> dlpack_types_;
  std::vector<py::object> keep_alive_;  // keys of the PyObject* maps above
  std::vector<int64_t> size_, stride_, contiguous_;  // per-tensor scratch
};

}  // namespace

void register_unpickler(py::module_& m) {
  m.def(
      "unpickle",
      [](py::buffer pickle, py::object ctx, StoragePlan& plan) {
        BorrowedBuffer data(pickle, /*writable=*/false);
        PyBuilder builder(ctx, plan);
        PickleLimits limits;
        PickleMachine<PyBuilder> machine(builder, limits);
        try {
          PyValue result = machine.run(data.data(), data.size());
          return builder.finish(result, limits.max_depth);
        } catch (const py::error_already_set&) {  // fetched: no Python error is pending
          ctx.attr("failed_at") = machine.position();
          throw;
        } catch (const Error&) {
          ctx.attr("failed_at") = machine.position();
          throw;
        }
      },
      py::arg("pickle"), py::arg("ctx"), py::arg("plan"),
      "Run the restricted pickle machine over `pickle` with the policy `ctx`. Storages the plan makes "
      "natively are CPU storages over its bytes; `ctx.persistent_load` makes the others. On an error, "
      "`ctx.failed_at` is the byte offset of the opcode that was running.");
}

}  // namespace fastckpt::bindings
