// One exception type for the whole core. The bindings map `kind` onto the
// Python hierarchy rooted at fastckpt.CheckpointError.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fastckpt {

enum class ErrorKind {
  Format,        // not a zip we accept: structure, strictness rules
  Integrity,     // CRC-32 mismatch
  Record,        // a record is missing, of the wrong size or method
  Limit,         // a configured cap was exceeded
  Unpickling,    // malformed pickle stream
  UnsafeGlobal,  // weights_only refused a global or an operation
  Metadata,      // tensor metadata out of bounds or malformed
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message)
      : std::runtime_error(message), kind_(kind) {}
  // An error about one record: `record` is its name, `keys` what it holds
  // (storage keys or tensor names), when known. The bindings set them as the
  // Python exception's attributes, so callers never parse the message.
  Error(ErrorKind kind, const std::string& message, std::string record, std::vector<std::string> keys)
      : std::runtime_error(message), kind_(kind), record_(std::move(record)), keys_(std::move(keys)) {}
  ErrorKind kind() const noexcept { return kind_; }
  const std::string& record() const noexcept { return record_; }  // empty when none
  const std::vector<std::string>& keys() const noexcept { return keys_; }

 private:
  ErrorKind kind_;
  std::string record_;
  std::vector<std::string> keys_;
};

[[noreturn]] inline void fail(ErrorKind kind, const std::string& message) {
  throw Error(kind, message);
}

}  // namespace fastckpt
