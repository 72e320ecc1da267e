// An opened checkpoint: its bytes (a mapping, or a buffer a file object was
// read into) with their strict zip index, and the CRC verdict rule.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/file_memory.h"
#include "core/zip_index.h"

namespace fastckpt {

enum class CrcStatus { Ok, Mismatch, Unrecorded };

// The one rule for a record's stored CRC-32 against the bytes' (loads, reads
// and verify all use it): torch.save(compute_crc32=False) writes 0, which
// means "not recorded", not corruption.
CrcStatus judge_crc(const ZipRecord& r, uint32_t actual) noexcept;
const char* crc_status_name(CrcStatus s) noexcept;
// Throws Error(Integrity) when the verdict is Mismatch: the one CRC message,
// naming the record, the file (when `file` is not empty) and what the record
// holds (`keys`: storage keys or tensor names, when the caller knows them);
// the error carries the record's name and `keys`.
void check_crc(const ZipRecord& r, uint32_t actual, const std::string& file = {},
               const std::vector<std::string>& keys = {});

// "record 'name' (data at offset N)", for messages.
std::string describe_record(const ZipRecord& r);

// `size` bytes at `data`, kept alive by `owner` (null when there are none).
struct ByteView {
  std::shared_ptr<FileMemory> owner;
  uint8_t* data = nullptr;
  size_t size = 0;
};

struct Archive {
  std::shared_ptr<FileMemory> file;
  ZipIndex index;

  const ZipRecord& record(const std::string& name) const;  // throws Error(Record)
  // check_crc for a record of this archive, naming its file.
  void check_crc(const ZipRecord& r, uint32_t actual, const std::vector<std::string>& keys = {}) const {
    fastckpt::check_crc(r, actual, file->path(), keys);
  }
  // The data of a stored record, checked to lie within the file and to have
  // compressed_size == size; throws Error(Record) otherwise.
  uint8_t* stored_data(const ZipRecord& r) const;
  ByteView stored_view(const ZipRecord& r) const { return {file, stored_data(r), static_cast<size_t>(r.size)}; }
};

}  // namespace fastckpt
