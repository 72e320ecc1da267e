#include "core/zip_index.h"

#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "core/checked_math.h"
#include "core/errors.h"

namespace fastckpt {
namespace {

constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kDescriptorSig = 0x08074b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;

constexpr size_t kLocalSize = 30;
constexpr size_t kCentralSize = 46;
constexpr size_t kEndSize = 22;
constexpr size_t kZip64EndSize = 56;  // with no extensible data: "size of record" = 44
constexpr size_t kZip64LocatorSize = 20;
constexpr size_t kMaxComment = 0xFFFF;

constexpr uint16_t kFlagEncrypted = 1u << 0;
constexpr uint16_t kFlagDescriptor = 1u << 3;
constexpr uint16_t kFlagUtf8 = 1u << 11;

constexpr uint16_t kExtraZip64 = 0x0001;
constexpr uint32_t kMax32 = 0xFFFFFFFFu;
constexpr uint16_t kMax16 = 0xFFFFu;
constexpr uint64_t kMaxRecords = 0xFFFFFFFEu;  // record index + 1 fits a slot's low 32 bits

inline uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
inline uint32_t le32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}
inline uint64_t le64(const uint8_t* p) { return uint64_t{le32(p)} | uint64_t{le32(p + 4)} << 32; }

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

[[noreturn]] void bad(const std::string& what) { fail(ErrorKind::Format, "malformed zip archive: " + what); }

// Printable ASCII form of an untrusted name for messages (other bytes
// escaped, length capped): a hostile name can neither forge nor flood the
// message, nor make it invalid UTF-8 (Python decodes it).
std::string quoted(const uint8_t* p, size_t n) {
  std::string out = "'";
  const size_t shown = n < 200 ? n : 200;
  for (size_t i = 0; i < shown; ++i) {
    if (p[i] < 0x20 || p[i] >= 0x7f || p[i] == '\'' || p[i] == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", p[i]);
      out += buf;
    } else {
      out += static_cast<char>(p[i]);
    }
  }
  if (shown < n) out += "...";
  return out + "'";
}

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(const uint8_t* p, size_t n) {
  size_t i = 0;
  while (i < n) {
    const uint8_t c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (n - i < len || p[i + 1] < lo || p[i + 1] > hi) return false;
    for (size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return false;
    i += len;
  }
  return true;
}

// Why a name's relative part (after "prefix/"), or the prefix itself, is
// refused; nullptr if it is a plain relative path: non-empty components
// separated by single '/', none of them "." or "..", no backslash, no NUL.
const char* bad_path(const uint8_t* p, size_t n) {
  if (n == 0) return "has nothing after the archive prefix";
  size_t start = 0;
  for (size_t i = 0; i <= n; ++i) {
    if (i < n) {
      if (p[i] == 0) return "contains a NUL byte";
      if (p[i] == '\\') return "contains a backslash";
      if (p[i] != '/') continue;
    }
    const size_t len = i - start;
    if (len == 0) return "has an empty path component";
    if (p[start] == '.' && (len == 1 || (len == 2 && p[start + 1] == '.')))
      return "has a '.' or '..' path component";
    start = i + 1;
  }
  return nullptr;
}

// The values of a ZIP64 extended-information field (id 0x0001).
struct Zip64Extra {
  const uint8_t* data = nullptr;  // nullptr: absent
  uint16_t size = 0;
};

// Walks the extra fields of a header: they must tile [p, p+n) exactly; at
// most one ZIP64 field; other ids (torch's 'FB' padding, timestamps) are
// skipped. Returns nullptr or the reason the block is refused.
const char* scan_extra(const uint8_t* p, size_t n, Zip64Extra* zip64) {
  size_t i = 0;
  while (i < n) {
    if (n - i < 4) return "extra field block ends inside a field header";
    const uint16_t id = le16(p + i);
    const uint16_t len = le16(p + i + 2);
    if (n - i - 4 < len) return "extra field runs past the end of its block";
    if (id == kExtraZip64) {
      if (zip64->data != nullptr) return "two ZIP64 extra fields";
      zip64->data = p + i + 4;
      zip64->size = len;
    }
    i += 4 + size_t{len};
  }
  return nullptr;
}

// A local-header value agrees with the central directory's when it is equal,
// or 0 when the entry leaves it to its data descriptor.
bool local_value_agrees(uint64_t local, uint64_t central, bool deferred) {
  return local == central || (deferred && local == 0);
}

class Parser {
 public:
  Parser(const uint8_t* data, size_t size, const ZipLimits& limits)
      : p_(data), size_(size), limits_(limits) {}

  // Reads and cross-checks the end records; returns the entry count, checked
  // against the central directory's size and the limits.
  size_t read_end_records() {
    find_end_records();
    // Every central entry takes at least 46 bytes, so the count is bounded by
    // the directory's size (itself inside the file) before anything is sized by it.
    if (count_ == 0) bad("the archive has no records");
    if (count_ > cd_size_ / kCentralSize)
      bad("the end record claims " + std::to_string(count_) + " entries, more than a central directory of " +
          std::to_string(cd_size_) + " bytes can hold");
    const uint64_t max_records = limits_.max_records < kMaxRecords ? limits_.max_records : kMaxRecords;
    if (count_ > max_records)
      fail(ErrorKind::Limit, "the archive has " + std::to_string(count_) + " records, over the limit of " +
                                 std::to_string(max_records));
    return static_cast<size_t>(count_);
  }

  uint64_t cd_offset() const noexcept { return cd_offset_; }

  // Reads the `count` central entries and their local headers into
  // `records` (reserved by the caller); insert(i) registers records[i]'s
  // name and returns the index of an earlier record with that name, or i.
  template <typename Insert>
  void read_entries(size_t count, std::string* prefix, std::vector<ZipRecord>* records, Insert insert) {
    uint64_t pos = cd_offset_;           // next central entry
    const uint64_t cd_end = cd_offset_ + cd_size_;
    uint64_t cursor = 0;                 // where the next local header must start
    for (size_t i = 0; i < count; ++i) {
      Central c = read_central(i, pos, cd_end);
      if (i == 0) *prefix = take_prefix(c);
      check_name(c, *prefix);
      if (c.header_offset != cursor) {
        if (i == 0) bad(what(c) + ": the first local header is at offset " + std::to_string(c.header_offset) +
                        ", not 0 (data before the archive)");
        const std::string rule = " (entries must follow each other, in central-directory order)";
        if (c.header_offset < cursor)
          bad(what(c) + ": its local header at offset " + std::to_string(c.header_offset) +
              " overlaps the previous entry, which ends at " + std::to_string(cursor) + rule);
        bad(what(c) + ": its local header is at offset " + std::to_string(c.header_offset) + ", leaving " +
            std::to_string(c.header_offset - cursor) + " unaccounted bytes after the previous entry" + rule);
      }
      ZipRecord& r = records->emplace_back();
      r.name.assign(reinterpret_cast<const char*>(c.name) + prefix->size() + 1, c.name_len - prefix->size() - 1);
      r.header_offset = c.header_offset;
      r.compressed_size = c.compressed_size;
      r.size = c.size;
      r.crc32 = c.crc32;
      r.method = static_cast<Method>(c.method);  // checked to be 0 or 8
      r.flags = c.flags;
      cursor = read_local(c, &r.data_offset);
      const size_t first = insert(i);
      if (first != i)
        bad(what(c) + ": duplicate name (also central directory entry " + std::to_string(first) + ")");
    }
    if (pos != cd_end)
      bad(std::to_string(cd_end - pos) + " bytes left in the central directory after its " + std::to_string(count) +
          " entries (at offset " + std::to_string(pos) + ")");
    if (cursor != cd_offset_)
      bad(std::to_string(cd_offset_ - cursor) + " unaccounted bytes between the last entry (ending at " +
          std::to_string(cursor) + ") and the central directory at " + std::to_string(cd_offset_));
  }

 private:
  struct Central {
    size_t index;
    uint64_t offset;  // of the central entry
    const uint8_t* name;
    uint16_t name_len;
    uint16_t flags;
    uint16_t method;
    uint32_t crc32;
    uint64_t compressed_size;
    uint64_t size;
    uint64_t header_offset;
  };

  std::string what(const Central& c) const {
    return "central directory entry " + std::to_string(c.index) + " (" + quoted(c.name, c.name_len) +
           ", at offset " + std::to_string(c.offset) + ")";
  }

  void find_end_records() {
    if (size_ < kEndSize)
      fail(ErrorKind::Format, "not a zip archive: " + std::to_string(size_) +
                                  " bytes is too short for an end-of-central-directory record");
    // The record is 22 bytes plus a comment of at most 64 KiB: search only
    // that far back, and take the last signature, as Python's zipfile does.
    const size_t lowest = size_ - kEndSize > kMaxComment ? size_ - kEndSize - kMaxComment : 0;
    size_t eocd = size_ - kEndSize;
    while (le32(p_ + eocd) != kEndSig) {
      if (eocd == lowest)
        fail(ErrorKind::Format, "not a zip archive, or truncated: no end-of-central-directory record in its last " +
                                    std::to_string(size_ - lowest) + " bytes");
      --eocd;
    }
    const uint8_t* e = p_ + eocd;
    const uint64_t end = eocd + kEndSize + le16(e + 20);
    if (end != size_) {
      if (end < size_)
        bad(std::to_string(size_ - end) + " trailing bytes after the end-of-central-directory record at offset " +
            std::to_string(eocd));
      bad("the comment of the end-of-central-directory record at offset " + std::to_string(eocd) +
          " runs past the end of the file (truncated?)");
    }
    const uint16_t disk = le16(e + 4), cd_disk = le16(e + 6);
    const uint16_t disk_entries = le16(e + 8), entries = le16(e + 10);
    const uint32_t cd_size = le32(e + 12), cd_offset = le32(e + 16);

    uint64_t records_start = eocd;  // where the central directory must end
    const bool zip64 = eocd >= kZip64LocatorSize && le32(e - kZip64LocatorSize) == kZip64LocatorSig;
    if (zip64) {
      const uint8_t* loc = e - kZip64LocatorSize;
      const uint64_t z_offset = le64(loc + 8);
      if (le32(loc + 4) != 0 || le32(loc + 16) > 1)
        bad("the ZIP64 end locator describes a multi-disk archive (not supported)");
      // The ZIP64 end record must sit right before its locator, with no
      // extensible data: a different position means a prefix or a lie.
      const uint64_t expected = eocd - kZip64LocatorSize;
      if (expected < kZip64EndSize || z_offset != expected - kZip64EndSize)
        bad("the ZIP64 end locator points to offset " + std::to_string(z_offset) +
            ", but the ZIP64 end record must end where the locator starts (offset " + std::to_string(expected) +
            ")" + (expected >= kZip64EndSize && z_offset < expected - kZip64EndSize ? " (data before the archive?)" : ""));
      const uint8_t* z = p_ + z_offset;
      if (le32(z) != kZip64EndSig) bad("no ZIP64 end record at offset " + std::to_string(z_offset));
      if (le64(z + 4) != kZip64EndSize - 12)
        bad("the ZIP64 end record at offset " + std::to_string(z_offset) + " has size " +
            std::to_string(le64(z + 4)) + " (extensible data is not supported)");
      if (le32(z + 16) != 0 || le32(z + 20) != 0)
        bad("the ZIP64 end record describes a multi-disk archive (not supported)");
      count_ = le64(z + 32);
      cd_size_ = le64(z + 40);
      cd_offset_ = le64(z + 48);
      if (le64(z + 24) != count_)
        bad("the ZIP64 end record counts " + std::to_string(le64(z + 24)) + " entries on this disk but " +
            std::to_string(count_) + " in total");
      // Readers that ignore ZIP64 use the classic fields: they must say the
      // same thing or be saturated (0xFFFF / 0xFFFFFFFF, "see ZIP64").
      auto agree = [&](uint64_t classic, uint64_t saturated, uint64_t z64, const char* field) {
        if (classic != saturated && classic != z64)
          bad(std::string("the end-of-central-directory record and the ZIP64 end record disagree on the ") + field +
              " (" + std::to_string(classic) + " vs " + std::to_string(z64) + ")");
      };
      agree(disk, kMax16, 0, "disk number");
      agree(cd_disk, kMax16, 0, "central directory disk");
      agree(disk_entries, kMax16, count_, "entries on this disk");
      agree(entries, kMax16, count_, "entry count");
      agree(cd_size, kMax32, cd_size_, "central directory size");
      agree(cd_offset, kMax32, cd_offset_, "central directory offset");
      records_start = z_offset;
    } else {
      if (disk != 0 || cd_disk != 0) bad("the end-of-central-directory record describes a multi-disk archive (not supported)");
      if (disk_entries != entries)
        bad("the end-of-central-directory record counts " + std::to_string(disk_entries) + " entries on this disk but " +
            std::to_string(entries) + " in total");
      // Saturated fields mean "see the ZIP64 record" to some readers and a
      // literal value to others: ambiguous without one.
      if (entries == kMax16 || cd_size == kMax32 || cd_offset == kMax32)
        bad("the end-of-central-directory record has saturated (ZIP64) fields but there is no ZIP64 end record");
      count_ = entries;
      cd_size_ = cd_size;
      cd_offset_ = cd_offset;
    }
    uint64_t cd_end;
    if (!checked_add(cd_offset_, cd_size_, &cd_end) || cd_end != records_start) {
      std::string hint;
      if (checked_add(cd_offset_, cd_size_, &cd_end) && cd_end < records_start)
        hint = " (" + std::to_string(records_start - cd_end) + " bytes unaccounted for: data before the archive?)";
      bad("the central directory (offset " + std::to_string(cd_offset_) + ", " + std::to_string(cd_size_) +
          " bytes) does not end where the end records start (offset " + std::to_string(records_start) + ")" + hint);
    }
  }

  Central read_central(size_t index, uint64_t& pos, uint64_t cd_end) {
    Central c{};
    c.index = index;
    c.offset = pos;
    if (cd_end - pos < kCentralSize)
      bad("central directory entry " + std::to_string(index) + " at offset " + std::to_string(pos) +
          " runs past the end of the central directory (the entry count says " + std::to_string(count_) + ")");
    const uint8_t* h = p_ + pos;
    if (le32(h) != kCentralSig)
      bad("central directory entry " + std::to_string(index) + " at offset " + std::to_string(pos) +
          " has no central header signature");
    c.flags = le16(h + 8);
    c.method = le16(h + 10);
    c.crc32 = le32(h + 16);
    const uint32_t comp32 = le32(h + 20), size32 = le32(h + 24);
    c.name_len = le16(h + 28);
    const uint16_t extra_len = le16(h + 30), comment_len = le16(h + 32), disk = le16(h + 34);
    const uint32_t offset32 = le32(h + 42);
    const uint64_t total = kCentralSize + uint64_t{c.name_len} + extra_len + comment_len;
    c.name = h + kCentralSize;
    if (cd_end - pos < total)
      bad("central directory entry " + std::to_string(index) + " at offset " + std::to_string(pos) +
          " runs past the end of the central directory");
    pos += total;

    if (c.flags & kFlagEncrypted) bad(what(c) + " is encrypted (flag bit 0); encryption is not supported");
    if (c.flags & ~(kFlagDescriptor | kFlagUtf8))
      bad(what(c) + " has unsupported general-purpose flags " + hex(c.flags) + " (only bits 3 and 11 are accepted)");
    if (c.method != 0 && c.method != 8)
      bad(what(c) + " uses compression method " + std::to_string(c.method) + " (only 0, stored, and 8, deflate)");
    if (disk != 0) bad(what(c) + " starts on disk " + std::to_string(disk) + " (multi-disk archives are not supported)");

    Zip64Extra z;
    if (const char* why = scan_extra(c.name + c.name_len, extra_len, &z)) bad(what(c) + ": " + why);
    // The ZIP64 field holds exactly the saturated fields, in this order.
    const uint8_t* zp = z.data;
    size_t needed = 0;
    auto wide = [&](uint32_t v32) -> uint64_t {
      if (v32 != kMax32) return v32;
      needed += 8;
      if (z.data == nullptr || z.size < needed) bad(what(c) + ": a saturated size or offset has no ZIP64 value");
      const uint64_t v = le64(zp);
      zp += 8;
      return v;
    };
    c.size = wide(size32);
    c.compressed_size = wide(comp32);
    c.header_offset = wide(offset32);
    if (z.data != nullptr && z.size != needed)
      bad(what(c) + ": its ZIP64 extra field has " + std::to_string(z.size) + " bytes, expected " +
          std::to_string(needed));
    if (c.method == 0 && c.compressed_size != c.size)
      bad(what(c) + " is stored but its compressed size " + std::to_string(c.compressed_size) +
          " differs from its size " + std::to_string(c.size));
    return c;
  }

  std::string take_prefix(const Central& c) {
    const void* slash = std::memchr(c.name, '/', c.name_len);
    if (slash == nullptr) bad(what(c) + ": the name is not inside an archive directory ('prefix/name')");
    const size_t n = static_cast<size_t>(static_cast<const uint8_t*>(slash) - c.name);
    if (n == 0) bad(what(c) + ": absolute path");
    if (const char* why = bad_path(c.name, n)) bad(what(c) + ": the archive prefix " + why);
    return std::string(reinterpret_cast<const char*>(c.name), n);
  }

  void check_name(const Central& c, const std::string& prefix) {
    if (c.name_len > limits_.max_name_length)
      fail(ErrorKind::Limit, what(c) + ": name of " + std::to_string(c.name_len) + " bytes, over the limit of " +
                                 std::to_string(limits_.max_name_length));
    const size_t n = prefix.size();
    if (c.name_len <= n || c.name[n] != '/' || std::memcmp(c.name, prefix.data(), n) != 0)
      bad(what(c) + ": the name does not start with the archive prefix " +
          quoted(reinterpret_cast<const uint8_t*>(prefix.data()), prefix.size()));
    // Without flag bit 11 a name is CP437 to some readers: only ASCII reads
    // the same everywhere. With it, the bytes must be UTF-8.
    if (c.flags & kFlagUtf8) {
      if (!valid_utf8(c.name, c.name_len)) bad(what(c) + ": the name is not valid UTF-8");
    } else {
      for (size_t i = 0; i < c.name_len; ++i)
        if (c.name[i] >= 0x80) bad(what(c) + ": non-ASCII name without the UTF-8 flag (bit 11)");
    }
    if (const char* why = bad_path(c.name + n + 1, c.name_len - n - 1)) bad(what(c) + ": the name " + why);
  }

  // Checks the local header (and data descriptor) of `c` against it; returns
  // the offset just past the entry and sets *data_offset.
  uint64_t read_local(const Central& c, uint64_t* data_offset) {
    const uint64_t o = c.header_offset;
    auto at = [&](const char* s) {
      return "local header of " + quoted(c.name, c.name_len) + " at offset " + std::to_string(o) + ": " + s;
    };
    // Entries may not reach into the central directory.
    const uint64_t limit = cd_offset_;
    if (!range_within(o, kLocalSize, limit)) bad(at("runs into the central directory"));
    const uint8_t* h = p_ + o;
    if (le32(h) != kLocalSig) bad(at("no local header signature"));
    const uint16_t flags = le16(h + 6), method = le16(h + 8);
    const uint32_t crc = le32(h + 14), comp32 = le32(h + 18), size32 = le32(h + 22);
    const uint16_t name_len = le16(h + 26), extra_len = le16(h + 28);
    const uint64_t header_size = kLocalSize + uint64_t{name_len} + extra_len;
    if (!range_within(o, header_size, limit)) bad(at("runs into the central directory"));
    if (flags != c.flags)
      bad(at("flags ") + hex(flags) + " differ from the central directory's " + hex(c.flags));
    if (method != c.method)
      bad(at("method ") + std::to_string(method) + " differs from the central directory's " +
          std::to_string(c.method));
    if (name_len != c.name_len || std::memcmp(h + kLocalSize, c.name, name_len) != 0)
      bad(at("name ") + quoted(h + kLocalSize, name_len) + " differs from the central directory's");

    Zip64Extra z;
    if (const char* why = scan_extra(h + kLocalSize + name_len, extra_len, &z)) bad(at(why));
    const bool deferred = (flags & kFlagDescriptor) != 0;
    // The local ZIP64 field is (size, compressed size), optionally followed by
    // this header's offset; torch (miniz) also writes the offset alone.
    const bool z_sizes = z.data != nullptr && (z.size == 16 || z.size == 24);
    auto narrow_ok = [&](uint32_t v32, uint64_t central) {
      if (v32 == kMax32 && z_sizes) return true;  // the value is in the ZIP64 field
      return (central < kMax32 && v32 == central) || (deferred && v32 == 0);
    };
    bool sizes_ok = local_value_agrees(crc, c.crc32, deferred) && narrow_ok(size32, c.size) &&
                    narrow_ok(comp32, c.compressed_size);
    if (z_sizes) {
      sizes_ok = sizes_ok && local_value_agrees(le64(z.data), c.size, deferred) &&
                 local_value_agrees(le64(z.data + 8), c.compressed_size, deferred);
      if (z.size == 24 && le64(z.data + 16) != o) bad(at("its ZIP64 extra field gives a different header offset"));
    } else if (z.data != nullptr) {
      if (z.size != 8) bad(at("ZIP64 extra field of ") + std::to_string(z.size) + " bytes (expected 8, 16 or 24)");
      if (le64(z.data) != o) bad(at("its ZIP64 extra field gives a different header offset"));
    }
    if (!sizes_ok) bad(at("CRC-32 or sizes differ from the central directory"));

    const uint64_t data = o + header_size;
    *data_offset = data;
    if (!range_within(data, c.compressed_size, limit))
      bad(at("its ") + std::to_string(c.compressed_size) + " bytes of data run into the central directory at offset " +
          std::to_string(limit));
    uint64_t end = data + c.compressed_size;
    if (!deferred) return end;

    // The descriptor's sizes are 8 bytes when the local header has a ZIP64
    // field (APPNOTE 4.3.9.2); torch always writes the optional signature and
    // so must every entry here, or where the next header starts is a guess.
    const uint64_t dd_size = z.data != nullptr ? 24 : 16;
    if (!range_within(end, dd_size, limit)) bad(at("its data descriptor runs into the central directory"));
    const uint8_t* d = p_ + end;
    if (le32(d) != kDescriptorSig)
      bad(at("no data descriptor signature at offset ") + std::to_string(end) + " (flag bit 3 is set)");
    const uint64_t d_comp = dd_size == 24 ? le64(d + 8) : le32(d + 8);
    const uint64_t d_size = dd_size == 24 ? le64(d + 16) : le32(d + 12);
    if (le32(d + 4) != c.crc32 || d_comp != c.compressed_size || d_size != c.size)
      bad(at("its data descriptor at offset ") + std::to_string(end) +
          " disagrees with the central directory on CRC-32 or sizes");
    return end + dd_size;
  }

  const uint8_t* p_;
  size_t size_;
  const ZipLimits& limits_;
  uint64_t count_ = 0;
  uint64_t cd_size_ = 0;
  uint64_t cd_offset_ = 0;
};

}  // namespace

uint32_t ZipRecord::alignment() const noexcept {
  uint32_t a = 1;
  while (a < 4096 && data_offset % (a * 2) == 0) a *= 2;
  return a;
}

ZipIndex ZipIndex::parse(const uint8_t* data, size_t size, const ZipLimits& limits) {
  ZipIndex index;
  Parser parser(data, size, limits);
  const size_t count = parser.read_end_records();
  index.cd_offset_ = parser.cd_offset();
  // Both sized by the count, which read_end_records bounded by the central
  // directory's size.
  index.records_.reserve(count);
  std::random_device entropy;  // a fresh secret key per archive
  index.hash_key_ = SipKey{(uint64_t{entropy()} << 32) | entropy(), (uint64_t{entropy()} << 32) | entropy()};
  size_t slots = 16;
  while (slots < 2 * count) slots *= 2;
  index.slots_.assign(slots, 0);
  parser.read_entries(count, &index.prefix_, &index.records_, [&index](size_t i) { return index.insert_name(i); });
  return index;
}

namespace {
// Slot layout: the low bits of the hash pick the slot, the high 32 are kept
// in it so most probes skip the name comparison.
constexpr uint64_t kTagMask = 0xFFFFFFFF00000000u;
}  // namespace

size_t ZipIndex::insert_name(size_t i) {
  const uint64_t h = siphash13(hash_key_, records_[i].name);
  const uint64_t tag = h & kTagMask;
  const size_t mask = slots_.size() - 1;
  for (size_t s = static_cast<size_t>(h) & mask;; s = (s + 1) & mask) {
    const uint64_t slot = slots_[s];
    if (slot == 0) {
      slots_[s] = tag | (i + 1);
      return i;
    }
    const size_t j = static_cast<size_t>(slot & ~kTagMask) - 1;
    if ((slot & kTagMask) == tag && records_[j].name == records_[i].name) return j;
  }
}

const ZipRecord* ZipIndex::find(std::string_view name) const {
  if (slots_.empty()) return nullptr;
  const uint64_t h = siphash13(hash_key_, name);
  const uint64_t tag = h & kTagMask;
  const size_t mask = slots_.size() - 1;
  for (size_t s = static_cast<size_t>(h) & mask;; s = (s + 1) & mask) {
    const uint64_t slot = slots_[s];
    if (slot == 0) return nullptr;
    const ZipRecord& r = records_[static_cast<size_t>(slot & ~kTagMask) - 1];
    if ((slot & kTagMask) == tag && r.name == name) return &r;
  }
}

}  // namespace fastckpt
