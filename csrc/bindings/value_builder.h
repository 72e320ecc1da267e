// The part of a pickle-machine Builder that makes plain Python values:
// scalars, strings and containers, with the nesting depth the machine caps.
// No torch here: the torch builder (unpickler_bindings.cc) and the torch-free
// reader builder (reader_bindings.cc) both derive from it.
//
// CRTP: Derived provides
//   static Value plain(py::object);            // a value that is a ready Python object
//   py::object materialize(Value&);            // the Python object of any value
//   std::string describe(const Value&);        // for error messages
//   bool is_settable_mapping(PyObject*);       // SETITEM targets besides exact dicts
//   void ready(const Value&);                  // before a value reaches Python code (an append()...)
//   static void made_mutable(Value&);          // a list, dict or set was made: it may be filled later
// and Value has the fields `py::object obj` (null while a value is lazy) and
// `uint32_t depth`. Derived may hide tuple() to keep some tuples lazy.
//
// Every function here runs with the GIL held.
#pragma once

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/errors.h"
#include "core/tensor_bounds.h"

namespace fastckpt::bindings {

namespace py = pybind11;

[[noreturn]] inline void unsafe(const std::string& what) { fail(ErrorKind::UnsafeGlobal, what); }

inline std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj)).cast<std::string>(); }

inline int64_t as_int64(py::handle v, const char* what) {
  if (!PyLong_CheckExact(v.ptr()) && !PyBool_Check(v.ptr()))
    fail(ErrorKind::Metadata, std::string("tensor ") + what + " is a " + type_name(v) + ", not an int");
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0) fail(ErrorKind::Metadata, std::string("tensor ") + what + " does not fit in 64 bits");
  return x;
}

// Fills `out` (reused across tensors to spare an allocation each).
inline void as_int64_list(py::handle v, const char* what, std::vector<int64_t>& out) {
  if (!PyTuple_Check(v.ptr()))  // torch.Size is a tuple subclass
    fail(ErrorKind::Metadata, std::string("tensor ") + what + " is a " + type_name(v) + ", not a tuple");
  Py_ssize_t n = PyTuple_GET_SIZE(v.ptr());
  if (n > static_cast<Py_ssize_t>(kMaxTensorDims))
    fail(ErrorKind::Metadata, "tensor has " + std::to_string(n) + " dimensions (at most " +
                                  std::to_string(kMaxTensorDims) + " are accepted)");
  out.resize(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = as_int64(PyTuple_GET_ITEM(v.ptr(), i), what);
}

template <class Derived, class Value>
class ValueBuilder {
 public:
  // ---- scalars and strings ------------------------------------------------
  Value none() { return Derived::plain(py::none()); }
  Value boolean(bool v) { return Derived::plain(py::bool_(v)); }
  Value integer(int64_t v) { return Derived::plain(steal(PyLong_FromLongLong(v))); }
  Value big_integer(const uint8_t* le, size_t n) {
    if (n == 0) return integer(0);
    if (n <= 8) {
      uint64_t u = 0;
      for (size_t i = n; i-- > 0;) u = (u << 8) | le[i];
      if (n < 8 && (le[n - 1] & 0x80)) u |= ~uint64_t{0} << (8 * n);  // sign-extend
      return integer(static_cast<int64_t>(u));
    }
    py::bytes raw(reinterpret_cast<const char*>(le), n);
    return Derived::plain(py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(&PyLong_Type))
                              .attr("from_bytes")(raw, "little", py::arg("signed") = true));
  }
  Value decimal_integer(std::string_view text) {
    std::string s(text);
    PyObject* v = PyLong_FromString(s.c_str(), nullptr, 10);
    if (v == nullptr) python_value_error("bad integer literal");
    return Derived::plain(steal(v));
  }
  Value floating(double d) { return Derived::plain(steal(PyFloat_FromDouble(d))); }
  Value float_text(std::string_view text) {
    PyObject* decoded = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "strict");
    if (decoded == nullptr) python_value_error("bad float literal");
    py::object s = steal(decoded);
    PyObject* v = PyFloat_FromString(s.ptr());
    if (v == nullptr) python_value_error("bad float literal");
    return Derived::plain(steal(v));
  }
  Value unicode(std::string_view utf8) {
    // surrogatepass, as pickle and torch's unpickler decode BINUNICODE
    PyObject* v = PyUnicode_DecodeUTF8(utf8.data(), static_cast<Py_ssize_t>(utf8.size()), "surrogatepass");
    if (v == nullptr) python_value_error("string is not valid UTF-8");
    return Derived::plain(steal(v));
  }
  Value unicode_raw_escape(std::string_view s) {
    PyObject* v = PyUnicode_DecodeRawUnicodeEscape(s.data(), static_cast<Py_ssize_t>(s.size()), nullptr);
    if (v == nullptr) python_value_error("bad UNICODE literal");
    return Derived::plain(steal(v));
  }
  Value byte_string(std::string_view s) {
    py::bytes raw(s.data(), s.size());
    if (encoding_ == "bytes") return Derived::plain(raw);
    PyObject* v = PyUnicode_FromEncodedObject(raw.ptr(), encoding_.c_str(), "strict");
    if (v == nullptr) python_value_error("string cannot be decoded as " + encoding_);
    return Derived::plain(steal(v));
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
  Value bytes(std::string_view s) { return Derived::plain(py::bytes(s.data(), s.size())); }
  Value bytearray(std::string_view s) {
    return Derived::plain(steal(PyByteArray_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()))));
  }

  // ---- containers --------------------------------------------------------
  Value tuple(Value* items, size_t n) {
    uint32_t depth = 0;
    for (size_t i = 0; i < n; ++i) depth = std::max(depth, items[i].depth);
    PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(n));
    if (t == nullptr) throw py::error_already_set();
    for (size_t i = 0; i < n; ++i) PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), items[i].obj.release().ptr());
    return with_depth(steal(t), depth + 1);
  }
  Value list(Value* items, size_t n) {
    Value l = mutable_container(steal(PyList_New(0)), 1);
    list_extend(l, items, n);
    return l;
  }
  void list_extend(Value& list, Value* items, size_t n) {
    const bool exact = list.obj.ptr() != nullptr && PyList_CheckExact(list.obj.ptr());
    // torch's texts: APPEND "append to", APPENDS "extend" (one item is the former)
    if (!exact && !permissive_)
      unsafe(std::string(n == 1 ? "Can only append to lists" : "Can only extend lists") + ", but got " + type_repr(list));
    if (!exact) self().ready(list);  // its own append() runs
    for (size_t i = 0; i < n; ++i) {
      py::object item = self().materialize(items[i]);
      if (!exact) {
        self().ready(items[i]);
        call_method(self().materialize(list), name_append_, {item.ptr()});
      } else if (PyList_Append(list.obj.ptr(), item.ptr()) != 0) {
        throw py::error_already_set();
      }
      list.depth = std::max(list.depth, items[i].depth + 1);
    }
  }
  Value dict(Value* kv, size_t pairs) {
    Value d = mutable_container(steal(PyDict_New()), 1);
    dict_set(d, kv, pairs);
    return d;
  }
  void dict_set(Value& d, Value* kv, size_t pairs) {
    PyObject* target = d.obj.ptr();
    const bool exact_dict = target != nullptr && PyDict_CheckExact(target);
    if (!exact_dict && !permissive_ && !self().is_settable_mapping(target))
      unsafe(std::string("Can only ") + (pairs == 1 ? "SETITEM" : "SETITEMS") +
             " for dict, collections.OrderedDict, collections.Counter, but got " + type_repr(d));
    if (!exact_dict) self().ready(d);  // a mapping's own __setitem__ may run
    for (size_t i = 0; i < pairs; ++i) {
      PyObject* key = self().materialize(kv[2 * i]).ptr();
      PyObject* value = self().materialize(kv[2 * i + 1]).ptr();
      if (!exact_dict) {
        self().ready(kv[2 * i]);
        self().ready(kv[2 * i + 1]);
      }
      int rc = exact_dict ? PyDict_SetItem(target, key, value) : PyObject_SetItem(target, key, value);
      if (rc != 0) python_value_error("cannot set a dict item");
      d.depth = std::max(d.depth, std::max(kv[2 * i].depth, kv[2 * i + 1].depth) + 1);
    }
  }
  Value empty_set() { return mutable_container(steal(PySet_New(nullptr)), 1); }
  void set_add(Value& s, Value* items, size_t n) {
    const bool exact = s.obj.ptr() != nullptr && PySet_CheckExact(s.obj.ptr());
    if (!exact && !permissive_) unsafe("Can only add items to sets, but got " + type_repr(s));
    if (!exact) self().ready(s);
    for (size_t i = 0; i < n; ++i) {
      py::object item = self().materialize(items[i]);
      if (!exact) {
        self().ready(items[i]);
        call_method(self().materialize(s), name_add_, {item.ptr()});
      } else if (PySet_Add(s.obj.ptr(), item.ptr()) != 0) {
        python_value_error("cannot add a set item");
      }
      s.depth = std::max(s.depth, items[i].depth + 1);
    }
  }
  Value frozenset(Value* items, size_t n) {
    Value s = empty_set();
    set_add(s, items, n);
    return mutable_container(steal(PyFrozenSet_New(s.obj.ptr())), s.depth);
  }
  uint32_t depth(const Value& v) const { return v.depth; }

  // The nesting cap counted on the finished graph: depth is tracked as values
  // are built, but a list memoized, linked into its parent and only then
  // filled (through a memo GET) deepens its parent unseen. Iterative, shared
  // containers visited once; a reference back into a container being walked
  // (a cycle) adds nothing.
  static void check_linked_depth(py::handle root, uint32_t max_depth) {
    // Only lists, tuples and dict values can gain depth after they are built: keys and set items
    // are hashable, so immutable and already counted.
    struct Frame {
      PyObject* obj;
      Py_ssize_t pos;
      uint32_t height;
    };
    auto walked = [](PyObject* o) { return PyList_Check(o) || PyTuple_Check(o) || PyDict_Check(o); };
    auto next_child = [](Frame& f) -> PyObject* {  // nullptr when the container is done
      PyObject *key, *value;
      if (PyDict_Check(f.obj)) return PyDict_Next(f.obj, &f.pos, &key, &value) ? value : nullptr;
      if (PyList_Check(f.obj)) return f.pos < PyList_GET_SIZE(f.obj) ? PyList_GET_ITEM(f.obj, f.pos++) : nullptr;
      return f.pos < PyTuple_GET_SIZE(f.obj) ? PyTuple_GET_ITEM(f.obj, f.pos++) : nullptr;
    };
    auto too_deep = [max_depth] {
      fail(ErrorKind::Limit, "containers nested deeper than " + std::to_string(max_depth));
    };
    if (!walked(root.ptr())) return;
    std::unordered_map<PyObject*, uint32_t> heights{{root.ptr(), 0}};  // 0: being walked (a cycle adds nothing)
    std::vector<Frame> stack{{root.ptr(), 0, 1}};
    while (!stack.empty()) {
      PyObject* child = next_child(stack.back());
      if (child == nullptr) {
        const Frame done = stack.back();
        heights[done.obj] = done.height;
        stack.pop_back();
        if (!stack.empty()) stack.back().height = std::max(stack.back().height, done.height + 1);
        continue;
      }
      if (!walked(child)) continue;
      auto [it, fresh] = heights.emplace(child, 0);
      if (fresh) {
        stack.push_back({child, 0, 1});
        if (stack.size() > max_depth) too_deep();
      } else {
        if (stack.size() + it->second > max_depth) too_deep();  // a subtree walked before, reached deeper
        stack.back().height = std::max(stack.back().height, it->second + 1);
      }
    }
  }

 protected:
  static py::object steal(PyObject* p) {
    if (p == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(p);
  }
  static Value with_depth(py::object o, uint32_t depth) {
    Value v = Derived::plain(std::move(o));
    v.depth = depth;
    return v;
  }
  static Value mutable_container(py::object o, uint32_t depth) {
    Value v = with_depth(std::move(o), depth);
    Derived::made_mutable(v);
    return v;
  }
  // str(type(v)), as torch's messages print it: "<class 'list'>".
  std::string type_repr(Value& v) { return py::str(py::type::handle_of(self().materialize(v))).cast<std::string>(); }
  static bool is_exact_str(const Value& v) { return v.obj.ptr() != nullptr && PyUnicode_CheckExact(v.obj.ptr()); }

  // Turns the pending Python exception into an UnpicklingError that keeps its text.
  [[noreturn]] static void python_value_error(const std::string& what) {
    std::string detail;
    if (PyErr_Occurred()) {
      py::error_already_set e;
      detail = std::string(": ") + e.what();
    }
    fail(ErrorKind::Unpickling, "malformed pickle: " + what + detail);
  }

  static py::object materialize_str(std::string_view s) {
    PyObject* v = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "strict");
    if (v == nullptr) python_value_error("global name is not valid UTF-8");
    return steal(v);
  }

  static py::object call_method(py::handle self, const py::str& name, std::initializer_list<PyObject*> args = {}) {
    PyObject* argv[5] = {self.ptr()};
    size_t n = 1;
    for (PyObject* a : args) argv[n++] = a;
    return steal(PyObject_VectorcallMethod(name.ptr(), argv, n | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
  }

  // weights_only=False: any container may be appended to, set or added to.
  bool permissive_ = false;
  std::string encoding_ = "utf-8";  // of Python 2 strings; "bytes" keeps them bytes
  py::str name_append_{"append"}, name_add_{"add"};

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
};

}  // namespace fastckpt::bindings
