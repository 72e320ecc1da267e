// Overflow-checked arithmetic for sizes read from untrusted files.
#pragma once

#include <cstdint>

namespace fastckpt {

// Each returns false (leaving *out unspecified) when the result does not fit.
inline bool checked_add(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_add_overflow(a, b, out);
}
inline bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}

// True when [offset, offset + length) lies inside [0, total).
inline bool range_within(uint64_t offset, uint64_t length, uint64_t total) {
  return offset <= total && length <= total - offset;
}

}  // namespace fastckpt
