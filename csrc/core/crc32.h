// CRC-32 with the zip/zlib polynomial (reflected 0xEDB88320), bit-exact with
// zlib.crc32 for every length and alignment. The implementation is chosen once
// at run time from the CPU's features.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastckpt {

// Continues `crc` (the value returned for the preceding bytes; 0 to start)
// over `n` bytes at `data`, like zlib.crc32(data, crc).
uint32_t crc32(uint32_t crc, const void* data, size_t n) noexcept;

// CRC of A||B from crc(A), crc(B) and len(B), like zlib's crc32_combine.
uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) noexcept;

// Name of the implementation in use ("vpclmulqdq", "pclmulqdq", "armv8-crc",
// "portable"), for benchmarks and `fastckpt verify`.
const char* crc32_implementation() noexcept;

}  // namespace fastckpt
