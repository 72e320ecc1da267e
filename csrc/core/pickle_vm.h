// A restricted pickle machine for the data pickles in checkpoints.
//
// It decodes every data opcode of protocols 0-5 and leaves every decision
// about objects to a Builder, so the same machine runs under Python (the
// bindings' builder makes Python objects) and without it (tests, fuzzing).
// Opcodes that name code or out-of-band data (INST, OBJ, EXT1/2/4, PERSID,
// NEXT_BUFFER, READONLY_BUFFER) are refused here, before the builder sees them.
//
// Builder interface (Value must be cheap to copy):
//   Value none(); Value boolean(bool); Value integer(int64_t);
//   Value big_integer(const uint8_t* little_endian, size_t n);  // two's complement
//   Value decimal_integer(std::string_view text);               // INT/LONG lines
//   Value floating(double); Value float_text(std::string_view);
//   Value unicode(std::string_view utf8);                       // BINUNICODE & co
//   Value unicode_raw_escape(std::string_view);                 // UNICODE line
//   Value byte_string(std::string_view);                        // Python 2 str
//   Value string_literal(std::string_view quoted);              // STRING line
//   Value bytes(std::string_view); Value bytearray(std::string_view);
//   Value tuple(Value* items, size_t n);
//   Value list(Value* items, size_t n); void list_extend(Value& list, Value* items, size_t n);
//   Value dict(Value* kv, size_t n_pairs); void dict_set(Value& d, Value* kv, size_t n_pairs);
//   Value empty_set(); void set_add(Value& s, Value* items, size_t n);
//   Value frozenset(Value* items, size_t n);
//   Value global(std::string_view module, std::string_view name);
//   Value stack_global(Value& module, Value& name);
//   Value reduce(Value& callable, Value& args);
//   Value newobj(Value& cls, Value& args);
//   Value newobj_ex(Value& cls, Value& args, Value& kwargs);
//   void build(Value& obj, Value& state);        // obj stays on the stack
//   Value persistent_load(Value& pid);
//   uint32_t depth(const Value&);                 // nesting depth, for the cap
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/errors.h"

namespace fastckpt {

struct PickleLimits {
  uint64_t max_stack = 1u << 22;   // values on the stack at once
  uint64_t max_marks = 1u << 16;   // open MARKs at once
  uint64_t max_memo = 1u << 24;    // memo entries
  uint32_t max_depth = 1000;       // container nesting (as built)
  size_t max_line = 1u << 16;      // text opcodes (GLOBAL names, INT ...)
};

// Protocol-0..5 opcodes, named as in CPython's pickle module.
namespace op {
enum : uint8_t {
  MARK = '(', STOP = '.', POP = '0', POP_MARK = '1', DUP = '2', FLOAT = 'F', INT = 'I',
  BININT = 'J', BININT1 = 'K', LONG = 'L', BININT2 = 'M', NONE = 'N', PERSID = 'P',
  BINPERSID = 'Q', REDUCE = 'R', STRING = 'S', BINSTRING = 'T', SHORT_BINSTRING = 'U',
  UNICODE = 'V', BINUNICODE = 'X', APPEND = 'a', BUILD = 'b', GLOBAL = 'c', DICT = 'd',
  EMPTY_DICT = '}', APPENDS = 'e', GET = 'g', BINGET = 'h', INST = 'i', LONG_BINGET = 'j',
  LIST = 'l', EMPTY_LIST = ']', OBJ = 'o', PUT = 'p', BINPUT = 'q', LONG_BINPUT = 'r',
  SETITEM = 's', TUPLE = 't', EMPTY_TUPLE = ')', SETITEMS = 'u', BINFLOAT = 'G',
  PROTO = 0x80, NEWOBJ = 0x81, EXT1 = 0x82, EXT2 = 0x83, EXT4 = 0x84, TUPLE1 = 0x85,
  TUPLE2 = 0x86, TUPLE3 = 0x87, NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, LONG4 = 0x8b,
  BINBYTES = 'B', SHORT_BINBYTES = 'C', SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d,
  BINBYTES8 = 0x8e, EMPTY_SET = 0x8f, ADDITEMS = 0x90, FROZENSET = 0x91, NEWOBJ_EX = 0x92,
  STACK_GLOBAL = 0x93, MEMOIZE = 0x94, FRAME = 0x95, BYTEARRAY8 = 0x96, NEXT_BUFFER = 0x97,
  READONLY_BUFFER = 0x98,
};
}  // namespace op

template <class Builder>
class PickleMachine {
 public:
  using Value = typename Builder::Value;

  PickleMachine(Builder& builder, const PickleLimits& limits = {})
      : b_(builder), limits_(limits) {}

  // Runs the pickle in [data, data+size) to its STOP and returns the result.
  // Bytes after STOP are refused (torch ignores them; two readers could
  // disagree about what the file holds).
  Value run(const uint8_t* data, size_t size) {
    p_ = data;
    begin_ = data;
    end_ = data + size;
    opcode_at_ = data;
    stack_.clear();
    marks_.clear();
    dense_.clear();
    sparse_.clear();
    // torch.save memoizes about one value per 10 pickle bytes; reserving up
    // front avoids re-copying a large memo as it grows.
    dense_.reserve(static_cast<size_t>(std::min<uint64_t>(size / 16, limits_.max_memo)));
    while (true) {
      if (p_ >= end_) error("pickle ends without STOP");
      opcode_at_ = p_;
      const uint8_t code = *p_++;
      switch (code) {
        case op::PROTO: {
          uint8_t proto = read_u8();
          if (proto > 5) error("unsupported pickle protocol " + std::to_string(proto));
          break;
        }
        case op::FRAME: {
          uint64_t n = read_uint(8);
          if (n > static_cast<uint64_t>(end_ - p_)) error("FRAME runs past the end of the pickle");
          break;  // framing is a read-ahead hint; the data is parsed as it comes
        }
        case op::STOP: {
          if (!marks_.empty()) error("STOP with an open MARK");
          if (stack_.size() != 1) error("STOP with " + std::to_string(stack_.size()) + " values on the stack");
          if (p_ != end_) error(std::to_string(end_ - p_) + " bytes after STOP");
          Value result = std::move(stack_.back());
          stack_.clear();
          return result;
        }
        case op::MARK:
          if (marks_.size() >= limits_.max_marks) limit("too many open MARKs");
          marks_.push_back(stack_.size());
          break;
        case op::POP:
          if (!marks_.empty() && marks_.back() == stack_.size()) {
            marks_.pop_back();  // POP of a MARK, as CPython does
          } else {
            need(1);
            stack_.pop_back();
          }
          break;
        case op::POP_MARK: stack_.resize(pop_mark()); break;
        case op::DUP: need(1); push(Value(stack_.back())); break;

        case op::NONE: push(b_.none()); break;
        case op::NEWTRUE: push(b_.boolean(true)); break;
        case op::NEWFALSE: push(b_.boolean(false)); break;
        case op::BININT: push(b_.integer(static_cast<int32_t>(read_uint(4)))); break;
        case op::BININT1: push(b_.integer(read_u8())); break;
        case op::BININT2: push(b_.integer(static_cast<int64_t>(read_uint(2)))); break;
        case op::LONG1: {
          size_t n = read_u8();
          push(big_integer(n));
          break;
        }
        case op::LONG4: {
          int32_t n = static_cast<int32_t>(read_uint(4));
          if (n < 0) error("LONG4 with a negative length");
          push(big_integer(static_cast<size_t>(n)));
          break;
        }
        case op::INT: {
          std::string_view line = read_line();
          if (line == "00") push(b_.boolean(false));
          else if (line == "01") push(b_.boolean(true));
          else push(b_.decimal_integer(line));
          break;
        }
        case op::LONG: {
          std::string_view line = read_line();
          if (!line.empty() && line.back() == 'L') line.remove_suffix(1);
          push(b_.decimal_integer(line));
          break;
        }
        case op::BINFLOAT: {
          uint64_t bits = 0;
          const uint8_t* q = take(8);
          for (int i = 0; i < 8; ++i) bits = (bits << 8) | q[i];  // big-endian
          double d;
          std::memcpy(&d, &bits, sizeof d);
          push(b_.floating(d));
          break;
        }
        case op::FLOAT: push(b_.float_text(read_line())); break;

        case op::BINUNICODE: push(b_.unicode(read_counted(4))); break;
        case op::SHORT_BINUNICODE: push(b_.unicode(read_counted(1))); break;
        case op::BINUNICODE8: push(b_.unicode(read_counted(8))); break;
        case op::UNICODE: push(b_.unicode_raw_escape(read_line())); break;
        case op::SHORT_BINSTRING: push(b_.byte_string(read_counted(1))); break;
        case op::BINSTRING: {
          int32_t n = static_cast<int32_t>(read_uint(4));
          if (n < 0) error("BINSTRING with a negative length");
          push(b_.byte_string(read_bytes(static_cast<uint64_t>(n))));
          break;
        }
        case op::STRING: push(b_.string_literal(read_line())); break;
        case op::SHORT_BINBYTES: push(b_.bytes(read_counted(1))); break;
        case op::BINBYTES: push(b_.bytes(read_counted(4))); break;
        case op::BINBYTES8: push(b_.bytes(read_counted(8))); break;
        case op::BYTEARRAY8: push(b_.bytearray(read_counted(8))); break;

        case op::EMPTY_TUPLE: push(b_.tuple(nullptr, 0)); break;
        case op::TUPLE1: tuple_of_top(1); break;
        case op::TUPLE2: tuple_of_top(2); break;
        case op::TUPLE3: tuple_of_top(3); break;
        case op::TUPLE: {
          size_t at = pop_mark();
          Value t = b_.tuple(stack_.data() + at, stack_.size() - at);
          stack_.resize(at);
          push_container(std::move(t));
          break;
        }
        case op::EMPTY_LIST: push(b_.list(nullptr, 0)); break;
        case op::LIST: {
          size_t at = pop_mark();
          Value l = b_.list(stack_.data() + at, stack_.size() - at);
          stack_.resize(at);
          push_container(std::move(l));
          break;
        }
        case op::APPEND: {
          need(2);
          b_.list_extend(stack_[stack_.size() - 2], &stack_.back(), 1);
          stack_.pop_back();
          check_depth(stack_.back());
          break;
        }
        case op::APPENDS: {
          size_t at = pop_mark();
          if (at <= mark_floor()) error("APPENDS without a list");
          b_.list_extend(stack_[at - 1], stack_.data() + at, stack_.size() - at);
          stack_.resize(at);
          check_depth(stack_.back());
          break;
        }
        case op::EMPTY_DICT: push(b_.dict(nullptr, 0)); break;
        case op::DICT: {
          size_t at = pop_mark();
          if ((stack_.size() - at) % 2 != 0) error("DICT with an odd number of items");
          Value d = b_.dict(stack_.data() + at, (stack_.size() - at) / 2);
          stack_.resize(at);
          push_container(std::move(d));
          break;
        }
        case op::SETITEM: {
          need(3);
          b_.dict_set(stack_[stack_.size() - 3], &stack_[stack_.size() - 2], 1);
          stack_.resize(stack_.size() - 2);
          check_depth(stack_.back());
          break;
        }
        case op::SETITEMS: {
          size_t at = pop_mark();
          if (at <= mark_floor()) error("SETITEMS without a dict");
          if ((stack_.size() - at) % 2 != 0) error("SETITEMS with an odd number of items");
          b_.dict_set(stack_[at - 1], stack_.data() + at, (stack_.size() - at) / 2);
          stack_.resize(at);
          check_depth(stack_.back());
          break;
        }
        case op::EMPTY_SET: push(b_.empty_set()); break;
        case op::ADDITEMS: {
          size_t at = pop_mark();
          if (at <= mark_floor()) error("ADDITEMS without a set");
          b_.set_add(stack_[at - 1], stack_.data() + at, stack_.size() - at);
          stack_.resize(at);
          check_depth(stack_.back());
          break;
        }
        case op::FROZENSET: {
          size_t at = pop_mark();
          Value s = b_.frozenset(stack_.data() + at, stack_.size() - at);
          stack_.resize(at);
          push_container(std::move(s));
          break;
        }

        case op::GET: get(parse_index(read_line())); break;
        case op::BINGET: get(read_u8()); break;
        case op::LONG_BINGET: get(read_uint(4)); break;
        case op::PUT: put(parse_index(read_line())); break;
        case op::BINPUT: put(read_u8()); break;
        case op::LONG_BINPUT: put(read_uint(4)); break;
        case op::MEMOIZE: put(memo_count()); break;

        case op::GLOBAL: {
          std::string_view module = read_line();
          std::string_view name = read_line();
          push(b_.global(module, name));
          break;
        }
        case op::STACK_GLOBAL: {
          need(2);
          Value v = b_.stack_global(stack_[stack_.size() - 2], stack_.back());
          stack_.resize(stack_.size() - 2);
          push(std::move(v));
          break;
        }
        case op::REDUCE: {
          need(2);
          Value v = b_.reduce(stack_[stack_.size() - 2], stack_.back());
          stack_.resize(stack_.size() - 2);
          push_container(std::move(v));
          break;
        }
        case op::NEWOBJ: {
          need(2);
          Value v = b_.newobj(stack_[stack_.size() - 2], stack_.back());
          stack_.resize(stack_.size() - 2);
          push_container(std::move(v));
          break;
        }
        case op::NEWOBJ_EX: {
          need(3);
          size_t n = stack_.size();
          Value v = b_.newobj_ex(stack_[n - 3], stack_[n - 2], stack_[n - 1]);
          stack_.resize(n - 3);
          push_container(std::move(v));
          break;
        }
        case op::BUILD: {
          need(2);
          b_.build(stack_[stack_.size() - 2], stack_.back());
          stack_.pop_back();
          break;
        }
        case op::BINPERSID: {
          need(1);
          Value v = b_.persistent_load(stack_.back());
          stack_.back() = std::move(v);
          break;
        }

        case op::INST: case op::OBJ: case op::EXT1: case op::EXT2: case op::EXT4:
          refuse(code, "it names code to run outside the allowlist");
        case op::PERSID:
          refuse(code, "text persistent ids are never written by torch.save");
        case op::NEXT_BUFFER: case op::READONLY_BUFFER:
          refuse(code, "out-of-band buffers are not part of a checkpoint");
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", code);
          error(std::string("unknown opcode ") + hex);
        }
      }
    }
  }

  // Byte offset of the opcode being run when an error was raised.
  size_t position() const noexcept { return static_cast<size_t>(opcode_at_ - begin_); }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail(ErrorKind::Unpickling, "malformed pickle: " + what + " (opcode at byte " + std::to_string(position()) + ")");
  }
  [[noreturn]] void limit(const std::string& what) const {
    fail(ErrorKind::Limit, "pickle exceeds a safety limit: " + what + " (opcode at byte " +
                               std::to_string(position()) + ")");
  }
  [[noreturn]] void refuse(uint8_t code, const char* why) const {
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", code);
    fail(ErrorKind::UnsafeGlobal, std::string("opcode ") + hex + " is not allowed: " + why + " (at byte " +
                                      std::to_string(position()) + ")");
  }

  const uint8_t* take(uint64_t n) {
    if (n > static_cast<uint64_t>(end_ - p_)) error("truncated: needs " + std::to_string(n) + " more bytes");
    const uint8_t* q = p_;
    p_ += n;
    return q;
  }
  uint8_t read_u8() { return *take(1); }
  uint64_t read_uint(int n) {  // little-endian
    const uint8_t* q = take(static_cast<uint64_t>(n));
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | q[i];
    return v;
  }
  std::string_view read_bytes(uint64_t n) {
    const uint8_t* q = take(n);
    return {reinterpret_cast<const char*>(q), static_cast<size_t>(n)};
  }
  std::string_view read_counted(int width) { return read_bytes(read_uint(width)); }
  std::string_view read_line() {
    size_t avail = static_cast<size_t>(end_ - p_);
    size_t scan = avail < limits_.max_line ? avail : limits_.max_line;
    const void* nl = std::memchr(p_, '\n', scan);
    if (nl == nullptr) {
      if (scan < avail) limit("text line longer than " + std::to_string(limits_.max_line) + " bytes");
      error("truncated text line");
    }
    size_t n = static_cast<size_t>(static_cast<const uint8_t*>(nl) - p_);
    std::string_view line(reinterpret_cast<const char*>(p_), n);
    p_ += n + 1;
    return line;
  }
  uint64_t parse_index(std::string_view line) const {
    if (line.empty() || line.size() > 10) error("bad memo index");
    uint64_t v = 0;
    for (char c : line) {
      if (c < '0' || c > '9') error("bad memo index");
      v = v * 10 + static_cast<uint64_t>(c - '0');
    }
    return v;
  }
  Value big_integer(size_t n) {
    const uint8_t* q = take(n);
    return b_.big_integer(q, n);
  }

  // Values below the innermost open MARK belong to an enclosing opcode.
  size_t mark_floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void need(size_t n) const {
    if (stack_.size() < mark_floor() + n) error("stack underflow");
  }
  void push(Value&& v) {
    if (stack_.size() >= limits_.max_stack) limit("more than " + std::to_string(limits_.max_stack) + " values on the stack");
    stack_.push_back(std::move(v));
  }
  void check_depth(const Value& v) const {
    if (b_.depth(v) > limits_.max_depth) limit("containers nested deeper than " + std::to_string(limits_.max_depth));
  }
  void push_container(Value&& v) {
    check_depth(v);
    push(std::move(v));
  }
  void tuple_of_top(size_t n) {
    need(n);
    size_t at = stack_.size() - n;
    Value t = b_.tuple(stack_.data() + at, n);
    stack_.resize(at);
    push_container(std::move(t));
  }
  size_t pop_mark() {
    if (marks_.empty()) error("no MARK to pop");
    size_t at = marks_.back();
    marks_.pop_back();
    return at;
  }

  uint64_t memo_count() const { return dense_.size() + sparse_.size(); }
  void put(uint64_t index) {
    need(1);
    if (index < dense_.size()) {
      dense_[index] = stack_.back();
      return;
    }
    if (memo_count() >= limits_.max_memo) limit("more than " + std::to_string(limits_.max_memo) + " memo entries");
    // torch.save numbers memo entries 0, 1, 2...: keep those in a vector.
    if (index == dense_.size()) {
      sparse_.erase(index);  // an older entry at this index would be counted twice
      dense_.push_back(stack_.back());
    } else {
      sparse_.insert_or_assign(index, stack_.back());
    }
  }
  void get(uint64_t index) {
    if (index < dense_.size()) {
      push(Value(dense_[index]));
      return;
    }
    auto it = sparse_.find(index);
    if (it == sparse_.end()) error("memo entry " + std::to_string(index) + " was never stored");
    push(Value(it->second));
  }

  Builder& b_;
  PickleLimits limits_;
  const uint8_t* p_ = nullptr;
  const uint8_t* begin_ = nullptr;
  const uint8_t* end_ = nullptr;
  const uint8_t* opcode_at_ = nullptr;
  std::vector<Value> stack_;
  std::vector<size_t> marks_;
  std::vector<Value> dense_;
  std::unordered_map<uint64_t, Value> sparse_;
};

}  // namespace fastckpt
