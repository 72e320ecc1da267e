#include "core/archive.h"

#include <cstdio>

#include "core/checked_math.h"
#include "core/errors.h"

namespace fastckpt {

CrcStatus judge_crc(const ZipRecord& r, uint32_t actual) noexcept {
  if (r.crc32 == 0 && r.size != 0) return CrcStatus::Unrecorded;
  return r.crc32 == actual ? CrcStatus::Ok : CrcStatus::Mismatch;
}

const char* crc_status_name(CrcStatus s) noexcept {
  switch (s) {
    case CrcStatus::Ok: return "ok";
    case CrcStatus::Mismatch: return "mismatch";
    case CrcStatus::Unrecorded: return "unrecorded";
  }
  return "?";
}

void check_crc(const ZipRecord& r, uint32_t actual, const std::string& file, const std::vector<std::string>& keys) {
  if (judge_crc(r, actual) != CrcStatus::Mismatch) return;
  std::string where = "record '" + r.name + "'";
  if (!file.empty()) where += " of " + file;
  where += " (data at offset " + std::to_string(r.data_offset);
  if (!keys.empty()) {
    where += keys.size() == 1 ? "; storage of tensor " : "; storage of tensors ";
    for (size_t i = 0; i < keys.size() && i < 4; ++i) where += (i ? ", '" : "'") + keys[i] + "'";
    if (keys.size() > 4) where += ", ...";
  }
  char crcs[64];
  std::snprintf(crcs, sizeof crcs, "stored 0x%08x, computed 0x%08x", r.crc32, actual);
  throw Error(ErrorKind::Integrity,
              "CRC-32 mismatch in " + where + "): " + crcs +
                  "; the file is corrupted (run `fastckpt verify` for a full report)",
              r.name, keys);
}

std::string describe_record(const ZipRecord& r) {
  return "record '" + r.name + "' (data at offset " + std::to_string(r.data_offset) + ")";
}

const ZipRecord& Archive::record(const std::string& name) const {
  const ZipRecord* r = index.find(name);
  if (r == nullptr) fail(ErrorKind::Record, "record '" + name + "' not found in the archive");
  return *r;
}

uint8_t* Archive::stored_data(const ZipRecord& r) const {
  if (r.method != Method::Stored)
    fail(ErrorKind::Record, describe_record(r) + " is compressed (method " + std::to_string(static_cast<int>(r.method)) +
                                ") and cannot be viewed in place");
  if (r.compressed_size != r.size || !range_within(r.data_offset, r.size, file->size()))
    fail(ErrorKind::Record, describe_record(r) + " does not lie within the file");
  // SAFETY: data_offset + size was checked against the mapping's size above.
  return file->mutable_data() + r.data_offset;
}

}  // namespace fastckpt
