// One exception type for the whole core. The bindings map `kind` onto the
// Python hierarchy rooted at fastckpt.CheckpointError.
#pragma once

#include <stdexcept>
#include <string>

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
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] inline void fail(ErrorKind kind, const std::string& message) {
  throw Error(kind, message);
}

}  // namespace fastckpt
