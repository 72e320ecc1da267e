// Native tests for core/zip_writer: the file written with parallel pwrite
// equals the stream for every thread count (chunked records, batches of small
// ones, empty ones), the archive reads back through core/zip_index with the
// right CRCs and aligned data, ZIP64 fields appear exactly past 4 GiB (layout
// only: no data), replace_file, and errors before anything is written.
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include "check.h"
#include "core/crc32.h"
#include "core/errors.h"
#include "core/file_memory.h"
#include "core/zip_index.h"
#include "core/zip_writer.h"

namespace {

using fastckpt::ZipSource;

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

std::string temp_path(const char* name) {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/fastckpt_zip_writer_test_" + std::to_string(getpid()) + "_" + name;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::vector<uint8_t> out;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return out;
  uint8_t buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
  std::fclose(f);
  return out;
}

uint32_t le32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24; }

void test_file_equals_stream_and_reads_back() {
  // 20 MiB (three 8 MiB chunks), a 64 KiB record (the large-record threshold),
  // many small and empty ones, and text records.
  std::vector<std::vector<uint8_t>> data = {random_bytes(300, 1), random_bytes(20u << 20, 2),
                                            random_bytes(64u << 10, 3), {}};
  for (uint32_t i = 0; i < 3000; ++i) data.push_back(random_bytes(i % 97, 10 + i));
  std::vector<ZipSource> records;
  for (size_t i = 0; i < data.size(); ++i)
    records.push_back({i == 0 ? "data.pkl" : "data/" + std::to_string(i - 1), data[i].data(), data[i].size()});

  for (uint64_t alignment : {uint64_t{64}, uint64_t{1}, uint64_t{4096}}) {
    fastckpt::ZipWriteOptions options;
    options.prefix = "ckpt";
    options.alignment = alignment;
    std::vector<uint8_t> streamed;
    fastckpt::stream_zip(records, options,
                         [&](const uint8_t* p, size_t n) { streamed.insert(streamed.end(), p, p + n); });

    for (unsigned threads : {1u, 2u, 5u}) {
      options.threads = threads;
      const std::string path = temp_path("file.pt");
      const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      CHECK(fd >= 0);
      const uint64_t size = fastckpt::write_zip_file(fd, records, options);
      ::close(fd);
      CHECK(size == streamed.size());
      CHECK(read_file(path) == streamed);

      const auto file = fastckpt::FileMemory::open(path);
      const fastckpt::ZipIndex index = fastckpt::ZipIndex::parse(file->data(), file->size());
      CHECK(index.prefix() == "ckpt");
      CHECK(index.records().size() == records.size() + 1);
      for (size_t i = 0; i < records.size(); ++i) {
        const fastckpt::ZipRecord& r = index.records()[i];
        CHECK(r.name == records[i].name);
        CHECK(r.size == records[i].size);
        CHECK(r.data_offset % alignment == 0);
        CHECK(r.crc32 == fastckpt::crc32(0, records[i].data, records[i].size));
        CHECK(records[i].size == 0 ||
              std::memcmp(file->data() + r.data_offset, records[i].data, records[i].size) == 0);
      }
      CHECK(index.records().back().name == ".data/serialization_id");
      ::unlink(path.c_str());
    }
  }
}

void test_zip64_layout() {
  // Layout only: a record of 4 GiB + 100 bytes, then one whose header lies past 4 GiB.
  const uint64_t big = (uint64_t{1} << 32) + 100;
  const fastckpt::ZipLayout layout({{"data/0", 10}, {"data/1", big}, {"data/2", 3}}, "x", 64);
  const auto& e = layout.entries();
  CHECK(!e[0].zip64 && e[1].zip64 && e[2].zip64);
  CHECK(e[1].end_offset == e[1].data_offset + big + 24);  // 24-byte descriptor
  CHECK(e[2].header_offset >= 0xFFFFFFFFu && e[2].data_offset % 64 == 0);

  std::string h;
  layout.append_header(1, h);
  const auto* p = reinterpret_cast<const uint8_t*>(h.data());
  const size_t extra = 30 + std::string("x/data/1").size();
  CHECK(p[extra] == 0x01 && p[extra + 1] == 0 && p[extra + 2] == 16);  // ZIP64 extra: uncompressed, compressed
  CHECK(h.size() == e[1].data_offset - e[1].header_offset);
  h.clear();
  layout.append_header(2, h);
  p = reinterpret_cast<const uint8_t*>(h.data());
  CHECK(p[30 + 8] == 0x01 && p[30 + 8 + 2] == 8);  // ZIP64 extra: the header offset only

  std::string tail;
  layout.append_tail({1, 2, 3}, tail);
  CHECK(layout.central_directory_offset() + tail.size() == layout.total_size());
  const auto* end = reinterpret_cast<const uint8_t*>(tail.data()) + tail.size() - 22;
  CHECK(le32(end) == 0x06054b50 && le32(end + 16) == 0xFFFFFFFFu);  // central directory offset saturated
}

void test_errors_before_writing() {
  const uint8_t byte = 7;
  fastckpt::ZipWriteOptions options;
  bool threw = false;
  options.alignment = 0;
  try {
    fastckpt::stream_zip({{"a", &byte, 1}}, options, [](const uint8_t*, size_t) {});
  } catch (const fastckpt::Error& e) {
    threw = e.kind() == fastckpt::ErrorKind::Limit;
  }
  CHECK(threw);
  options.alignment = 64;
  threw = false;
  try {
    fastckpt::stream_zip({{"a", nullptr, 5}}, options, [](const uint8_t*, size_t) {});
  } catch (const fastckpt::Error& e) {
    threw = e.kind() == fastckpt::ErrorKind::Record;
  }
  CHECK(threw);
  threw = false;
  try {
    fastckpt::write_zip_file(-1, {{"a", &byte, 1}}, options);
  } catch (const std::system_error& e) {
    threw = e.code().value() == EBADF;
  }
  CHECK(threw);
}

void test_replace_file() {
  const std::string target = temp_path("target"), tmp = temp_path("tmp");
  auto put = [](const std::string& path, const char* text) {
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fputs(text, f);
    std::fclose(f);
  };
  put(tmp, "first");
  fastckpt::replace_file(tmp, target);  // no target yet: a rename
  put(tmp, "second");
  fastckpt::replace_file(tmp, target);  // over an existing one: exchange, then unlink
  const std::vector<uint8_t> got = read_file(target);
  CHECK(std::string(got.begin(), got.end()) == "second");
  CHECK(::access(tmp.c_str(), F_OK) != 0);
  bool threw = false;
  try {
    fastckpt::replace_file(tmp, target);  // nothing to move
  } catch (const std::system_error& e) {
    threw = e.code().value() == ENOENT;
  }
  CHECK(threw);
  ::unlink(target.c_str());
}

}  // namespace

// Records whose data write_pieces put in the file first (in_file, CRC given)
// and records with a precomputed CRC give the same file as plain records.
void test_pieces_and_known_crcs() {
  std::vector<std::vector<uint8_t>> data = {random_bytes(200, 1), random_bytes((9u << 20) + 5, 2),
                                            random_bytes(7, 3), {}, random_bytes(70u << 10, 4),
                                            random_bytes(3000, 5)};
  std::vector<ZipSource> plain;
  std::vector<std::pair<std::string, uint64_t>> names;
  for (size_t i = 0; i < data.size(); ++i) {
    plain.push_back({"data/" + std::to_string(i), data[i].data(), data[i].size()});
    names.emplace_back(plain.back().name, plain.back().size);
  }
  fastckpt::ZipWriteOptions options;
  options.prefix = "p";
  options.threads = 3;
  const std::string expected_path = temp_path("plain.pt"), got_path = temp_path("pieces.pt");
  int fd = ::open(expected_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  CHECK(fd >= 0);
  fastckpt::write_zip_file(fd, plain, options);
  ::close(fd);
  const std::vector<uint8_t> expected = read_file(expected_path);

  const fastckpt::ZipLayout layout = fastckpt::zip_layout(names, options);
  fd = ::open(got_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  CHECK(fd >= 0);
  // Odd records go in the file first, in two pieces each; even ones keep
  // their bytes and get their CRC up front.
  std::vector<fastckpt::FilePiece> pieces;
  for (size_t i = 1; i < data.size(); i += 2) {
    const uint64_t half = data[i].size() / 2, at = layout.entries()[i].data_offset;
    pieces.push_back({at + half, data[i].data() + half, data[i].size() - half});
    pieces.push_back({at, data[i].data(), half});
  }
  const std::vector<uint32_t> piece_crcs = fastckpt::write_pieces(fd, pieces, true, 3);
  std::vector<ZipSource> mixed = plain;
  for (size_t i = 0, p = 0; i < data.size(); ++i) {
    const uint32_t whole = fastckpt::crc32(0, data[i].data(), data[i].size());
    if (i % 2 == 0) {
      mixed[i].crc = whole;
      continue;
    }
    const uint64_t half = data[i].size() / 2;
    CHECK(fastckpt::crc32_combine(piece_crcs[p + 1], piece_crcs[p], data[i].size() - half) == whole);
    p += 2;
    mixed[i].crc = whole;
    mixed[i].in_file = true;  // data keeps pointing at the first bytes, all the id reads
  }
  fastckpt::write_zip_file(fd, mixed, options);
  ::close(fd);
  CHECK(read_file(got_path) == expected);

  bool threw = false;  // in the file without a CRC: refused before writing
  mixed[1].crc.reset();
  try {
    fastckpt::write_zip_file(-1, mixed, options);
  } catch (const fastckpt::Error&) {
    threw = true;
  }
  CHECK(threw);
  std::remove(expected_path.c_str());
  std::remove(got_path.c_str());
}

int main() {
  test_file_equals_stream_and_reads_back();
  test_pieces_and_known_crcs();
  test_zip64_layout();
  test_errors_before_writing();
  test_replace_file();
  if (native_test::failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", native_test::failures);
    return 1;
  }
  std::printf("zip_writer_test: all passed\n");
  return 0;
}
