// The Python object builder for the core pickle machine, and `unpickle`.
//
// Policy (what a global resolves to, what NEWOBJ and BUILD may touch) lives in
// Python, in fastckpt/_unpickle.py, behind the `ctx` object; this file does the
// per-opcode work that must be fast: containers, strings, numbers, storages
// and the tensors made by torch._utils._rebuild_tensor_v2/_v3. Storages are
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
#include "core/checked_math.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/pickle_vm.h"
#include "core/tensor_bounds.h"

namespace fastckpt::bindings {
namespace {

// A storage record as it will be seen by tensors: where its bytes are in the
// source buffer, and the Python objects made for it so far.
struct StorageSlot {
  uint64_t source_offset = 0;
  size_t job_record = SIZE_MAX;  // eager loads: its record's index in the read job
  uint64_t nbytes = 0;
  py::object dtype;       // from the first persistent id naming this key
  uint32_t itemsize = 1;
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

[[noreturn]] void unsafe(const std::string& what) { fail(ErrorKind::UnsafeGlobal, what); }

std::string type_name(py::handle obj) {
  return py::str(py::type::handle_of(obj)).cast<std::string>();
}

int64_t as_int64(py::handle v, const char* what) {
  if (!PyLong_CheckExact(v.ptr()) && !PyBool_Check(v.ptr()))
    fail(ErrorKind::Metadata, std::string("tensor ") + what + " is a " + type_name(v) + ", not an int");
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0) fail(ErrorKind::Metadata, std::string("tensor ") + what + " does not fit in 64 bits");
  return x;
}

// Fills `out` (reused across tensors to spare an allocation each).
void as_int64_list(py::handle v, const char* what, std::vector<int64_t>& out) {
  if (!PyTuple_Check(v.ptr()))  // torch.Size is a tuple subclass
    fail(ErrorKind::Metadata, std::string("tensor ") + what + " is a " + type_name(v) + ", not a tuple");
  Py_ssize_t n = PyTuple_GET_SIZE(v.ptr());
  if (n > static_cast<Py_ssize_t>(kMaxTensorDims))
    fail(ErrorKind::Metadata, "tensor has " + std::to_string(n) + " dimensions (at most " +
                                  std::to_string(kMaxTensorDims) + " are accepted)");
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = as_int64(PyTuple_GET_ITEM(v.ptr(), i), what);
}

// Where storages come from in the fast path.
struct StorageSource {
  std::shared_ptr<Archive> archive;
  ByteView bytes;                                      // the mapping, or the eager arena
  py::object buffer;                                   // a memoryview of `bytes`
  ReadJob* job = nullptr;                              // eager reads still arriving; null: mmap
  std::unordered_map<const ZipRecord*, size_t> job_index;  // record -> its index in the job
};

class PyBuilder {
 public:
  using Value = PyValue;

  PyBuilder(py::object ctx, std::optional<StorageSource> source)
      : ctx_(std::move(ctx)), source_(std::move(source)) {
    py::module_ torch = py::module_::import("torch");
    frombuffer_ = torch.attr("frombuffer");
    from_dlpack_ = torch.attr("_C").attr("_from_dlpack");
    empty_ = torch.attr("empty");
    uint8_ = torch.attr("uint8");
    typed_storage_ = py::module_::import("torch.storage").attr("TypedStorage");
    rebuild_v2_ = ctx_.attr("rebuild_tensor_v2");
    rebuild_v3_ = ctx_.attr("rebuild_tensor_v3");
    rebuild_qtensor_ = ctx_.attr("rebuild_qtensor");
    rebuild_tensor_ = ctx_.attr("rebuild_tensor");
    newobj_ = ctx_.attr("newobj");
    build_ = ctx_.attr("build");
    py::module_ errors = py::module_::import("fastckpt.errors");
    checkpoint_error_ = errors.attr("CheckpointError");
    unpickling_error_ = errors.attr("UnpicklingError");
    encoding_ = ctx_.attr("encoding").cast<std::string>();
    permissive_ = ctx_.attr("permissive").cast<bool>();
    if (!permissive_) {
      reduce_ = ctx_.attr("reduce");
      for (py::handle c : ctx_.attr("checked_callables")) checked_callables_.push_back(py::reinterpret_borrow<py::object>(c));
    }
    empty_shape_ = py::make_tuple(0);
    zero_ = py::int_(0);
    // Names used per tensor, made once: attribute lookups by C string would
    // build and hash a new str on every call.
    name_set_ = py::str("set_");
    name_untyped_storage_ = py::str("untyped_storage");
    name_requires_grad_ = py::str("requires_grad_");
    name_backward_hooks_ = py::str("_backward_hooks");
    name_append_ = py::str("append");
    name_add_ = py::str("add");
    frombuffer_kwnames_ = py::make_tuple("dtype", "count", "offset");
    empty_kwnames_ = py::make_tuple("dtype");
  }

  // ---- scalars and strings ------------------------------------------------
  Value none() { return plain(py::none()); }
  Value boolean(bool v) { return plain(py::bool_(v)); }
  Value integer(int64_t v) { return plain(steal(PyLong_FromLongLong(v))); }
  Value big_integer(const uint8_t* le, size_t n) {
    if (n == 0) return integer(0);
    if (n <= 8) {
      uint64_t u = 0;
      for (size_t i = n; i-- > 0;) u = (u << 8) | le[i];
      if (n < 8 && (le[n - 1] & 0x80)) u |= ~uint64_t{0} << (8 * n);  // sign-extend
      return integer(static_cast<int64_t>(u));
    }
    py::bytes raw(reinterpret_cast<const char*>(le), n);
    return plain(py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(&PyLong_Type))
                     .attr("from_bytes")(raw, "little", py::arg("signed") = true));
  }
  Value decimal_integer(std::string_view text) {
    std::string s(text);
    PyObject* v = PyLong_FromString(s.c_str(), nullptr, 10);
    if (v == nullptr) python_value_error("bad integer literal");
    return plain(steal(v));
  }
  Value floating(double d) { return plain(steal(PyFloat_FromDouble(d))); }
  Value float_text(std::string_view text) {
    PyObject* decoded = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "strict");
    if (decoded == nullptr) python_value_error("bad float literal");
    py::object s = steal(decoded);
    PyObject* v = PyFloat_FromString(s.ptr());
    if (v == nullptr) python_value_error("bad float literal");
    return plain(steal(v));
  }
  Value unicode(std::string_view utf8) {
    // surrogatepass, as pickle and torch's unpickler decode BINUNICODE
    PyObject* v = PyUnicode_DecodeUTF8(utf8.data(), static_cast<Py_ssize_t>(utf8.size()), "surrogatepass");
    if (v == nullptr) python_value_error("string is not valid UTF-8");
    return plain(steal(v));
  }
  Value unicode_raw_escape(std::string_view s) {
    PyObject* v = PyUnicode_DecodeRawUnicodeEscape(s.data(), static_cast<Py_ssize_t>(s.size()), nullptr);
    if (v == nullptr) python_value_error("bad UNICODE literal");
    return plain(steal(v));
  }
  Value byte_string(std::string_view s) {
    py::bytes raw(s.data(), s.size());
    if (encoding_ == "bytes") return plain(raw);
    PyObject* v = PyUnicode_FromEncodedObject(raw.ptr(), encoding_.c_str(), "strict");
    if (v == nullptr) python_value_error("string cannot be decoded as " + encoding_);
    return plain(steal(v));
  }
  Value string_literal(std::string_view quoted) {
    if (quoted.size() < 2 || quoted.front() != quoted.back() || (quoted.front() != '\'' && quoted.front() != '"'))
      fail(ErrorKind::Unpickling, "malformed pickle: STRING literal is not quoted");
    quoted = quoted.substr(1, quoted.size() - 2);
    py::object decoded;
    try {
      decoded = py::module_::import("codecs").attr("escape_decode")(py::bytes(quoted.data(), quoted.size()))[py::int_(0)];
    } catch (py::error_already_set&) {
      python_value_error("bad STRING literal");
    }
    std::string_view raw = PyBytes_AS_STRING(decoded.ptr());
    return byte_string(std::string_view(raw.data(), static_cast<size_t>(PyBytes_GET_SIZE(decoded.ptr()))));
  }
  Value bytes(std::string_view s) { return plain(py::bytes(s.data(), s.size())); }
  Value bytearray(std::string_view s) {
    return plain(steal(PyByteArray_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()))));
  }

  // ---- containers --------------------------------------------------------
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
    PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(n));
    if (t == nullptr) throw py::error_already_set();
    for (size_t i = 0; i < n; ++i) PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), items[i].obj.release().ptr());
    return Value{steal(t), LazyRef(), depth + 1, false, slots};
  }
  Value list(Value* items, size_t n) {
    Value l{steal(PyList_New(0)), LazyRef(), 1, false, kReachesAllSlots};
    list_extend(l, items, n);
    return l;
  }
  void list_extend(Value& list, Value* items, size_t n) {
    const bool exact = list.obj.ptr() != nullptr && PyList_CheckExact(list.obj.ptr());
    // torch's texts: APPEND "append to", APPENDS "extend" (one item is the former)
    if (!exact && !permissive_)
      unsafe(std::string(n == 1 ? "Can only append to lists" : "Can only extend lists") + ", but got " + type_repr(list));
    if (!exact) ready(list);  // its own append() runs
    for (size_t i = 0; i < n; ++i) {
      py::object item = materialize(items[i]);
      if (!exact) {
        ready(items[i]);
        call_method(materialize(list), name_append_, {item.ptr()});
      } else if (PyList_Append(list.obj.ptr(), item.ptr()) != 0) {
        throw py::error_already_set();
      }
      list.depth = std::max(list.depth, items[i].depth + 1);
    }
  }
  Value dict(Value* kv, size_t pairs) {
    Value d{steal(PyDict_New()), LazyRef(), 1, false, kReachesAllSlots};
    dict_set(d, kv, pairs);
    return d;
  }
  void dict_set(Value& d, Value* kv, size_t pairs) {
    PyObject* target = d.obj.ptr();
    const bool exact_dict = target != nullptr && PyDict_CheckExact(target);
    if (!exact_dict && !permissive_ && !is_settable_mapping(target))
      unsafe(std::string("Can only ") + (pairs == 1 ? "SETITEM" : "SETITEMS") +
             " for dict, collections.OrderedDict, collections.Counter, but got " + type_repr(d));
    if (!exact_dict) ready(d);  // a mapping's own __setitem__ may run
    for (size_t i = 0; i < pairs; ++i) {
      PyObject* key = materialize(kv[2 * i]).ptr();
      PyObject* value = materialize(kv[2 * i + 1]).ptr();
      if (!exact_dict) {
        ready(kv[2 * i]);
        ready(kv[2 * i + 1]);
      }
      int rc = exact_dict ? PyDict_SetItem(target, key, value) : PyObject_SetItem(target, key, value);
      if (rc != 0) python_value_error("cannot set a dict item");
      d.depth = std::max(d.depth, std::max(kv[2 * i].depth, kv[2 * i + 1].depth) + 1);
    }
  }
  Value empty_set() { return Value{steal(PySet_New(nullptr)), LazyRef(), 1, false, kReachesAllSlots}; }
  void set_add(Value& s, Value* items, size_t n) {
    const bool exact = s.obj.ptr() != nullptr && PySet_CheckExact(s.obj.ptr());
    if (!exact && !permissive_) unsafe("Can only add items to sets, but got " + type_repr(s));
    if (!exact) ready(s);
    for (size_t i = 0; i < n; ++i) {
      py::object item = materialize(items[i]);
      if (!exact) {
        ready(items[i]);
        call_method(materialize(s), name_add_, {item.ptr()});
      } else if (PySet_Add(s.obj.ptr(), item.ptr()) != 0) {
        python_value_error("cannot add a set item");
      }
      s.depth = std::max(s.depth, items[i].depth + 1);
    }
  }
  Value frozenset(Value* items, size_t n) {
    Value s = empty_set();
    set_add(s, items, n);
    return Value{steal(PyFrozenSet_New(s.obj.ptr())), LazyRef(), s.depth, false, kReachesAllSlots};
  }
  uint32_t depth(const Value& v) const { return v.depth; }

  // ---- globals and calls -------------------------------------------------
  Value global(std::string_view module, std::string_view name) {
    std::string key;
    key.reserve(module.size() + name.size() + 1);
    key.append(module).append(1, '\n').append(name);
    auto it = globals_.find(key);
    if (it != globals_.end()) return it->second;
    py::object m = materialize_str(module), n = materialize_str(name);
    Value v{ctx_.attr("resolve_global")(m, n), LazyRef(), 0, true};
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
        (callable.obj.is(rebuild_v2_) || callable.obj.is(rebuild_v3_))) {
      py::object t;
      try {
        t = fast_rebuild(callable.obj.is(rebuild_v3_), args.lazy->items);
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
    if (callable.obj.is(rebuild_v2_) || callable.obj.is(rebuild_v3_) || callable.obj.is(rebuild_qtensor_) ||
        callable.obj.is(rebuild_tensor_))
      check_rebuild_args(callable.obj.is(rebuild_v3_), a);
    // weights_only: the policy decides for callables not named by GLOBAL (torch's rules) and for
    // the few it checks (file-sized allocations, sparse tensors); the others are called directly.
    const bool direct = permissive_ || (callable.global && !is_checked_callable(callable.obj));
    PyObject* r = direct ? PyObject_Call(callable.obj.ptr(), a.ptr(), nullptr)
                         : PyObject_CallFunctionObjArgs(reduce_.ptr(), callable.obj.ptr(), a.ptr(),
                                                        callable.global ? Py_True : Py_False, nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(callable.obj);
    return Value{steal(r), LazyRef(), args.depth, false, kReachesAllSlots};
  }
  Value newobj(Value& cls, Value& args) {
    ready(args);
    py::object a = materialize(args);
    if (!PyTuple_CheckExact(a.ptr())) unsafe("NEWOBJ arguments must be a tuple, got " + describe(args));
    PyObject* r = PyObject_CallFunctionObjArgs(newobj_.ptr(), cls.obj.ptr(), a.ptr(), nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(cls.obj);
    return Value{steal(r), LazyRef(), args.depth, false, kReachesAllSlots};
  }
  Value newobj_ex(Value& cls, Value& args, Value& kwargs) {
    ready(args);
    ready(kwargs);
    py::object a = materialize(args), k = materialize(kwargs);
    if (!PyTuple_CheckExact(a.ptr()) || !PyDict_CheckExact(k.ptr()))
      unsafe("NEWOBJ_EX needs a tuple and a dict");
    PyObject* r = PyObject_CallFunctionObjArgs(newobj_.ptr(), cls.obj.ptr(), a.ptr(), k.ptr(), nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(cls.obj);
    return Value{steal(r), LazyRef(), args.depth, false, kReachesAllSlots};
  }
  void build(Value& obj, Value& state) {
    ready(obj);
    ready(state);
    py::object o = materialize(obj), st = materialize(state);
    PyObject* r = PyObject_CallFunctionObjArgs(build_.ptr(), o.ptr(), st.ptr(), nullptr);
    if (r == nullptr) reraise_as_checkpoint_error(py::type::handle_of(o));
    Py_DECREF(r);
    obj.depth = std::max(obj.depth, state.depth + 1);
  }

  // ---- storages ------------------------------------------------------------
  Value persistent_load(Value& pid_value) {
    ready(pid_value);
    py::object pid = materialize(pid_value);
    if (!source_) return plain(ctx_.attr("persistent_load")(pid));
    if (!PyTuple_CheckExact(pid.ptr()) || PyTuple_GET_SIZE(pid.ptr()) != 5)
      unsafe("persistent id must be a 5-tuple ('storage', type, key, location, numel), got " + describe(pid_value));
    py::handle tag = PyTuple_GET_ITEM(pid.ptr(), 0), storage_type = PyTuple_GET_ITEM(pid.ptr(), 1),
               key = PyTuple_GET_ITEM(pid.ptr(), 2), location = PyTuple_GET_ITEM(pid.ptr(), 3),
               numel = PyTuple_GET_ITEM(pid.ptr(), 4);
    if (!PyUnicode_CheckExact(tag.ptr()) || PyUnicode_CompareWithASCIIString(tag.ptr(), "storage") != 0)
      unsafe("only persistent ids of storages are allowed");
    if (!PyUnicode_CheckExact(key.ptr()) || !PyUnicode_CheckExact(location.ptr()))
      fail(ErrorKind::Metadata, "storage key and location must be strings");
    Py_ssize_t key_len = 0;
    const char* key_utf8 = PyUnicode_AsUTF8AndSize(key.ptr(), &key_len);
    if (key_utf8 == nullptr) throw py::error_already_set();
    std::string key_str(key_utf8, static_cast<size_t>(key_len));
    PyValue* cached = find_slot(key_str);
    if (cached == nullptr && !cpu_location(location)) return plain(ctx_.attr("persistent_load")(pid));

    const DtypeInfo& info = storage_dtype(storage_type);
    int64_t n = as_int64(numel, "storage numel");
    uint64_t nbytes;
    if (n < 0 || !checked_mul(static_cast<uint64_t>(n), info.itemsize, &nbytes))
      fail(ErrorKind::Metadata, "storage '" + key_str + "' has an invalid numel " + std::to_string(n));
    if (cached != nullptr) {  // only storages with bytes are cached, as in torch
      const StorageSlot& first = *cached->lazy->slot;
      if (first.dtype.is(info.dtype) && first.nbytes == nbytes) return *cached;
      fail(ErrorKind::Metadata, "storage '" + key_str + "' is read as " + std::to_string(n) + " × " +
                                    py::str(info.dtype).cast<std::string>() + " here but as " +
                                    std::to_string(first.nbytes / first.itemsize) + " × " +
                                    py::str(first.dtype).cast<std::string>() +
                                    " before: one non-empty record cannot hold both");
    }
    const ZipRecord& record = storage_record(key_str);
    if (record.size != nbytes)
      fail(ErrorKind::Record, "record 'data/" + key_str + "' holds " + std::to_string(record.size) +
                                  " bytes but its storage needs " + std::to_string(nbytes) + " (" +
                                  std::to_string(n) + " elements of " + std::to_string(info.itemsize) + " bytes)");
    slots_.emplace_back();
    StorageSlot& slot = slots_.back();
    slot.nbytes = nbytes;
    slot.dtype = info.dtype;
    slot.itemsize = info.itemsize;
    if (source_->job == nullptr) {
      source_->archive->stored_view(record);  // stored, inside the file
      slot.source_offset = record.data_offset;
    } else {
      auto at = source_->job_index.find(&record);
      if (at == source_->job_index.end()) fail(ErrorKind::Record, "record 'data/" + key_str + "' was not read");
      slot.job_record = at->second;
      slot.source_offset = source_->job->offsets()[at->second];
    }
    if (!range_within(slot.source_offset, slot.nbytes, source_->bytes.size))
      fail(ErrorKind::Record, "record 'data/" + key_str + "' lies outside the bytes read");
    LazyRef node(new Lazy());
    node->slot = &slot;
    Value v{py::object(), std::move(node), 0, false, static_cast<uint32_t>(slots_.size())};
    if (nbytes != 0) remember_slot(key_str, v);  // an empty storage takes each reference's dtype
    return v;
  }

  py::object finish(Value& v, uint32_t max_depth) {
    py::object result = materialize(v);
    check_linked_depth(result, max_depth);
    return result;
  }

 private:
  struct DtypeInfo {
    py::object dtype;
    uint32_t itemsize;
  };

  static py::object steal(PyObject* p) {
    if (p == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(p);
  }
  static Value plain(py::object o) { return Value{std::move(o), LazyRef(), 0, false}; }
  static bool is_exact_str(const Value& v) { return v.obj.ptr() != nullptr && PyUnicode_CheckExact(v.obj.ptr()); }

  // Bytes reach Python code only once read and checked: waits for the records
  // of the slots `v` may reach (in slot order, each at most once per load).
  void ready(const Value& v) {
    if (!source_ || source_->job == nullptr) return;
    const size_t upto = v.slots == kReachesAllSlots ? slots_.size() : v.slots;
    for (; ready_slots_ < upto; ++ready_slots_) {
      const StorageSlot& slot = slots_[ready_slots_];
      if (slot.job_record != SIZE_MAX) source_->job->wait_record(slot.job_record);
    }
  }

  // The nesting cap counted on the finished graph: depth is tracked as values
  // are built, but a list memoized, linked into its parent and only then
  // filled (through a memo GET) deepens its parent unseen. Iterative, shared
  // containers visited once; a reference back into a container being walked
  // (a cycle) adds nothing.
  void check_linked_depth(py::handle root, uint32_t max_depth) {
    struct Frame {
      PyObject* obj;
      py::object items;  // the container's children as a list or tuple
      Py_ssize_t next;
      uint32_t height;
    };
    std::unordered_map<PyObject*, uint32_t> heights;  // finished containers; 0 = being walked
    std::vector<Frame> stack;
    auto children = [](PyObject* o) -> py::object {
      if (PyList_Check(o) || PyTuple_Check(o)) return py::reinterpret_borrow<py::object>(o);
      if (PyDict_Check(o)) {
        py::list kv;
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(o, &pos, &k, &v)) {
          kv.append(k);
          kv.append(v);
        }
        return std::move(kv);
      }
      if (PyAnySet_Check(o)) return steal(PySequence_List(o));
      return py::object();
    };
    auto enter = [&](PyObject* o) -> uint32_t {  // height if known now, else pushes a frame
      auto it = heights.find(o);
      if (it != heights.end()) return it->second;
      py::object items = children(o);
      if (!items) return 0;
      heights.emplace(o, 0);
      stack.push_back({o, std::move(items), 0, 1});
      if (stack.size() > max_depth)
        fail(ErrorKind::Limit, "containers nested deeper than " + std::to_string(max_depth));
      return UINT32_MAX;
    };
    enter(root.ptr());
    while (!stack.empty()) {
      Frame& f = stack.back();
      PyObject* items = f.items.ptr();
      const Py_ssize_t n = PyList_Check(items) ? PyList_GET_SIZE(items) : PyTuple_GET_SIZE(items);
      if (f.next == n) {
        heights[f.obj] = f.height;
        const uint32_t h = f.height;
        stack.pop_back();
        if (!stack.empty()) stack.back().height = std::max(stack.back().height, h + 1);
        continue;
      }
      PyObject* child = PyList_Check(items) ? PyList_GET_ITEM(items, f.next) : PyTuple_GET_ITEM(items, f.next);
      ++f.next;
      const uint32_t h = enter(child);  // may reallocate `stack`: `f` is not used after this
      if (h == UINT32_MAX) continue;
      if (stack.size() + h > max_depth)  // a subtree walked before, now reached deeper
        fail(ErrorKind::Limit, "containers nested deeper than " + std::to_string(max_depth));
      stack.back().height = std::max(stack.back().height, h + 1);
    }
  }

  // Turns the pending Python exception into an UnpicklingError that keeps its text.
  [[noreturn]] static void python_value_error(const std::string& what) {
    std::string detail;
    if (PyErr_Occurred()) {
      py::error_already_set e;
      detail = std::string(": ") + e.what();
    }
    fail(ErrorKind::Unpickling, "malformed pickle: " + what + detail);
  }

  // torch.save names storages "0", "1", ...: those index a vector (bounded by
  // the archive's record count); any other key goes through a map.
  static bool decimal_key(std::string_view key, size_t bound, size_t* out) {
    if (key.empty() || key.size() > 9 || (key.size() > 1 && key[0] == '0')) return false;
    size_t v = 0;
    for (char c : key) {
      if (c < '0' || c > '9') return false;
      v = v * 10 + static_cast<size_t>(c - '0');
    }
    *out = v;
    return v < bound;
  }
  PyValue* find_slot(const std::string& key) {
    size_t i;
    if (decimal_key(key, numbered_slots_.size(), &i)) return numbered_slots_[i].lazy ? &numbered_slots_[i] : nullptr;
    auto it = named_slots_.find(key);
    return it == named_slots_.end() ? nullptr : &it->second;
  }
  // The record "data/<key>". Numbered keys are looked up in a table made with
  // one sequential pass over the index: random probes into a large index
  // cost a cache miss each.
  const ZipRecord& storage_record(const std::string& key) {
    const auto& records = source_->archive->index.records();
    if (!numbered_records_built_) {
      numbered_records_built_ = true;
      for (const ZipRecord& r : records) {
        size_t i;
        if (r.name.compare(0, 5, "data/") == 0 && decimal_key(std::string_view(r.name).substr(5), records.size(), &i)) {
          if (i >= numbered_records_.size()) numbered_records_.resize(i + 1, nullptr);
          numbered_records_[i] = &r;
        }
      }
    }
    size_t i;
    if (decimal_key(key, numbered_records_.size(), &i) && numbered_records_[i] != nullptr) return *numbered_records_[i];
    return source_->archive->record("data/" + key);
  }

  void remember_slot(const std::string& key, const PyValue& v) {
    size_t i;
    if (decimal_key(key, source_->archive->index.records().size(), &i)) {
      if (i >= numbered_slots_.size()) numbered_slots_.resize(i + 1);
      numbered_slots_[i] = v;
    } else {
      named_slots_.emplace(key, v);
    }
  }

  // An allowlisted function refused the file's arguments (a KeyError from
  // _get_layout, a TypeError from a rebuild): still bad input, so it surfaces
  // as fastckpt.UnpicklingError, chained to the original exception.
  [[noreturn]] void reraise_as_checkpoint_error(py::handle callee) {
    py::error_already_set e;
    // weights_only=False runs the file's own code: its errors pass through, as in torch.
    if (permissive_ || e.matches(checkpoint_error_)) throw e;
    std::string what = "calling " + py::repr(callee).cast<std::string>() + " with the file's arguments failed: " + e.what();
    e.restore();
    py::raise_from(unpickling_error_.ptr(), what.c_str());
    throw py::error_already_set();
  }

  py::object materialize_str(std::string_view s) {
    PyObject* v = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "strict");
    if (v == nullptr) python_value_error("global name is not valid UTF-8");
    return steal(v);
  }

  bool is_checked_callable(const py::object& f) const {
    for (const py::object& c : checked_callables_)
      if (c.is(f)) return true;
    return false;
  }

  // str(type(v)), as torch's messages print it: "<class 'list'>".
  std::string type_repr(Value& v) { return py::str(py::type::handle_of(materialize(v))).cast<std::string>(); }

  std::string describe(const Value& v) {
    if (v.obj.ptr() == nullptr) return v.lazy->slot ? "a storage" : "a tuple";
    return "an object of type " + type_name(v.obj);
  }

  bool is_settable_mapping(PyObject* target) {
    if (target == nullptr) return false;
    if (!settable_types_) settable_types_ = ctx_.attr("settable_mappings");
    return PySequence_Contains(settable_types_.ptr(), reinterpret_cast<PyObject*>(Py_TYPE(target))) == 1;
  }

  bool cpu_location(py::handle location) {
    // torch.save memoizes the location string: one object for all storages.
    if (location.ptr() == last_location_.ptr()) return last_location_fast_;
    std::string loc = location.cast<std::string>();
    last_location_ = py::reinterpret_borrow<py::object>(location);
    auto it = fast_locations_.find(loc);
    if (it == fast_locations_.end())
      it = fast_locations_.emplace(std::move(loc), ctx_.attr("fast_location")(location).cast<bool>()).first;
    last_location_fast_ = it->second;
    return it->second;
  }

  const DtypeInfo& storage_dtype(py::handle storage_type) {
    auto it = dtypes_.find(storage_type.ptr());
    if (it != dtypes_.end()) return it->second;
    py::tuple info = ctx_.attr("storage_dtype")(storage_type);  // raises for non-storage types
    keep_alive_.push_back(py::reinterpret_borrow<py::object>(storage_type));
    return dtypes_.emplace(storage_type.ptr(), DtypeInfo{info[0], info[1].cast<uint32_t>()}).first->second;
  }

  // The DLPack type of a torch dtype, or nullptr when DLPack has none.
  const DLDataType* dlpack_dtype(py::handle dtype) {
    auto it = dlpack_types_.find(dtype.ptr());
    if (it == dlpack_types_.end()) {
      py::object code_bits = ctx_.attr("dlpack_dtype")(dtype);
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
    uint32_t bits = ctx_.attr("dtype_bits")(dtype).cast<uint32_t>();  // raises for non-dtypes
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
        py::capsule capsule = dlpack_capsule(source_->bytes.owner, nullptr, u8, shape, strides);  // data_ptr 0, as torch's
        slot.untyped = call_method(steal(PyObject_CallOneArg(from_dlpack_.ptr(), capsule.ptr())), name_untyped_storage_);
      } else {
        slot.untyped = call_method(frombuffer(uint8_, slot.nbytes, slot.source_offset), name_untyped_storage_);
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
      // SAFETY: the slot's [source_offset, +nbytes) was checked against the
      // source bytes when the slot was made, and the tensor (numel * itemsize
      // == nbytes, contiguous from offset 0) covers exactly that range; the
      // capsule holds the owner until torch frees the tensor.
      py::capsule capsule = dlpack_capsule(source_->bytes.owner, source_->bytes.data + slot.source_offset, *dl, size,
                                           contiguous_);
      tensor = steal(PyObject_CallOneArg(from_dlpack_.ptr(), capsule.ptr()));
      slot.first_tensor = tensor;
    } else if (!slot.untyped && !slot.first_tensor && slot.nbytes != 0 && offset == 0 &&
               numel * itemsize == slot.nbytes && size.size() == 1 && is_contiguous(size, stride)) {
      // Same, for dtypes DLPack cannot name.
      tensor = frombuffer(dtype, numel, slot.source_offset);
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

  // torch.frombuffer(buffer, dtype=, count=, offset=) without building a kwargs dict.
  py::object frombuffer(py::handle dtype, uint64_t count, uint64_t offset) {
    py::object n = steal(PyLong_FromUnsignedLongLong(count)), o = steal(PyLong_FromUnsignedLongLong(offset));
    PyObject* args[] = {source_->buffer.ptr(), dtype.ptr(), n.ptr(), o.ptr()};
    return steal(PyObject_Vectorcall(frombuffer_.ptr(), args, 1, frombuffer_kwnames_.ptr()));
  }
  py::object call_method(py::handle self, const py::str& name, std::initializer_list<PyObject*> args = {}) {
    PyObject* argv[5] = {self.ptr()};
    size_t n = 1;
    for (PyObject* a : args) argv[n++] = a;
    return steal(PyObject_VectorcallMethod(name.ptr(), argv, n | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
  }

  py::object ctx_;
  std::optional<StorageSource> source_;
  py::str name_set_, name_untyped_storage_, name_requires_grad_, name_backward_hooks_, name_append_, name_add_;
  // weights_only=False: any callable, any container, the file's own errors.
  bool permissive_ = false;
  py::object frombuffer_kwnames_, empty_kwnames_;
  py::object frombuffer_, from_dlpack_, empty_, uint8_, typed_storage_;
  py::object rebuild_v2_, rebuild_v3_, rebuild_qtensor_, rebuild_tensor_, newobj_, reduce_, build_, settable_types_, empty_shape_, zero_;
  py::object checkpoint_error_, unpickling_error_;
  std::vector<py::object> checked_callables_;  // weights_only: REDUCE on these goes through ctx.reduce
  std::string encoding_;
  std::unordered_map<std::string, Value> globals_;
  std::vector<Value> numbered_slots_;
  std::vector<const ZipRecord*> numbered_records_;
  bool numbered_records_built_ = false;
  std::unordered_map<std::string, Value> named_slots_;
  std::deque<StorageSlot> slots_;  // stable addresses for Lazy::slot
  size_t ready_slots_ = 0;         // slots_[0, ready_slots_) have their bytes
  std::unordered_map<std::string, bool> fast_locations_;
  py::object last_location_;
  bool last_location_fast_ = false;
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
      [](py::buffer pickle, py::object ctx, std::shared_ptr<Archive> archive, py::object source,
         ReadJob* eager) {
        BorrowedBuffer data(pickle, /*writable=*/false);
        std::optional<StorageSource> storage_source;
        if (archive) {
          StorageSource s;
          s.archive = archive;
          s.bytes = source.cast<ByteView>();
          s.buffer = py::reinterpret_steal<py::object>(PyMemoryView_FromObject(source.ptr()));
          if (!s.buffer) throw py::error_already_set();
          if (eager != nullptr) {
            s.job = eager;
            s.job_index.reserve(eager->records().size());
            for (size_t i = 0; i < eager->records().size(); ++i) s.job_index.emplace(eager->records()[i], i);
          }
          storage_source = std::move(s);
        }
        PyBuilder builder(std::move(ctx), std::move(storage_source));
        PickleLimits limits;
        PickleMachine<PyBuilder> machine(builder, limits);
        PyValue result = machine.run(data.data(), data.size());
        return builder.finish(result, limits.max_depth);
      },
      py::arg("pickle"), py::arg("ctx"), py::arg("archive") = nullptr, py::arg("source") = py::none(),
      py::arg("eager") = nullptr,
      "Run the restricted pickle machine over `pickle`. With `archive` and `source` (a ByteView of the "
      "archive, or the buffer of the eager ReadJob `eager`), storages of CPU tensors are made "
      "natively; otherwise `ctx.persistent_load` makes them.");
}

}  // namespace fastckpt::bindings
