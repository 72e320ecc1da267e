// Native tests for core/pickle_vm.h and core/tensor_bounds.h, without Python.
//
// A recording builder turns what the machine built into a string (a repr in
// which every builder call is visible: int('7') came from an INT line, 7 from
// a binary opcode), so each test states the pickle bytes and the exact value
// or error kind expected. Pickles marked "pickle.dumps" were generated once
// with CPython and pasted; the others are written by hand, one opcode at a time.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "check.h"
#include "core/errors.h"
#include "core/pickle_vm.h"
#include "core/tensor_bounds.h"

namespace {

using namespace std::string_view_literals;
using fastckpt::Error;
using fastckpt::ErrorKind;
using fastckpt::PickleLimits;
using fastckpt::PickleMachine;


// ---- the recording builder -------------------------------------------------

struct Node {
  enum class Kind {
    None, Bool, Int, BigInt, IntText, Float, FloatText, Str, RawStr, ByteStr, StrLiteral, Bytes,
    ByteArray, Tuple, List, Dict, Set, FrozenSet, Global, Reduce, NewObj, NewObjEx, PersId,
  };
  Kind kind;
  int64_t number = 0;
  double real = 0;
  std::string text, text2;
  std::vector<Node*> items;     // contents, or the operands of a call
  std::vector<Node*> appended;  // APPEND(S) onto a call's result
  std::vector<Node*> set_items; // SETITEM(S) onto a call's result: k, v, k, v...
  std::vector<Node*> states;    // BUILD
  uint32_t depth = 0;
};
using Kind = Node::Kind;

class RecordingBuilder {
 public:
  using Value = Node*;

  Value none() { return make(Kind::None); }
  Value boolean(bool v) { return number(Kind::Bool, v); }
  Value integer(int64_t v) { return number(Kind::Int, v); }
  Value big_integer(const uint8_t* le, size_t n) {
    if (n <= 8) {  // two's complement, sign-extended
      uint64_t u = 0;
      for (size_t i = n; i-- > 0;) u = (u << 8) | le[i];
      if (n > 0 && n < 8 && (le[n - 1] & 0x80)) u |= ~uint64_t{0} << (8 * n);
      return integer(static_cast<int64_t>(u));
    }
    Value v = make(Kind::BigInt);
    for (size_t i = 0; i < n; ++i) v->text += hex_byte(le[i]);
    return v;
  }
  Value decimal_integer(std::string_view t) { return text(Kind::IntText, t); }
  Value floating(double d) {
    Value v = make(Kind::Float);
    v->real = d;
    return v;
  }
  Value float_text(std::string_view t) { return text(Kind::FloatText, t); }
  Value unicode(std::string_view t) { return text(Kind::Str, t); }
  Value unicode_raw_escape(std::string_view t) { return text(Kind::RawStr, t); }
  Value byte_string(std::string_view t) { return text(Kind::ByteStr, t); }
  Value string_literal(std::string_view t) { return text(Kind::StrLiteral, t); }
  Value bytes(std::string_view t) { return text(Kind::Bytes, t); }
  Value bytearray(std::string_view t) { return text(Kind::ByteArray, t); }

  Value tuple(Value* items, size_t n) { return container(Kind::Tuple, items, n); }
  Value list(Value* items, size_t n) { return container(Kind::List, items, n); }
  void list_extend(Value& target, Value* items, size_t n) {
    if (target->kind == Kind::List) return add(target, &target->items, items, n);
    if (is_call(target)) return add(target, &target->appended, items, n);
    fail(ErrorKind::Unpickling, "APPEND to a non-list");
  }
  Value dict(Value* kv, size_t pairs) { return container(Kind::Dict, kv, 2 * pairs); }
  void dict_set(Value& target, Value* kv, size_t pairs) {
    if (target->kind == Kind::Dict) return add(target, &target->items, kv, 2 * pairs);
    if (is_call(target)) return add(target, &target->set_items, kv, 2 * pairs);
    fail(ErrorKind::Unpickling, "SETITEM on a non-dict");
  }
  Value empty_set() { return container(Kind::Set, nullptr, 0); }
  void set_add(Value& target, Value* items, size_t n) {
    if (target->kind != Kind::Set) fail(ErrorKind::Unpickling, "ADDITEMS to a non-set");
    add(target, &target->items, items, n);
  }
  Value frozenset(Value* items, size_t n) { return container(Kind::FrozenSet, items, n); }

  Value global(std::string_view module, std::string_view name) {
    Value v = text(Kind::Global, module);
    v->text2 = name;
    return v;
  }
  Value stack_global(Value& module, Value& name) {
    if (module->kind != Kind::Str || name->kind != Kind::Str) fail(ErrorKind::Unpickling, "STACK_GLOBAL needs two str");
    return global(module->text, name->text);
  }
  Value reduce(Value& callable, Value& args) { return call(Kind::Reduce, {callable, args}); }
  Value newobj(Value& cls, Value& args) { return call(Kind::NewObj, {cls, args}); }
  Value newobj_ex(Value& cls, Value& args, Value& kwargs) { return call(Kind::NewObjEx, {cls, args, kwargs}); }
  void build(Value& obj, Value& state) { obj->states.push_back(state); }
  Value persistent_load(Value& pid) { return call(Kind::PersId, {pid}); }
  uint32_t depth(const Value& v) { return v->depth; }

  static std::string hex_byte(uint8_t b) {
    char buf[3];
    std::snprintf(buf, sizeof buf, "%02x", b);
    return buf;
  }

 private:
  Value make(Kind k) {
    Node& n = nodes_.emplace_back();  // a deque: nodes never move, and cycles free nothing twice
    n.kind = k;
    return &n;
  }
  Value number(Kind k, int64_t v) {
    Value n = make(k);
    n->number = v;
    return n;
  }
  Value text(Kind k, std::string_view t) {
    Value n = make(k);
    n->text = t;
    return n;
  }
  static bool is_call(const Node* n) {
    return n->kind == Kind::Reduce || n->kind == Kind::NewObj || n->kind == Kind::NewObjEx;
  }
  static void add(Node* target, std::vector<Node*>* into, Value* items, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      into->push_back(items[i]);
      target->depth = std::max(target->depth, items[i]->depth + 1);
    }
  }
  Value container(Kind k, Value* items, size_t n) {
    Value v = make(k);
    v->depth = 1;
    add(v, &v->items, items, n);
    return v;
  }
  Value call(Kind k, std::initializer_list<Value> operands) {
    Value v = make(k);
    for (Value o : operands) {
      v->items.push_back(o);
      v->depth = std::max(v->depth, o->depth);
    }
    return v;
  }

  std::deque<Node> nodes_;
};

// ---- rendering -----------------------------------------------------------------

std::string quote(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    const auto u = static_cast<uint8_t>(c);
    if (u < 0x20 || u >= 0x7f || c == '\'' || c == '\\') {
      out += "\\x" + RecordingBuilder::hex_byte(u);
    } else {
      out += c;
    }
  }
  return out + "'";
}

// Shortest text that reads back as the same double, as Python's repr.
std::string shortest(double d) {
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  return buf;
}

class Renderer {
 public:
  std::string render(const Node* n) {
    for (const Node* open : open_)
      if (open == n) return "...";  // a cycle, as Python's [...]
    open_.push_back(n);
    std::string out = body(n);
    if (!n->appended.empty()) out += seq("+[", n->appended, "]");
    if (!n->set_items.empty()) out += pairs("+{", n->set_items);
    for (const Node* s : n->states) out += ".build(" + render(s) + ")";
    open_.pop_back();
    return out;
  }

 private:
  std::string body(const Node* n) {
    switch (n->kind) {
      case Kind::None: return "None";
      case Kind::Bool: return n->number ? "True" : "False";
      case Kind::Int: return std::to_string(n->number);
      case Kind::BigInt: return "long(" + n->text + ")";
      case Kind::IntText: return "int(" + quote(n->text) + ")";
      case Kind::Float: return shortest(n->real);
      case Kind::FloatText: return "float(" + quote(n->text) + ")";
      case Kind::Str: return quote(n->text);
      case Kind::RawStr: return "raw" + quote(n->text);
      case Kind::ByteStr: return "str8" + quote(n->text);
      case Kind::StrLiteral: return "lit" + n->text;  // quoted in the pickle
      case Kind::Bytes: return "b" + quote(n->text);
      case Kind::ByteArray: return "bytearray(b" + quote(n->text) + ")";
      case Kind::Tuple: return seq("(", n->items, n->items.size() == 1 ? ",)" : ")");
      case Kind::List: return seq("[", n->items, "]");
      case Kind::Dict: return pairs("{", n->items);
      case Kind::Set: return seq("set(", n->items, ")");
      case Kind::FrozenSet: return seq("frozenset(", n->items, ")");
      case Kind::Global: return "<" + n->text + "." + n->text2 + ">";
      case Kind::Reduce: return render(n->items[0]) + render(n->items[1]);
      case Kind::NewObj: return "new " + render(n->items[0]) + render(n->items[1]);
      case Kind::NewObjEx: return "new " + render(n->items[0]) + render(n->items[1]) + "**" + render(n->items[2]);
      case Kind::PersId: return "pid(" + render(n->items[0]) + ")";
    }
    return "?";
  }
  std::string seq(const char* open, const std::vector<Node*>& items, const char* close) {
    std::string out = open;
    for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + render(items[i]);
    return out + close;
  }
  std::string pairs(const char* open, const std::vector<Node*>& kv) {
    std::string out = open;
    for (size_t i = 0; i + 1 < kv.size(); i += 2) out += (i ? ", " : "") + render(kv[i]) + ": " + render(kv[i + 1]);
    return out + "}";
  }

  std::vector<const Node*> open_;
};

// ---- running pickles -----------------------------------------------------------

struct Outcome {
  bool ok = false;
  std::string value;  // rendered result, or the error message
  ErrorKind kind = ErrorKind::Format;
  size_t position = 0;
};

Outcome unpickle(std::string_view pickle, const PickleLimits& limits = {}) {
  RecordingBuilder builder;
  PickleMachine<RecordingBuilder> machine(builder, limits);
  Outcome out;
  try {
    Node* result = machine.run(reinterpret_cast<const uint8_t*>(pickle.data()), pickle.size());
    out.ok = true;
    out.value = Renderer().render(result);
  } catch (const Error& e) {
    out.value = e.what();
    out.kind = e.kind();
    out.position = machine.position();
    // Messages become Python str: they must never carry raw input bytes.
    for (char c : out.value) {
      if (c < 0x20 || c > 0x7e) {
        std::fprintf(stderr, "non-ASCII byte in error message: %s\n", quote(out.value).c_str());
        ++native_test::failures;
        break;
      }
    }
  }
  return out;
}

const char* kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::Format: return "Format";
    case ErrorKind::Integrity: return "Integrity";
    case ErrorKind::Record: return "Record";
    case ErrorKind::Limit: return "Limit";
    case ErrorKind::Unpickling: return "Unpickling";
    case ErrorKind::UnsafeGlobal: return "UnsafeGlobal";
    case ErrorKind::Metadata: return "Metadata";
  }
  return "?";
}

void expect_value(int line, std::string_view pickle, std::string_view expected, const PickleLimits& limits = {}) {
  Outcome out = unpickle(pickle, limits);
  if (!out.ok) {
    std::fprintf(stderr, "line %d: expected %s, got %s error: %s\n", line, std::string(expected).c_str(),
                 kind_name(out.kind), out.value.c_str());
    ++native_test::failures;
  } else if (out.value != expected) {
    std::fprintf(stderr, "line %d: expected\n  %s\ngot\n  %s\n", line, std::string(expected).c_str(), out.value.c_str());
    ++native_test::failures;
  }
}

// `fragment` must appear in the message (empty: anything).
void expect_error(int line, std::string_view pickle, ErrorKind kind, std::string_view fragment = {},
                  const PickleLimits& limits = {}) {
  Outcome out = unpickle(pickle, limits);
  if (out.ok) {
    std::fprintf(stderr, "line %d: expected a %s error, got %s\n", line, kind_name(kind), out.value.c_str());
    ++native_test::failures;
  } else if (out.kind != kind || out.value.find(fragment) == std::string::npos) {
    std::fprintf(stderr, "line %d: expected a %s error mentioning '%s', got %s: %s\n", line, kind_name(kind),
                 std::string(fragment).c_str(), kind_name(out.kind), out.value.c_str());
    ++native_test::failures;
  }
}

#define VALUE(...) expect_value(__LINE__, __VA_ARGS__)
#define ERROR(...) expect_error(__LINE__, __VA_ARGS__)

constexpr ErrorKind kUnpickling = ErrorKind::Unpickling;
constexpr ErrorKind kLimit = ErrorKind::Limit;
constexpr ErrorKind kRefused = ErrorKind::UnsafeGlobal;

// ---- opcodes ---------------------------------------------------------------------

void test_protocol0_text_opcodes() {
  VALUE("I42\n."sv, "int('42')");
  VALUE("I-7\n."sv, "int('-7')");
  VALUE("I00\n."sv, "False");
  VALUE("I01\n."sv, "True");
  VALUE("L123L\n."sv, "int('123')");  // the trailing L of Python 2 longs is dropped
  VALUE("L5\n."sv, "int('5')");
  VALUE("F2.5\n."sv, "float('2.5')");
  VALUE("Vab\\u00e9\n."sv, "raw'ab\\x5cu00e9'");  // escapes are the builder's to decode
  VALUE("S'abc'\n."sv, "lit'abc'");
  VALUE("N."sv, "None");
  VALUE("(I1\nI2\nl."sv, "[int('1'), int('2')]");
  VALUE("(I1\nt."sv, "(int('1'),)");
  VALUE("(t."sv, "()");
  VALUE("(S'k'\nI1\nd."sv, "{lit'k': int('1')}");
  VALUE("(lp0\nI1\na0g0\n."sv, "[int('1')]");          // PUT, APPEND, POP, GET
  VALUE("(dp3\nS'a'\nI1\ns."sv, "{lit'a': int('1')}");  // SETITEM
  VALUE("ccollections\nOrderedDict\n(tR."sv, "<collections.OrderedDict>()");
  VALUE("I1\np0123\n0g123\n."sv, "int('1')");  // indices are decimal, leading zeros allowed
}

void test_protocol1_binary_opcodes() {
  VALUE("J\xff\xff\xff\xff."sv, "-1");  // BININT is signed
  VALUE("J\x00\x00\x00\x80."sv, "-2147483648");
  VALUE("J\xff\xff\xff\x7f."sv, "2147483647");
  VALUE("K\xff."sv, "255");  // BININT1 and BININT2 are unsigned
  VALUE("M\xff\xff."sv, "65535");
  VALUE("M\x01\x02."sv, "513");
  VALUE("G?\xe0\x00\x00\x00\x00\x00\x00."sv, "0.5");  // big-endian IEEE 754
  VALUE("G\xc0\x0c\x00\x00\x00\x00\x00\x00."sv, "-3.5");
  VALUE("U\x03" "abc."sv, "str8'abc'");
  VALUE("T\x03\x00\x00\x00" "abc."sv, "str8'abc'");
  VALUE("X\x03\x00\x00\x00" "abc."sv, "'abc'");
  VALUE("X\x00\x00\x00\x00."sv, "''");
  VALUE(")."sv, "()");
  VALUE("]."sv, "[]");
  VALUE("}."sv, "{}");
  VALUE("(K\x01K\x02t."sv, "(1, 2)");
  VALUE("]q\x00(K\x01K\x02" "e."sv, "[1, 2]");  // APPENDS
  VALUE("](e."sv, "[]");
  VALUE("}(K\x01K\x02K\x03K\x04u."sv, "{1: 2, 3: 4}");  // SETITEMS
  VALUE("}(u."sv, "{}");
  VALUE("K\x01" "2(t0\x86."sv, "(1, 1)");  // DUP; POP of the empty tuple
  VALUE("K\x01(K\x02K\x03" "1."sv, "1");  // POP_MARK drops everything above the mark
  VALUE("K\x01(0."sv, "1");               // POP of an empty MARK pops the mark, as CPython
  VALUE("X\x01\x00\x00\x00kQ."sv, "pid('k')");  // BINPERSID
  VALUE("ccollections\nOrderedDict\n)R}b."sv, "<collections.OrderedDict>().build({})");
  VALUE("ccollections\nOrderedDict\n)RK\x01K\x02s."sv, "<collections.OrderedDict>()+{1: 2}");
}

void test_protocol2_opcodes() {
  VALUE("\x80\x02N."sv, "None");
  VALUE("\x80\x02\x88."sv, "True");
  VALUE("\x80\x02\x89."sv, "False");
  VALUE("K\x01\x85."sv, "(1,)");
  VALUE("K\x01K\x02\x86."sv, "(1, 2)");
  VALUE("K\x01K\x02K\x03\x87."sv, "(1, 2, 3)");
  VALUE("\x8a\x00."sv, "0");
  VALUE("\x8a\x01\xff."sv, "-1");
  VALUE("\x8a\x02\xff\x00."sv, "255");
  VALUE("\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80."sv, "-9223372036854775808");
  VALUE("\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01."sv, "long(000000000000000001)");  // 2**64
  VALUE("\x8b\x01\x00\x00\x00\x05."sv, "5");
  VALUE("\x8b\x00\x00\x00\x00."sv, "0");
  VALUE("ccollections\nOrderedDict\n)\x81."sv, "new <collections.OrderedDict>()");
}

void test_protocol3_to_5_opcodes() {
  VALUE("\x80\x03" "B\x02\x00\x00\x00" "ab."sv, "b'ab'");
  VALUE("C\x02" "ab."sv, "b'ab'");
  VALUE("C\x00."sv, "b''");
  VALUE("\x80\x04\x8c\x03" "abc."sv, "'abc'");
  VALUE("\x8d\x02\x00\x00\x00\x00\x00\x00\x00" "ab."sv, "'ab'");
  VALUE("\x8e\x02\x00\x00\x00\x00\x00\x00\x00" "ab."sv, "b'ab'");
  VALUE("\x8f."sv, "set()");
  VALUE("\x8f(K\x01K\x02\x90."sv, "set(1, 2)");  // ADDITEMS
  VALUE("(K\x01\x91."sv, "frozenset(1)");
  VALUE("(\x91."sv, "frozenset()");
  VALUE("ccollections\nOrderedDict\n)}\x92."sv, "new <collections.OrderedDict>()**{}");
  VALUE("\x8c\x0b" "collections\x8c\x0bOrderedDict\x93."sv, "<collections.OrderedDict>");
  ERROR("K\x01\x8c\x01x\x93."sv, kUnpickling, "STACK_GLOBAL needs two str");  // the builder decides
  VALUE("\x80\x04\x95\x02\x00\x00\x00\x00\x00\x00\x00N."sv, "None");  // FRAME covering the rest
  VALUE("\x95\x00\x00\x00\x00\x00\x00\x00\x00N."sv, "None");
  VALUE("\x80\x05\x96\x02\x00\x00\x00\x00\x00\x00\x00" "ab."sv, "bytearray(b'ab')");
}

void test_python_pickles() {
  // pickle.dumps({"a": [1, -2, 3.5, None, True], "b": ("z", b"xy"), "c": {7}}, protocol=N)
  const std::string_view by_protocol[] = {
      "(dp0\nVa\np1\n(lp2\nI1\naI-2\naF3.5\naNaI01\nasVb\np3\n(Vz\np4\nc_codecs\nencode\np5\n(Vxy"
      "\np6\nVlatin1\np7\ntp8\nRp9\ntp10\nsVc\np11\nc__builtin__\nset\np12\n((lp13\nI7\natp14\nRp"
      "15\ns."sv,
      "}q\x00(X\x01\x00\x00\x00" "aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00"
      "NI01\neX\x01\x00\x00\x00" "bq\x03(X\x01\x00\x00\x00zq\x04" "c_codecs\nencode\nq\x05(X\x02\x00"
      "\x00\x00xyq\x06X\x06\x00\x00\x00latin1q\x07tq\x08Rq\x09tq\nX\x01\x00\x00\x00" "cq\x0b" "c_"
      "_builtin__\nset\nq\x0c(]q\x0dK\x07" "atq\x0eRq\x0fu."sv,
      "\x80\x02}q\x00(X\x01\x00\x00\x00" "aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00"
      "\x00\x00N\x88" "eX\x01\x00\x00\x00" "bq\x03X\x01\x00\x00\x00zq\x04" "c_codecs\nencode\nq\x05"
      "X\x02\x00\x00\x00xyq\x06X\x06\x00\x00\x00latin1q\x07\x86q\x08Rq\x09\x86q\nX\x01\x00\x00\x00"
      "cq\x0b" "c__builtin__\nset\nq\x0c]q\x0dK\x07" "a\x85q\x0eRq\x0fu."sv,
      "\x80\x03}q\x00(X\x01\x00\x00\x00" "aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00"
      "\x00\x00N\x88" "eX\x01\x00\x00\x00" "bq\x03X\x01\x00\x00\x00zq\x04" "C\x02xyq\x05\x86q\x06"
      "X\x01\x00\x00\x00" "cq\x07" "cbuiltins\nset\nq\x08]q\x09K\x07" "a\x85q\nRq\x0bu."sv,
      "\x80\x04\x95" "8\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01" "a\x94]\x94(K\x01J\xfe\xff\xff"
      "\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88" "e\x8c\x01" "b\x94\x8c\x01z\x94" "C\x02xy\x94\x86"
      "\x94\x8c\x01" "c\x94\x8f\x94(K\x07\x90u."sv,
      "\x80\x05\x95" "8\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01" "a\x94]\x94(K\x01J\xfe\xff\xff"
      "\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88" "e\x8c\x01" "b\x94\x8c\x01z\x94" "C\x02xy\x94\x86"
      "\x94\x8c\x01" "c\x94\x8f\x94(K\x07\x90u."sv,
  };
  VALUE(by_protocol[0],
        "{raw'a': [int('1'), int('-2'), float('3.5'), None, True], "
        "raw'b': (raw'z', <_codecs.encode>(raw'xy', raw'latin1')), raw'c': <__builtin__.set>([int('7')],)}");
  const char* p1_p2 =
      "{'a': [1, -2, 3.5, None, True], 'b': ('z', <_codecs.encode>('xy', 'latin1')), 'c': <__builtin__.set>([7],)}";
  VALUE(by_protocol[1], p1_p2);
  VALUE(by_protocol[2], p1_p2);
  VALUE(by_protocol[3], "{'a': [1, -2, 3.5, None, True], 'b': ('z', b'xy'), 'c': <builtins.set>([7],)}");
  VALUE(by_protocol[4], "{'a': [1, -2, 3.5, None, True], 'b': ('z', b'xy'), 'c': set(7)}");
  VALUE(by_protocol[5], "{'a': [1, -2, 3.5, None, True], 'b': ('z', b'xy'), 'c': set(7)}");
}

// data.pkl of torch.save(OrderedDict(w=torch.arange(4, dtype=torch.int32).view(2, 2)), f)
constexpr std::string_view kTorchPickle =
    "\x80\x02" "ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02" "ctorch._utils\n"
    "_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04" "ctorch\nIntStorage\nq\x05X\x01\x00"
    "\x00\x00" "0q\x06X\x03\x00\x00\x00" "cpuq\x07K\x04tq\x08QK\x00K\x02K\x02\x86q\x09K\x02K\x01"
    "\x86q\n\x89h\x00)Rq\x0btq\x0cRq\x0ds."sv;

void test_torch_pickle() {
  VALUE(kTorchPickle,
        "<collections.OrderedDict>()+{'w': <torch._utils._rebuild_tensor_v2>(pid(('storage', <torch.IntStorage>, "
        "'0', 'cpu', 4)), 0, (2, 2), (2, 1), False, <collections.OrderedDict>())}");
}

void test_memo() {
  // A GET returns the stored object itself: appending through one reference
  // shows through the other.
  VALUE("]q\x01h\x01K\x07" "a\x86."sv, "([7], [7])");
  VALUE("]r\x00\x00\x01\x00j\x00\x00\x01\x00K\x07" "a\x86."sv, "([7], [7])");  // LONG_BINPUT/GET, index 65536
  VALUE("]r\xff\xff\xff\xffj\xff\xff\xff\xff\x86."sv, "([], [])");              // the largest index
  VALUE("]\x94h\x00\x86."sv, "([], [])");                                       // MEMOIZE
  VALUE("K\x01q\x00K\x02q\x00" "0h\x00\x86."sv, "(1, 2)");  // a PUT replaces an entry
  // Sparse indices, then MEMOIZE: it numbers from the entry count, as CPython's len(memo).
  VALUE("K\x01q\x05" "0K\x02\x94" "0h\x01h\x05\x86."sv, "(2, 1)");
  VALUE("K\x01q\x00K\x02q\x01K\x03\x94" "0" "0" "0h\x02h\x01h\x00\x87."sv, "(3, 2, 1)");
  VALUE("K\x01q\x03K\x02q\x02K\x03q\x01K\x04q\x00\x94" "0" "0" "0" "0h\x04h\x03h\x00\x87."sv, "(4, 1, 4)");
  // A list holding itself: a cycle through the memo.
  VALUE("]q\x00h\x00" "a."sv, "[...]");
  ERROR("h\x00."sv, kUnpickling, "memo entry 0 was never stored");
  ERROR("K\x01q\x00h\x01."sv, kUnpickling, "memo entry 1 was never stored");
  ERROR("K\x01q\x05h\x04."sv, kUnpickling, "never stored");
  ERROR("j\xff\xff\xff\xff."sv, kUnpickling, "never stored");
  ERROR("g0\n."sv, kUnpickling, "never stored");
  ERROR("I1\npx\n."sv, kUnpickling, "bad memo index");
  ERROR("I1\np\n."sv, kUnpickling, "bad memo index");
  ERROR("I1\np-1\n."sv, kUnpickling, "bad memo index");
  ERROR("I1\np1 \n."sv, kUnpickling, "bad memo index");
  ERROR("g12345678901\n."sv, kUnpickling, "bad memo index");
  ERROR("q\x00."sv, kUnpickling, "stack underflow");  // nothing to store
  ERROR("K\x01(q\x00."sv, kUnpickling, "stack underflow");  // not through a MARK
  ERROR("\x94."sv, kUnpickling, "stack underflow");
}

void test_marks() {
  VALUE("(((K\x01ttt."sv, "(((1,),),)");
  VALUE("K\x01(K\x02(K\x03" "1" "1."sv, "1");
  ERROR("1."sv, kUnpickling, "no MARK");
  ERROR("K\x01" "1."sv, kUnpickling, "no MARK");
  for (std::string_view op : {"t"sv, "l"sv, "d"sv, "e"sv, "u"sv, "\x90"sv, "\x91"sv}) {
    std::string p = "]" + std::string(op) + ".";
    ERROR(p, kUnpickling, "no MARK");
  }
  ERROR("(e."sv, kUnpickling, "APPENDS without a list");
  ERROR("(K\x01u."sv, kUnpickling, "SETITEMS without a dict");
  // The container must lie above the enclosing MARK, not below it.
  ERROR("]((e1."sv, kUnpickling, "APPENDS without a list");
  ERROR("}((u1."sv, kUnpickling, "SETITEMS without a dict");
  ERROR("\x8f((\x90" "1."sv, kUnpickling, "ADDITEMS without a set");
  // A sparse memo entry overtaken by the dense run must not be counted twice by MEMOIZE.
  VALUE("K\x0aq\x01" "0K\x0bq\x03" "0K\x0cq\x00" "0K\x0dq\x01" "0K\x0e\x94" "0h\x03."sv, "14");
  ERROR("(\x90."sv, kUnpickling, "ADDITEMS without a set");
  ERROR("}(K\x01u."sv, kUnpickling, "odd number");
  ERROR("}(K\x01K\x02K\x03u."sv, kUnpickling, "odd number");
  ERROR("(K\x01" "d."sv, kUnpickling, "odd number");
  ERROR("(N."sv, kUnpickling, "open MARK");
  ERROR("N(."sv, kUnpickling, "open MARK");
}

void test_stack_underflow() {
  ERROR("."sv, kUnpickling, "STOP with 0 values");
  ERROR("NN."sv, kUnpickling, "STOP with 2 values");
  // Each opcode with one operand too few; the MARK before hides what is below it.
  for (std::string_view p : {"0."sv, "2."sv, "Q."sv, "\x85."sv, "N\x86."sv, "NN\x87."sv, "Na."sv, "NNs."sv,
                             "NR."sv, "Nb."sv, "N\x81."sv, "NN\x92."sv, "\x8c\x01x\x93."sv, "N(N\x86."sv,
                             "N(2."sv, "](N" "a."sv, "}(NNs."sv, "N(\x93."sv}) {
    ERROR(p, kUnpickling, "stack underflow");
  }
}

void test_refused_opcodes() {
  // Refused on sight, before any operand is read or anything reaches the builder.
  ERROR("i"sv, kRefused, "0x69");
  ERROR("(iposix\nsystem\n."sv, kRefused, "not allowed");
  ERROR("(cposix\nsystem\nX\x02\x00\x00\x00lso."sv, kRefused, "0x6f");
  ERROR("\x82\x01."sv, kRefused, "0x82");
  ERROR("\x83\x01\x00."sv, kRefused, "0x83");
  ERROR("\x84\x01\x00\x00\x00."sv, kRefused, "0x84");
  ERROR("P0\n."sv, kRefused, "0x50");
  ERROR("\x97."sv, kRefused, "0x97");
  ERROR("\x98."sv, kRefused, "0x98");
  ERROR("\x80\x05" "C\x01x\x98."sv, kRefused, "at byte 5");
}

void test_malformed() {
  ERROR(""sv, kUnpickling, "without STOP");
  ERROR("N"sv, kUnpickling, "without STOP");
  ERROR("\x80\x02"sv, kUnpickling, "without STOP");
  ERROR("N.N"sv, kUnpickling, "1 bytes after STOP");
  ERROR("N.."sv, kUnpickling, "after STOP");
  ERROR("N.\x00"sv, kUnpickling, "after STOP");
  ERROR("\x80\x06N."sv, kUnpickling, "protocol 6");
  ERROR("\xff."sv, kUnpickling, "unknown opcode 0xff");
  ERROR("\x00."sv, kUnpickling, "unknown opcode 0x00");
  ERROR("\x80"sv, kUnpickling, "truncated");
  ERROR("I1"sv, kUnpickling, "truncated text line");
  ERROR("ccollections\nOrderedDict"sv, kUnpickling, "truncated text line");
  // Lengths larger than what is left, up to the largest each field can hold:
  // refused before anything is sized by them.
  ERROR("X\x05\x00\x00\x00" "abc."sv, kUnpickling, "truncated");
  ERROR("X\xff\xff\xff\xff" "abc."sv, kUnpickling, "truncated");
  ERROR("\x8c\x05" "abc."sv, kUnpickling, "truncated");
  ERROR("\x8d\xff\xff\xff\xff\xff\xff\xff\xff" "abc."sv, kUnpickling, "truncated");
  ERROR("\x8e\x00\x00\x00\x00\x00\x00\x00\x80" "abc."sv, kUnpickling, "truncated");
  ERROR("\x96\xff\xff\xff\xff\xff\xff\xff\xff."sv, kUnpickling, "truncated");
  ERROR("B\xff\xff\xff\xff."sv, kUnpickling, "truncated");
  ERROR("C\x02" "a"sv, kUnpickling, "truncated");
  ERROR("U\x02" "a"sv, kUnpickling, "truncated");
  ERROR("T\xff\xff\xff\xff" "abc."sv, kUnpickling, "negative length");
  ERROR("T\x00\x00\x00\x7f" "abc."sv, kUnpickling, "truncated");
  ERROR("\x8a\x05\x01."sv, kUnpickling, "truncated");
  ERROR("\x8b\xff\xff\xff\xff."sv, kUnpickling, "negative length");
  ERROR("\x8b\xff\xff\xff\x7f."sv, kUnpickling, "truncated");
  ERROR("\x95\x03\x00\x00\x00\x00\x00\x00\x00N."sv, kUnpickling, "FRAME runs past");
  ERROR("\x95\xff\xff\xff\xff\xff\xff\xff\xffN."sv, kUnpickling, "FRAME runs past");
  ERROR("J\x01\x02\x03"sv, kUnpickling, "truncated");
  ERROR("G\x01\x02\x03\x04\x05\x06\x07"sv, kUnpickling, "truncated");
  ERROR("j\x01\x00\x00"sv, kUnpickling, "truncated");
  ERROR("K\x01r\x01\x00\x00"sv, kUnpickling, "truncated");
  // The builder's own refusals surface unchanged.
  ERROR("K\x01K\x02" "a."sv, kUnpickling, "APPEND to a non-list");
}

void test_error_position() {
  const auto at = [](std::string_view p) { return unpickle(p).position; };
  CHECK(at("NN."sv) == 2);
  CHECK(at("\x80\x02K\x01h\x07."sv) == 4);
  CHECK(at("X\x01\x00\x00\x00" "a\x82\x01."sv) == 6);
  CHECK(unpickle("K\x01h\x07."sv).value.find("(opcode at byte 2)") != std::string::npos);
}

// Every proper prefix of a valid pickle is refused as malformed, whatever
// opcode or operand the cut falls in.
void test_truncations() {
  const std::string_view frame_pickle =
      "\x80\x04\x95" "8\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01" "a\x94]\x94(K\x01J\xfe\xff\xff"
      "\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88" "e\x8c\x01" "b\x94\x8c\x01z\x94" "C\x02xy\x94\x86"
      "\x94\x8c\x01" "c\x94\x8f\x94(K\x07\x90u."sv;
  const std::string_view text_pickle = "(dp0\nVa\np1\n(lp2\nI1\naF3.5\naNaI01\nasS'b'\np3\nL7L\ns."sv;
  for (std::string_view whole : {kTorchPickle, frame_pickle, text_pickle}) {
    CHECK(unpickle(whole).ok);
    for (size_t n = 0; n < whole.size(); ++n) {
      Outcome out = unpickle(whole.substr(0, n));
      if (out.ok || out.kind != kUnpickling) {
        std::fprintf(stderr, "prefix of %zu of %zu bytes: %s\n", n, whole.size(), out.value.c_str());
        ++native_test::failures;
      }
    }
  }
}

void test_limits() {
  PickleLimits small;
  small.max_stack = 4;
  small.max_marks = 3;
  small.max_memo = 3;
  small.max_depth = 3;
  small.max_line = 8;

  VALUE("N(((1" "1" "1."sv, "None", small);
  ERROR("((((N."sv, kLimit, "too many open MARKs", small);
  VALUE("NNNN\x87\x86."sv, "(None, (None, None, None))", small);
  ERROR("NNNNN"sv, kLimit, "more than 4 values on the stack", small);
  ERROR("NN2222"sv, kLimit, "on the stack", small);          // DUP
  ERROR("Nq\x00h\x00h\x00h\x00h\x00"sv, kLimit, "on the stack", small);  // GET

  VALUE("Nq\x00q\x01q\x02q\x00q\x01q\x02."sv, "None", small);  // rewrites are free
  ERROR("Nq\x00q\x01q\x02q\x03."sv, kLimit, "more than 3 memo entries", small);
  ERROR("Nq\x07q\x08q\x09q\x0a."sv, kLimit, "memo entries", small);
  ERROR("N\x94\x94\x94\x94."sv, kLimit, "memo entries", small);
  ERROR("Nr\x00\x00\x00\x01r\x00\x00\x00\x02q\x00q\x01."sv, kLimit, "memo entries", small);

  VALUE(")\x85\x85."sv, "(((),),)", small);  // depth 3: at the cap
  ERROR(")\x85\x85\x85."sv, kLimit, "nested deeper than 3", small);
  VALUE("]]]" "a" "a."sv, "[[[]]]", small);
  ERROR("]]]]" "aaa."sv, kLimit, "nested", small);                // APPEND
  ERROR("](](](]eee."sv, kLimit, "nested", small);                // APPENDS
  ERROR("}K\x01)\x85\x85s."sv, kLimit, "nested", small);           // SETITEM
  ERROR("]))\x86\x85" "a."sv, kLimit, "nested", small);      // APPEND of a deep tuple
  ERROR("]q\x00h\x00" "ah\x00" "ah\x00" "a."sv, kLimit, "nested", small);  // a cycle deepens each time
  ERROR("\x8f()\x85\x85\x90"sv, kLimit, "nested", small);       // ADDITEMS
  ERROR("()\x85\x85\x91"sv, kLimit, "nested", small);          // FROZENSET
  ERROR("()\x85\x85l"sv, kLimit, "nested", small);             // LIST
  ERROR("(K\x01)\x85\x85" "d"sv, kLimit, "nested", small);     // DICT

  VALUE("I1234567\n."sv, "int('1234567')", small);  // 7 characters and the newline fit in 8
  ERROR("I12345678\n."sv, kLimit, "text line longer than 8", small);
  ERROR("I123456789012"sv, kLimit, "text line", small);
  ERROR("cab\nabcdefghijk\n."sv, kLimit, "text line", small);
  ERROR("I1234"sv, kUnpickling, "truncated", small);

  // The default caps, where reaching them is cheap.
  ERROR(std::string(65537, '('), kLimit, "too many open MARKs");
  std::string lists(1000, ']');
  VALUE(lists + std::string(999, 'a') + ".", std::string(1000, '[') + std::string(1000, ']'));
  lists += ']';
  ERROR(lists + std::string(1000, 'a') + ".", kLimit, "nested deeper than 1000");
  ERROR(")" + std::string(1000, '\x85') + ".", kLimit, "nested deeper than 1000");
  ERROR("I" + std::string(70000, '1') + "\n.", kLimit, "text line longer than 65536");
}

// ---- tensor_bounds.h -------------------------------------------------------------

using Dims = std::vector<int64_t>;
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

bool in_storage(int64_t offset, const Dims& size, const Dims& stride, uint32_t element_bits, uint64_t nbytes,
                std::string* why = nullptr) {
  try {
    fastckpt::check_tensor_in_storage(offset, size, stride, element_bits, nbytes);
    return true;
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::Metadata) {
      std::fprintf(stderr, "check_tensor_in_storage threw kind %s\n", kind_name(e.kind()));
      ++native_test::failures;
    }
    if (why) *why = e.what();
    return false;
  }
}

void test_tensor_bounds() {
  // Contiguous 2x3 float32 in exactly 24 bytes; one byte less is refused.
  CHECK(in_storage(0, {2, 3}, {3, 1}, 32, 24));
  CHECK(!in_storage(0, {2, 3}, {3, 1}, 32, 23));
  CHECK(in_storage(0, {2, 3}, {3, 1}, 32, 1000));
  // A view: last element at 5 + 1*10 + 2*1 = 17, so 18 elements of 2 bytes.
  CHECK(in_storage(5, {2, 3}, {10, 1}, 16, 36));
  CHECK(!in_storage(5, {2, 3}, {10, 1}, 16, 35));
  CHECK(in_storage(5, {1}, {1}, 32, 24));  // the last element of a 6-element storage
  CHECK(!in_storage(6, {1}, {1}, 32, 24));
  // 0-dim: one element at the offset.
  CHECK(in_storage(2, {}, {}, 32, 12));
  CHECK(!in_storage(3, {}, {}, 32, 12));
  CHECK(!in_storage(0, {}, {}, 32, 0));
  // Packed 4- and 2-bit elements: bytes are rounded up.
  CHECK(in_storage(0, {3}, {1}, 4, 2));
  CHECK(!in_storage(0, {3}, {1}, 4, 1));
  CHECK(in_storage(1, {3}, {1}, 4, 2));
  CHECK(!in_storage(2, {3}, {1}, 4, 2));
  CHECK(in_storage(0, {8}, {1}, 2, 2));
  CHECK(!in_storage(0, {9}, {1}, 2, 2));
  // Stride 0 (expand): every element is the first one.
  CHECK(in_storage(0, {1000}, {0}, 32, 4));
  CHECK(in_storage(3, {7, 1000000}, {0, 0}, 32, 16));
  CHECK(!in_storage(0, {5}, {0}, 32, 3));
  CHECK(!in_storage(0, {kMax, kMax}, {0, 0}, 8, 1));  // numel does not fit 64 bits
  // Empty tensors address no bytes, wherever they claim to start.
  CHECK(in_storage(0, {0}, {1}, 32, 0));
  CHECK(in_storage(1000, {3, 0}, {1, 1}, 32, 0));
  CHECK(in_storage(kMax, {0, 5}, {1, 1}, 64, 0));
  CHECK(in_storage(0, {2, 0}, {kMax, 1}, 64, 0));
  // Size-1 dimensions do not use their stride.
  CHECK(in_storage(0, {1, 4}, {kMax, 1}, 32, 16));

  std::string why;
  CHECK(!in_storage(-1, {1}, {1}, 32, 1024, &why) && why.find("negative storage offset") != std::string::npos);
  CHECK(!in_storage(0, {-1}, {1}, 32, 1024, &why) && why.find("negative size or stride") != std::string::npos);
  CHECK(!in_storage(0, {2, 2}, {2, -1}, 32, 1024, &why) && why.find("dimension 1") != std::string::npos);
  CHECK(!in_storage(0, {0}, {-1}, 32, 1024));  // even for an empty tensor
  CHECK(!in_storage(std::numeric_limits<int64_t>::min(), {1}, {1}, 8, 1024));
  CHECK(!in_storage(0, {2, 3}, {3}, 32, 1024, &why) && why.find("2 sizes but 1 strides") != std::string::npos);
  CHECK(!in_storage(0, {}, {1}, 32, 1024));
  CHECK(in_storage(0, Dims(64, 1), Dims(64, 1), 32, 4));
  CHECK(!in_storage(0, Dims(65, 1), Dims(65, 1), 32, 4, &why) && why.find("too many dimensions") != std::string::npos);
  // Overflow at every step of ((offset + sum((size-1)*stride) + 1) * bits + 7) / 8.
  CHECK(!in_storage(0, {kMax}, {kMax}, 8, UINT64_MAX, &why) && why.find("overflow") != std::string::npos);
  CHECK(!in_storage(0, {3, 3}, {kMax, kMax}, 8, UINT64_MAX));  // each term fits, their sum does not
  CHECK(!in_storage(0, {1LL << 32, 1LL << 32}, {1, 1}, 8, UINT64_MAX));  // numel = 2**64
  CHECK(!in_storage(kMax, {1}, {1}, 8, UINT64_MAX));       // 2**63 elements of 8 bits
  CHECK(!in_storage(1LL << 62, {1}, {1}, 64, UINT64_MAX));
  CHECK(!in_storage(kMax, {2}, {kMax}, 1, UINT64_MAX));    // 2**64 - 1 bits, then + 7
  CHECK(!in_storage((1LL << 58) - 1, {1}, {1}, 64, UINT64_MAX));  // 2**64 bits
  CHECK(in_storage((1LL << 58) - 2, {1}, {1}, 64, (1ULL << 61) - 8));  // the last that fits
  CHECK(!in_storage((1LL << 58) - 2, {1}, {1}, 64, (1ULL << 61) - 9));

  CHECK(fastckpt::tensor_numel({}) == 1);
  CHECK(fastckpt::tensor_numel({2, 3, 4}) == 24);
  CHECK(fastckpt::tensor_numel({2, 0}) == 0);
  CHECK(fastckpt::is_contiguous({2, 3}, {3, 1}));
  CHECK(fastckpt::is_contiguous({2, 1, 3}, {3, 99, 1}));  // size-1 strides are free
  CHECK(!fastckpt::is_contiguous({2, 3}, {1, 2}));
  CHECK(!fastckpt::is_contiguous({5}, {0}));
}

}  // namespace

int main() {
  test_protocol0_text_opcodes();
  test_protocol1_binary_opcodes();
  test_protocol2_opcodes();
  test_protocol3_to_5_opcodes();
  test_python_pickles();
  test_torch_pickle();
  test_memo();
  test_marks();
  test_stack_underflow();
  test_refused_opcodes();
  test_malformed();
  test_error_position();
  test_truncations();
  test_limits();
  test_tensor_bounds();
  if (native_test::failures != 0) {
    std::fprintf(stderr, "pickle_vm_test: %d failure(s)\n", native_test::failures);
    return 1;
  }
  std::printf("pickle_vm_test: all passed\n");
  return 0;
}
