// Strict reader of the zip archives torch.save writes. It refuses everything
// two zip readers could read differently, and checks every offset and size
// against the bytes it was given before using it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/siphash.h"

namespace fastckpt {

enum class Method : uint16_t { Stored = 0, Deflated = 8 };  // the only ones the index accepts

struct ZipRecord {
  std::string name;          // without the archive prefix: "data.pkl", "data/0"
  uint64_t header_offset;    // local file header
  uint64_t data_offset;      // first byte of the data (from the local header)
  uint64_t compressed_size;  // bytes stored in the archive
  uint64_t size;             // uncompressed size
  uint32_t crc32;            // as stored; 0 on a non-empty record = not recorded
  Method method;
  uint16_t flags;            // general-purpose bit flags
  // Largest power of two (capped at 4096) dividing data_offset.
  uint32_t alignment() const noexcept;
};

struct ZipLimits {
  uint64_t max_records = 10'000'000;  // also capped at 2^32 - 2 (slot encoding)
  uint32_t max_name_length = 4096;
};

class ZipIndex {
 public:
  // Parses the end records, the central directory and every local header of
  // the archive occupying exactly [data, data+size). Throws fastckpt::Error
  // (Format for structural problems, Limit for caps).
  //
  // Accepted: one disk; entries laid out back to back from offset 0 in
  // central-directory order (local header, data, data descriptor when flag
  // bit 3 is set), then the central directory, the ZIP64 end record and
  // locator (optional), and the classic end record ending exactly at `size`.
  // Flags: only bits 3 and 11; methods 0 and 8; local headers, descriptors
  // and both end records must agree with the central directory; names are
  // one common "prefix/" followed by a plain relative path, unique.
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
  // Name lookup: open addressing with linear probing, at most half full. A
  // slot is (high 32 bits of the name's hash) << 32 | (record index + 1), 0 =
  // empty: one allocation for the whole table, and indices survive copies.
  // Hashes are keyed with a random per-archive key: names come from the file.
  std::vector<uint64_t> slots_;
  SipKey hash_key_;
  // Adds records_[i] to slots_; returns the index of an earlier record with
  // the same name, or i.
  size_t insert_name(size_t i);
  uint64_t cd_offset_ = 0;
};

}  // namespace fastckpt
