#include "core/zip_index.h"

#include "core/errors.h"

namespace fastckpt {

uint32_t ZipRecord::alignment() const noexcept {
  uint32_t a = 1;
  while (a < 4096 && data_offset % (a * 2) == 0) a *= 2;
  return a;
}

ZipIndex ZipIndex::parse(const uint8_t*, size_t, const ZipLimits&) {
  fail(ErrorKind::Format, "zip index: work in progress");
}

const ZipRecord* ZipIndex::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &records_[it->second];
}

}  // namespace fastckpt
