// Native tests for core/copy_engine: copies and CRCs from a real file (pread)
// and from anonymous memory (memcpy), chunked, batched and verify-only tasks,
// bounds checks before any byte moves, and errors raised in worker threads.
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "core/copy_engine.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/file_memory.h"

namespace {


using fastckpt::CopyResult;
using fastckpt::CopyTask;
using fastckpt::FileMemory;

constexpr size_t kGuard = 64;
constexpr uint8_t kGuardByte = 0xA5;

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

struct TempFile {
  std::string path;
  explicit TempFile(const std::vector<uint8_t>& bytes) {
    const char* dir = std::getenv("TMPDIR");
    path = std::string(dir ? dir : "/tmp") + "/fastckpt_copy_test_XXXXXX";
    const int fd = mkstemp(&path[0]);
    if (fd < 0) {
      std::perror("mkstemp");
      std::exit(1);
    }
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t w = write(fd, bytes.data() + done, bytes.size() - done);
      if (w <= 0) {
        std::perror("write");
        std::exit(1);
      }
      done += static_cast<size_t>(w);
    }
    close(fd);
  }
  ~TempFile() { unlink(path.c_str()); }
};

// A destination with guard bytes on both sides, to catch overruns.
struct Destination {
  std::vector<uint8_t> storage;
  explicit Destination(size_t n) : storage(n + 2 * kGuard, kGuardByte) {}
  uint8_t* data() { return storage.data() + kGuard; }
  size_t size() const { return storage.size() - 2 * kGuard; }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (storage[i] != kGuardByte || storage[storage.size() - 1 - i] != kGuardByte) return false;
    return true;
  }
};

struct Case {
  uint64_t offset;
  uint64_t length;
  bool copy;
  bool crc;
};

// Runs `cases` over `file` (whose bytes are `bytes`) and checks every copy,
// every CRC and every guard.
void check_cases(const FileMemory& file, const std::vector<uint8_t>& bytes,
                 const std::vector<Case>& cases, unsigned threads, const char* what) {
  std::vector<std::unique_ptr<Destination>> dests;
  std::vector<CopyTask> tasks;
  for (const Case& c : cases) {
    dests.push_back(std::make_unique<Destination>(c.copy ? c.length : 0));
    tasks.push_back({c.offset, c.length, c.copy ? dests.back()->data() : nullptr, c.crc});
  }
  const std::vector<CopyResult> results = fastckpt::run_copies(file, tasks, threads);
  CHECK(results.size() == cases.size());
  if (results.size() != cases.size()) return;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    const uint8_t* src = bytes.data() + c.offset;
    bool ok = dests[i]->guards_intact();
    if (c.copy) ok = ok && std::memcmp(dests[i]->data(), src, c.length) == 0;
    const uint32_t expected = c.crc ? fastckpt::crc32(0, src, c.length) : 0;
    ok = ok && results[i].crc32 == expected;
    if (!ok) {
      std::fprintf(stderr, "%s, %u threads: task %zu (offset %llu, length %llu, copy %d, crc %d) wrong\n",
                   what, threads, i, static_cast<unsigned long long>(c.offset),
                   static_cast<unsigned long long>(c.length), c.copy, c.crc);
      ++native_test::failures;
      return;
    }
  }
}

std::vector<Case> mixed_cases(size_t file_size) {
  const uint64_t MiB = 1 << 20;
  std::vector<Case> cases = {
      {0, 0, true, true},           {5, 0, false, true},          {file_size, 0, true, true},
      {1, 1, true, true},           {3, 63, true, true},          {64, 64, true, false},
      {4097, 4095, true, true},     {100, 65535, true, true},     {7, 65536, true, true},
      {11, MiB + 7, true, true},    {0, 8 * MiB, true, true},     {1, 8 * MiB + 1, true, true},
      {13, 17 * MiB + 3, true, true}, {2, 17 * MiB + 5, false, true}, {9, 9 * MiB, true, false},
      {file_size - 1, 1, true, true}, {0, file_size, true, true},  {3, 5000, false, true},
      {0, file_size, false, true},  {17, 12345, false, false},
  };
  return cases;
}

// Many tiny records, like the storages of a many-tensor checkpoint: in file
// order with gaps, then reversed, then scattered.
std::vector<Case> small_cases(size_t file_size) {
  std::vector<Case> cases;
  for (uint64_t i = 0; i < 6000; ++i) cases.push_back({i * 160 + 37, 64 + i % 3, true, true});
  for (uint64_t i = 3000; i > 0; --i) cases.push_back({i * 96, 48, true, i % 2 == 0});
  std::mt19937_64 rng(7);
  for (int i = 0; i < 3000; ++i) {
    const uint64_t len = rng() % 3000;
    cases.push_back({rng() % (file_size - len), len, i % 5 != 0, i % 3 != 0});
  }
  return cases;
}

void test_copies(const FileMemory& file, const std::vector<uint8_t>& bytes, const char* what) {
  for (unsigned threads : {1u, 2u, 3u, 0u}) {
    check_cases(file, bytes, mixed_cases(bytes.size()), threads, what);
    check_cases(file, bytes, small_cases(bytes.size()), threads, what);
  }
  check_cases(file, bytes, {}, 2, what);
}

bool throws_record_error(const FileMemory& file, const std::vector<CopyTask>& tasks, unsigned threads) {
  try {
    fastckpt::run_copies(file, tasks, threads);
  } catch (const fastckpt::Error& e) {
    return e.kind() == fastckpt::ErrorKind::Record;
  }
  return false;
}

void test_bounds(const FileMemory& file) {
  const uint64_t size = file.size();
  Destination before(4096);
  std::memset(before.data(), 0x5A, before.size());
  const std::vector<std::vector<CopyTask>> bad = {
      {{0, 4096, before.data(), true}, {size, 1, nullptr, true}},
      {{0, 4096, before.data(), true}, {size - 10, 11, nullptr, true}},
      {{0, 4096, before.data(), true}, {UINT64_MAX, 2, before.data(), true}},
      {{0, 4096, before.data(), true}, {1, UINT64_MAX, before.data(), false}},
      {{0, 4096, before.data(), true}, {size + 1, 0, nullptr, false}},
  };
  for (const auto& tasks : bad) {
    CHECK(throws_record_error(file, tasks, 2));
    // Checked before any byte moved: the valid first task did not run.
    bool untouched = true;
    for (size_t i = 0; i < before.size(); ++i) untouched = untouched && before.data()[i] == 0x5A;
    CHECK(untouched);
  }
}

// The file shrinks after it was mapped: pread hits end of file inside worker
// threads, and the error reaches the caller.
void test_truncated_file() {
  const std::vector<uint8_t> bytes = random_bytes(24u << 20, 11);
  const TempFile tmp(bytes);
  const std::shared_ptr<FileMemory> file = FileMemory::open(tmp.path);
  CHECK(truncate(tmp.path.c_str(), 10 << 20) == 0);
  Destination dest(bytes.size());
  CHECK(throws_record_error(*file, {{0, bytes.size(), dest.data(), true}}, 2));
  std::vector<CopyTask> small;
  for (uint64_t i = 0; i < 1000; ++i) small.push_back({(20u << 20) + i * 64, 64, dest.data() + i * 64, false});
  CHECK(throws_record_error(*file, small, 2));
  // Bytes still in the file copy fine.
  const std::vector<CopyResult> ok = fastckpt::run_copies(*file, {{0, 10u << 20, dest.data(), true}}, 2);
  CHECK(ok.size() == 1 && ok[0].crc32 == fastckpt::crc32(0, bytes.data(), 10u << 20));
}

}  // namespace

// copy_memory: large copies split in chunks, runs of small ones batched,
// empty ones, with and without CRC, for several thread counts.
void test_copy_memory(const std::vector<uint8_t>& bytes) {
  const std::vector<std::pair<uint64_t, uint64_t>> ranges = {
      {0, (20u << 20) + 7}, {5, 0}, {100, 3}, {1000, 65535}, {7, 65536}, {300, 1}, {(20u << 20), 9u << 20}};
  for (unsigned threads : {1u, 4u}) {
    for (bool crc : {false, true}) {
      std::vector<std::vector<uint8_t>> out;
      std::vector<fastckpt::MemoryCopy> copies;
      for (const auto& [at, n] : ranges) {
        out.emplace_back(n + 1, 0xAB);
        copies.push_back({out.back().data(), bytes.data() + at, n});
      }
      const std::vector<uint32_t> crcs = fastckpt::copy_memory(copies, crc, threads);
      CHECK(crcs.size() == ranges.size());
      for (size_t i = 0; i < ranges.size(); ++i) {
        const auto [at, n] = ranges[i];
        CHECK(std::memcmp(out[i].data(), bytes.data() + at, n) == 0);
        CHECK(out[i][n] == 0xAB);  // nothing past the range
        CHECK(crcs[i] == (crc ? fastckpt::crc32(0, bytes.data() + at, n) : 0u));
      }
    }
  }
}

int main() {
  CHECK(fastckpt::default_thread_count() >= 1);
  const std::vector<uint8_t> bytes = random_bytes((30u << 20) + 123, 10);
  {
    const TempFile tmp(bytes);
    const std::shared_ptr<FileMemory> file = FileMemory::open(tmp.path);
    CHECK(file->fd() >= 0);
    test_copies(*file, bytes, "file");
    test_bounds(*file);
  }
  {
    const std::shared_ptr<FileMemory> anon = FileMemory::anonymous(bytes.size());
    std::memcpy(anon->mutable_data(), bytes.data(), bytes.size());
    test_copies(*anon, bytes, "anonymous");
    test_bounds(*anon);
  }
  test_truncated_file();
  test_copy_memory(bytes);
  if (native_test::failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", native_test::failures);
    return 1;
  }
  std::printf("copy_engine_test: all passed\n");
  return 0;
}
