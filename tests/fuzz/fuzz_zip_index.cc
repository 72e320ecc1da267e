// Fuzz target: ZipIndex::parse on raw bytes. Besides memory errors, an
// accepted archive must keep the promises zip_index.h makes (records back to
// back inside the file and before the central directory, unique plain names,
// stored sizes that agree), and a refused one must fail with Format or Limit.
// Each input runs under the default limits and under tiny ones.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/checked_math.h"
#include "core/errors.h"
#include "core/zip_index.h"

namespace {

using fastckpt::ZipIndex;
using fastckpt::ZipLimits;
using fastckpt::ZipRecord;

// A plain relative path: non-empty components, no '.', '..', '\\' or NUL.
bool plain_path(const std::string& name) {
  size_t start = 0;
  for (size_t i = 0; i <= name.size(); ++i) {
    if (i < name.size()) {
      if (name[i] == '\0' || name[i] == '\\') return false;
      if (name[i] != '/') continue;
    }
    const std::string_view part(name.data() + start, i - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = i + 1;
  }
  return true;
}

volatile uint8_t sink;

[[noreturn]] void violated(const char* promise) {
  std::fprintf(stderr, "fuzz_zip_index: broken promise: %s\n", promise);
  std::abort();
}

void check_accepted(const ZipIndex& index, const uint8_t* data, size_t size, const ZipLimits& limits) {
  const auto& records = index.records();
  const uint64_t cd = index.central_directory_offset();
  if (records.empty() || records.size() > limits.max_records) violated("record count outside [1, max_records]");
  if (cd > size) violated("central directory offset past the end");
  if (!plain_path(index.prefix()) || index.prefix().find('/') != std::string::npos) violated("bad prefix");
  if (records[0].header_offset != 0) violated("data before the first record");
  uint64_t cursor = 0;  // end of the previous entry's data
  uint8_t digest = 0;
  for (const ZipRecord& r : records) {
    const uint64_t header_size = 30 + index.prefix().size() + 1 + r.name.size();
    uint64_t data_end;
    if (r.header_offset < cursor || r.data_offset < r.header_offset + header_size ||
        !fastckpt::checked_add(r.data_offset, r.compressed_size, &data_end) || data_end > cd)
      violated("records overlap, or run past the central directory");
    cursor = data_end;
    const auto method = static_cast<uint16_t>(r.method);  // the raw value: the index must only let 0 and 8 through
    if ((method != 0 && method != 8) || (method == 0 && r.compressed_size != r.size))
      violated("unknown method, or a stored record whose sizes differ");
    if (r.flags & ~0x0808u) violated("flags other than bits 3 and 11");
    if (r.name.size() + index.prefix().size() + 1 > limits.max_name_length) violated("name over max_name_length");
    if (!plain_path(r.name)) violated("a name that is not a plain relative path");
    if (index.find(r.name) != &r) violated("a name that is duplicated, or not found");
    const uint32_t a = r.alignment();
    if (a == 0 || a > 4096 || (a & (a - 1)) != 0 || r.data_offset % a != 0) violated("bad alignment()");
    // The record's bytes are inside the input: touching them is safe.
    if (r.compressed_size != 0) digest ^= data[r.data_offset] ^ data[data_end - 1];
    const ZipRecord* other = index.find(r.name + "/x");
    if (other != nullptr && other->name != r.name + "/x") violated("find() returned another name");
  }
  sink = digest;
}

void run(const uint8_t* data, size_t size, const ZipLimits& limits) {
  try {
    check_accepted(ZipIndex::parse(data, size, limits), data, size, limits);
  } catch (const fastckpt::Error& e) {
    if (e.kind() != fastckpt::ErrorKind::Format && e.kind() != fastckpt::ErrorKind::Limit)
      violated("an error other than Format or Limit");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  run(data, size, ZipLimits{});
  ZipLimits tiny;
  tiny.max_records = 4;
  tiny.max_name_length = 24;
  run(data, size, tiny);
  return 0;
}
