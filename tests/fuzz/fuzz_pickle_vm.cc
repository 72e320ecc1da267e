// Fuzz target: the pickle machine on raw bytes, with a builder that accepts
// every structurally valid operation (APPEND onto an int, REDUCE of anything)
// so inputs get past type checks into deep opcode sequences. The builder
// reads every byte and every value the machine hands it, so a bad pointer or
// length from the machine shows up under ASan. Each input runs under the
// default limits and under tiny ones, to reach every limit path.
//
// Findings: sanitizer reports, broken promises (below), and any exception
// other than fastckpt::Error (std::bad_alloc...), which escapes and aborts.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "core/errors.h"
#include "core/pickle_vm.h"

namespace {

struct FuzzValue {
  uint32_t depth = 0;  // containers: 1 + the deepest item
};

class FuzzBuilder {
 public:
  using Value = FuzzValue;

  Value none() { return {}; }
  Value boolean(bool v) { return fold(v); }
  Value integer(int64_t v) { return fold(static_cast<uint64_t>(v)); }
  Value big_integer(const uint8_t* le, size_t n) { return fold(le, n); }
  Value decimal_integer(std::string_view t) { return fold(t); }
  Value floating(double d) { return fold(d != d); }
  Value float_text(std::string_view t) { return fold(t); }
  Value unicode(std::string_view t) { return fold(t); }
  Value unicode_raw_escape(std::string_view t) { return fold(t); }
  Value byte_string(std::string_view t) { return fold(t); }
  Value string_literal(std::string_view t) { return fold(t); }
  Value bytes(std::string_view t) { return fold(t); }
  Value bytearray(std::string_view t) { return fold(t); }

  Value tuple(Value* items, size_t n) { return container(items, n); }
  Value list(Value* items, size_t n) { return container(items, n); }
  void list_extend(Value& target, Value* items, size_t n) { extend(target, items, n); }
  Value dict(Value* kv, size_t pairs) { return container(kv, 2 * pairs); }
  void dict_set(Value& target, Value* kv, size_t pairs) { extend(target, kv, 2 * pairs); }
  Value empty_set() { return {1}; }
  void set_add(Value& target, Value* items, size_t n) { extend(target, items, n); }
  Value frozenset(Value* items, size_t n) { return container(items, n); }

  Value global(std::string_view module, std::string_view name) {
    fold(module);
    return fold(name);
  }
  Value stack_global(Value& module, Value& name) { return {std::max(module.depth, name.depth)}; }
  Value reduce(Value& callable, Value& args) { return {std::max(callable.depth, args.depth)}; }
  Value newobj(Value& cls, Value& args) { return {std::max(cls.depth, args.depth)}; }
  Value newobj_ex(Value& cls, Value& args, Value& kwargs) { return {std::max({cls.depth, args.depth, kwargs.depth})}; }
  void build(Value& obj, Value& state) { obj.depth = std::max(obj.depth, state.depth); }
  Value persistent_load(Value& pid) { return pid; }
  uint32_t depth(const Value& v) { return v.depth; }

  // Every byte the machine handed over, folded together (kept live by the caller).
  uint64_t digest() const { return digest_; }

 private:
  Value fold(uint64_t v) {
    digest_ = digest_ * 31 + v;
    return {};
  }
  Value fold(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i) fold(p[i]);
    return {};
  }
  Value fold(std::string_view t) { return fold(reinterpret_cast<const uint8_t*>(t.data()), t.size()); }
  static Value container(Value* items, size_t n) {
    Value v{1};
    extend(v, items, n);
    return v;
  }
  static void extend(Value& target, Value* items, size_t n) {
    for (size_t i = 0; i < n; ++i) target.depth = std::max(target.depth, items[i].depth + 1);
  }

  uint64_t digest_ = 0;
};

volatile uint64_t sink;

[[noreturn]] void violated(const char* promise) {
  std::fprintf(stderr, "fuzz_pickle_vm: broken promise: %s\n", promise);
  std::abort();
}

void run(const uint8_t* data, size_t size, const fastckpt::PickleLimits& limits) {
  FuzzBuilder builder;
  fastckpt::PickleMachine<FuzzBuilder> machine(builder, limits);
  try {
    FuzzValue v = machine.run(data, size);
    if (v.depth > limits.max_depth) violated("a value nested deeper than max_depth was returned");
  } catch (const fastckpt::Error& e) {
    // The machine raises only these (this builder raises nothing), and points
    // at an opcode inside the input, or at 0 for an empty one.
    const fastckpt::ErrorKind k = e.kind();
    if (k != fastckpt::ErrorKind::Unpickling && k != fastckpt::ErrorKind::Limit &&
        k != fastckpt::ErrorKind::UnsafeGlobal)
      violated("an error other than Unpickling, Limit or UnsafeGlobal");
    if (size == 0 ? machine.position() != 0 : machine.position() >= size)
      violated("position() is not the offset of an opcode of the input");
  }
  sink = builder.digest();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  run(data, size, fastckpt::PickleLimits{});
  fastckpt::PickleLimits tiny;
  tiny.max_stack = 16;
  tiny.max_marks = 4;
  tiny.max_memo = 8;
  tiny.max_depth = 4;
  tiny.max_line = 16;
  run(data, size, tiny);
  return 0;
}
