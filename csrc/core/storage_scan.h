// Which storages a data pickle names, and with which location tag, found by
// running the pickle machine with a builder that keeps nothing but text,
// integers and 5-tuples. A device load uses it to plan and start its staged
// reads before the real unpickling runs (which makes Python objects and costs
// far more). Nothing is judged here: the real run refuses what is unsafe.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include "core/pickle_vm.h"

namespace fastckpt {

struct StorageRef {
  std::string key;       // the record is "data/<key>"
  std::string location;  // the tag torch.save wrote: "cpu", "cuda:0", "mps"...
};

class StorageScanBuilder {
 public:
  struct Value {
    enum class Kind : uint8_t { Other, Text, Tuple5 };
    Kind kind = Kind::Other;
    std::string_view text;  // into the pickle, which outlives the run
    uint32_t tuple = 0;     // index into tuples_ (Tuple5)
  };

  Value none() { return {}; }
  Value boolean(bool) { return {}; }
  Value integer(int64_t) { return {}; }
  Value big_integer(const uint8_t*, size_t) { return {}; }
  Value decimal_integer(std::string_view) { return {}; }
  Value floating(double) { return {}; }
  Value float_text(std::string_view) { return {}; }
  Value unicode(std::string_view utf8) { return {Value::Kind::Text, utf8, 0}; }
  Value unicode_raw_escape(std::string_view) { return {}; }
  Value byte_string(std::string_view s) { return {Value::Kind::Text, s, 0}; }  // Python 2 saves
  Value string_literal(std::string_view) { return {}; }
  Value bytes(std::string_view) { return {}; }
  Value bytearray(std::string_view) { return {}; }
  Value tuple(Value* items, size_t n) {
    // A storage's persistent id: ('storage', type, key, location, numel).
    if (n != 5) return {};
    tuples_.push_back({items[0], items[1], items[2], items[3], items[4]});
    return {Value::Kind::Tuple5, {}, static_cast<uint32_t>(tuples_.size() - 1)};
  }
  Value list(Value*, size_t) { return {}; }
  void list_extend(Value&, Value*, size_t) {}
  Value dict(Value*, size_t) { return {}; }
  void dict_set(Value&, Value*, size_t) {}
  Value empty_set() { return {}; }
  void set_add(Value&, Value*, size_t) {}
  Value frozenset(Value*, size_t) { return {}; }
  Value global(std::string_view, std::string_view) { return {}; }
  Value stack_global(Value&, Value&) { return {}; }
  Value reduce(Value&, Value&) { return {}; }
  Value newobj(Value&, Value&) { return {}; }
  Value newobj_ex(Value&, Value&, Value&) { return {}; }
  void build(Value&, Value&) {}
  uint32_t depth(const Value&) { return 0; }

  Value persistent_load(Value& pid) {
    if (pid.kind != Value::Kind::Tuple5) return {};
    const std::array<Value, 5>& t = tuples_[pid.tuple];
    const bool storage = t[0].kind == Value::Kind::Text && t[0].text == "storage";
    if (storage && t[2].kind == Value::Kind::Text && t[3].kind == Value::Kind::Text &&
        seen_.insert(t[2].text).second)
      found_.push_back({std::string(t[2].text), std::string(t[3].text)});
    return {};
  }

  std::vector<StorageRef> take() { return std::move(found_); }

 private:
  std::vector<std::array<Value, 5>> tuples_;
  std::unordered_set<std::string_view> seen_;
  std::vector<StorageRef> found_;
};

// Every storage the pickle names, once each, in first-use order. Throws
// fastckpt::Error for a pickle the machine refuses (as the real run would).
inline std::vector<StorageRef> scan_storages(const uint8_t* data, size_t size) {
  StorageScanBuilder builder;
  PickleMachine<StorageScanBuilder> machine(builder);
  machine.run(data, size);
  return builder.take();
}

}  // namespace fastckpt
