// Strict reader of the zip archives torch.save writes. It refuses everything
// two zip readers could read differently, and checks every offset and size
// against the bytes it was given before using it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace fastckpt {

struct ZipRecord {
  std::string name;          // without the archive prefix: "data.pkl", "data/0"
  uint64_t header_offset;    // local file header
  uint64_t data_offset;      // first byte of the data (from the local header)
  uint64_t compressed_size;  // bytes stored in the archive
  uint64_t size;             // uncompressed size
  uint32_t crc32;            // as stored; 0 on a non-empty record = not recorded
  uint16_t method;           // 0 stored, 8 deflate
  uint16_t flags;            // general-purpose bit flags
  // Largest power of two (capped at 4096) dividing data_offset.
  uint32_t alignment() const noexcept;
};

struct ZipLimits {
  uint64_t max_records = 10'000'000;
  uint32_t max_name_length = 4096;
};

class ZipIndex {
 public:
  // Parses the end records, the central directory and every local header of
  // the archive occupying exactly [data, data+size). Throws fastckpt::Error
  // (Format for structural problems, Limit for caps).
  static ZipIndex parse(const uint8_t* data, size_t size, const ZipLimits& limits = {});

  const std::string& prefix() const noexcept { return prefix_; }  // without the '/'
  const std::vector<ZipRecord>& records() const noexcept { return records_; }
  // nullptr when absent.
  const ZipRecord* find(std::string_view name) const;
  // Offset of the central directory (first byte after the last entry's data).
  uint64_t central_directory_offset() const noexcept { return cd_offset_; }

 private:
  std::string prefix_;
  std::vector<ZipRecord> records_;
  std::unordered_map<std::string_view, size_t> by_name_;  // views into records_[i].name
  uint64_t cd_offset_ = 0;
};

}  // namespace fastckpt
