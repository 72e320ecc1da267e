// Native tests for core/crc32: every implementation the CPU supports against
// a bit-at-a-time reference, at every length and alignment that exercises the
// heads, lanes and tails of the folding code, plus crc32_combine against an
// independent x^n mod P computed in the normal (non-reflected) representation.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "core/crc32.h"

namespace {


// Straight from the definition, one bit at a time.
uint32_t reference_crc(uint32_t crc, const uint8_t* p, size_t n) {
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
  }
  return ~c;
}

// Same, byte at a time with a table built from the bitwise rule (faster, for
// the exhaustive sweeps).
struct ByteTable {
  uint32_t t[256];
  ByteTable() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
      t[b] = c;
    }
  }
  uint32_t crc(uint32_t crc, const uint8_t* p, size_t n) const {
    uint32_t c = ~crc;
    for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
    return ~c;
  }
};

uint32_t reflect32(uint32_t v) {
  uint32_t r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}

// Normal representation (bit i = x^i), P = x^32 + 0x04C11DB7.
uint32_t mul_mod_p_normal(uint32_t a, uint32_t b) {
  uint64_t product = 0;
  for (int i = 0; i < 32; ++i)
    if ((a >> i) & 1u) product ^= static_cast<uint64_t>(b) << i;
  for (int i = 63; i >= 32; --i)
    if ((product >> i) & 1u) product ^= (uint64_t{0x104C11DB7} << (i - 32));
  return static_cast<uint32_t>(product);
}

// x^(8n) mod P by square-and-multiply over the bits of 8n (a 67-bit number).
uint32_t x_pow_8n(uint64_t n) {
  uint32_t result = 1, base = 2;  // x^0, x^1
  for (int i = 0; i < 3; ++i) base = mul_mod_p_normal(base, base);  // x^8
  for (; n != 0; n >>= 1) {
    if (n & 1) result = mul_mod_p_normal(result, base);
    base = mul_mod_p_normal(base, base);
  }
  return result;
}

uint32_t reference_combine(uint32_t a, uint32_t b, uint64_t len_b) {
  return reflect32(mul_mod_p_normal(reflect32(a), x_pow_8n(len_b))) ^ b;
}

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

void test_known_values() {
  const char* digits = "123456789";
  CHECK(fastckpt::crc32(0, digits, 9) == 0xCBF43926u);
  CHECK(fastckpt::crc32(0, "a", 1) == 0xE8B7BE43u);
  CHECK(fastckpt::crc32(0, nullptr, 0) == 0);
  CHECK(fastckpt::crc32(0x12345678u, nullptr, 0) == 0x12345678u);
  std::vector<uint8_t> zeros(4096, 0);
  CHECK(fastckpt::crc32(0, zeros.data(), zeros.size()) == reference_crc(0, zeros.data(), zeros.size()));
  std::vector<uint8_t> ones(4099, 0xFF);
  CHECK(fastckpt::crc32(0, ones.data(), ones.size()) == reference_crc(0, ones.data(), ones.size()));
}

void test_every_length_and_alignment() {
  const ByteTable table;
  const std::vector<uint8_t> data = random_bytes(4096 + 64, 1);
  // Lengths past 2 KiB cover several 256-byte main-loop steps plus every
  // 32- and 16-byte tail; alignments cover every head of the 32-byte aligner.
  for (size_t align = 0; align < 64; ++align)
    for (size_t n = 0; n <= 2100; ++n) {
      const uint32_t seed = static_cast<uint32_t>(n * 2654435761u + align);
      if (fastckpt::crc32(seed, data.data() + align, n) != table.crc(seed, data.data() + align, n)) {
        std::fprintf(stderr, "mismatch: align %zu length %zu\n", align, n);
        ++native_test::failures;
        return;
      }
    }
  CHECK(table.crc(0, data.data(), 1000) == reference_crc(0, data.data(), 1000));
}

void test_large_and_chained() {
  const std::vector<uint8_t> data = random_bytes((5u << 20) + 77, 2);
  const ByteTable table;
  const uint32_t whole = table.crc(0, data.data(), data.size());
  CHECK(fastckpt::crc32(0, data.data(), data.size()) == whole);
  CHECK(fastckpt::crc32(0, data.data() + 3, data.size() - 3) == table.crc(0, data.data() + 3, data.size() - 3));
  std::mt19937_64 rng(3);
  for (int i = 0; i < 50; ++i) {
    const size_t cut = rng() % data.size();
    const uint32_t head = fastckpt::crc32(0, data.data(), cut);
    CHECK(fastckpt::crc32(head, data.data() + cut, data.size() - cut) == whole);
  }
}

void test_combine() {
  const std::vector<uint8_t> data = random_bytes(1u << 16, 4);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 2000; ++i) {
    const size_t la = rng() % 20000, lb = (i % 10 == 0) ? 0 : rng() % (data.size() - la);
    const uint32_t a = fastckpt::crc32(0, data.data(), la);
    const uint32_t b = fastckpt::crc32(0, data.data() + la, lb);
    const uint32_t ab = fastckpt::crc32(0, data.data(), la + lb);
    CHECK(fastckpt::crc32_combine(a, b, lb) == ab);
    CHECK(reference_combine(a, b, lb) == ab);
  }
  // Lengths up to 2^64 - 1: against the independent reference, and the
  // homomorphism (A||B)||C == A||(B||C).
  const uint64_t lengths[] = {uint64_t{1} << 32, (uint64_t{1} << 32) + 1, uint64_t{5} << 40,
                              UINT64_MAX, UINT64_MAX / 3, uint64_t{1} << 61};
  for (uint64_t n : lengths) {
    for (uint32_t a : {0u, 1u, 0xDEADBEEFu, 0xFFFFFFFFu}) {
      const uint32_t b = a * 2654435761u + 7;
      CHECK(fastckpt::crc32_combine(a, b, n) == reference_combine(a, b, n));
    }
  }
  for (int i = 0; i < 500; ++i) {
    const uint64_t n1 = rng() >> (rng() % 64), n2 = rng() >> (rng() % 64);
    const uint32_t a = static_cast<uint32_t>(rng()), b = static_cast<uint32_t>(rng()),
                   c = static_cast<uint32_t>(rng());
    const uint32_t left = fastckpt::crc32_combine(fastckpt::crc32_combine(a, b, n1), c, n2);
    const uint32_t right = fastckpt::crc32_combine(a, fastckpt::crc32_combine(b, c, n2), n1 + n2);
    if (n1 + n2 >= n1) CHECK(left == right);  // skip wrapped sums
    CHECK(fastckpt::crc32_combine(a, b, n1) == reference_combine(a, b, n1));
  }
}

void test_first_use_from_many_threads() {
  const std::vector<uint8_t> data = random_bytes(100000, 6);
  const uint32_t expected = ByteTable().crc(0, data.data(), data.size());
  std::vector<std::thread> threads;
  std::vector<uint32_t> got(8);
  for (size_t i = 0; i < got.size(); ++i)
    threads.emplace_back([&, i] { got[i] = fastckpt::crc32(0, data.data(), data.size()); });
  for (auto& t : threads) t.join();
  for (uint32_t g : got) CHECK(g == expected);
}

void run_all() {
  test_first_use_from_many_threads();
  test_known_values();
  test_every_length_and_alignment();
  test_large_and_chained();
  test_combine();
}

}  // namespace

int main() {
  // The implementation is chosen once per process, so each one runs in a
  // child that forces it through FASTCKPT_CRC32.
  const char* names[] = {"vpclmulqdq", "pclmulqdq", "armv8-crc", "portable"};
  std::vector<std::string> tested;
  for (const char* name : names) {
    std::fflush(nullptr);
    const pid_t pid = fork();
    if (pid < 0) {
      std::perror("fork");
      return 1;
    }
    if (pid == 0) {
      setenv("FASTCKPT_CRC32", name, 1);
      if (std::strcmp(fastckpt::crc32_implementation(), name) != 0) _exit(77);  // not on this CPU
      run_all();
      std::fflush(nullptr);
      _exit(native_test::failures == 0 ? 0 : 1);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) {
      std::fprintf(stderr, "%s: child crashed\n", name);
      ++native_test::failures;
      continue;
    }
    const int code = WEXITSTATUS(status);
    std::printf("%-11s %s\n", name, code == 77 ? "not supported here" : code == 0 ? "ok" : "FAILED");
    if (code != 0 && code != 77) ++native_test::failures;
    if (code == 0) tested.push_back(name);
  }
  // Unknown names fall back to the best implementation.
  setenv("FASTCKPT_CRC32", "no-such-implementation", 1);
  const std::string chosen = fastckpt::crc32_implementation();
  bool covered = false;  // the default is one of the implementations tested above
  for (const std::string& name : tested) covered = covered || chosen == name;
  CHECK(covered);
  if (native_test::failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", native_test::failures);
    return 1;
  }
  std::printf("crc32_test: all passed (default: %s)\n", chosen.c_str());
  return 0;
}
