// A pickled persistent id converted for the core's storage rule
// (core/storage_rule.h), for both builders and the Python fallback. The
// conversion only says what each item is; the rule judges. Requires the GIL.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "core/storage_rule.h"

namespace fastckpt::bindings {

inline void convert_pid_item(py::handle v, PidItem& out) {
  PyObject* o = v.ptr();
  if (PyUnicode_Check(o)) {
    Py_ssize_t n = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(o, &n);
    if (utf8 != nullptr) {
      out.kind = PidItem::Kind::Text;
      out.text.assign(utf8, static_cast<size_t>(n));
      return;
    }
    PyErr_Clear();  // lone surrogates
    out.kind = PidItem::Kind::Other;
    out.text = "a string that is not valid UTF-8";
  } else if (PyBytes_Check(o)) {
    out.kind = PidItem::Kind::Bytes;
    out.text.assign(PyBytes_AS_STRING(o), static_cast<size_t>(PyBytes_GET_SIZE(o)));
  } else if (PyLong_Check(o)) {  // bool included, as in torch's arithmetic
    int overflow = 0;
    out.integer = PyLong_AsLongLongAndOverflow(o, &overflow);
    out.kind = overflow == 0 ? PidItem::Kind::Integer : PidItem::Kind::Other;
    if (overflow != 0) out.text = "an int that does not fit in 64 bits";
  } else {
    out.kind = PidItem::Kind::Other;
    out.text = std::string("an object of type ") + Py_TYPE(o)->tp_name;
  }
}

// `pid` judged by the core's rule. `scratch` is reused across calls (its
// strings keep their capacity).
inline StorageId read_storage_reference(py::handle pid, PersistentId& scratch) {
  scratch.tuple = PyTuple_Check(pid.ptr());
  if (!scratch.tuple) {
    scratch.what = std::string("an object of type ") + Py_TYPE(pid.ptr())->tp_name;
  } else {
    scratch.count = static_cast<size_t>(PyTuple_GET_SIZE(pid.ptr()));
    if (scratch.count == PersistentId::kItems)
      for (size_t i = 0; i < PersistentId::kItems; ++i)
        if (i != 1) convert_pid_item(PyTuple_GET_ITEM(pid.ptr(), static_cast<Py_ssize_t>(i)), scratch.items[i]);
  }
  return judge_persistent_id(scratch);
}

}  // namespace fastckpt::bindings
