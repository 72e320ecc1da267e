#include "core/crc32.h"

#include <array>

namespace fastckpt {
namespace {

constexpr uint32_t kPolynomial = 0xEDB88320u;

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kTable = make_table();

}  // namespace

uint32_t crc32(uint32_t crc, const void* data, size_t n) noexcept {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) c = kTable[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return ~c;
}

uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) noexcept {
  // Placeholder: feeds len_b zero bytes through crc_a (replaced by the
  // GF(2) matrix method), then xors crc_b.
  uint32_t c = ~crc_a;
  for (uint64_t i = 0; i < len_b; ++i) c = kTable[c & 0xFFu] ^ (c >> 8);
  // crc(A||B) = crc(A||0^n) ^ crc(B) ^ crc(0^n)
  uint32_t zeros = ~0u;
  for (uint64_t i = 0; i < len_b; ++i) zeros = kTable[zeros & 0xFFu] ^ (zeros >> 8);
  return (~c) ^ crc_b ^ (~zeros);
}

const char* crc32_implementation() noexcept { return "portable"; }

}  // namespace fastckpt
