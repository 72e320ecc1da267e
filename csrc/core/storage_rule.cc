#include "core/storage_rule.h"

#include "core/checked_math.h"
#include "core/errors.h"

namespace fastckpt {
namespace {

bool ascii(const std::string& s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) > 0x7f) return false;
  return true;
}

// Text, or bytes read as ASCII text (torch's _maybe_decode_ascii).
bool as_text(const PidItem& item, std::string* out) {
  if (item.kind == PidItem::Kind::Text || (item.kind == PidItem::Kind::Bytes && ascii(item.text))) {
    *out = item.text;
    return true;
  }
  return false;
}

std::string describe(const PidItem& item) {
  switch (item.kind) {
    case PidItem::Kind::Text:  // text from the file: bounded in messages
      if (item.text.size() <= 64) return "the string '" + item.text + "'";
      return "a string of " + std::to_string(item.text.size()) + " bytes";
    case PidItem::Kind::Bytes: return "a bytes object";
    case PidItem::Kind::Integer: return "the integer " + std::to_string(item.integer);
    case PidItem::Kind::Other: return item.text;
  }
  return "?";
}

}  // namespace

StorageId judge_persistent_id(const PersistentId& pid) {
  if (!pid.tuple || pid.count != PersistentId::kItems)
    fail(ErrorKind::UnsafeGlobal, "persistent id must be a 5-tuple ('storage', type, key, location, numel), got " +
                                      (pid.tuple ? "a tuple of " + std::to_string(pid.count) + " items" : pid.what));
  const PidItem* t = pid.items;
  const bool text_tag = t[0].kind == PidItem::Kind::Text || t[0].kind == PidItem::Kind::Bytes;
  if (!text_tag || t[0].text != "storage")  // bytes: ASCII, as the tag is
    fail(ErrorKind::UnsafeGlobal, "only persistent ids of storages are allowed, got one tagged " + describe(t[0]));
  StorageId id;
  if (t[2].kind != PidItem::Kind::Text) fail(ErrorKind::Metadata, "storage key is " + describe(t[2]) + ", not a string");
  id.key = t[2].text;
  if (!as_text(t[3], &id.location))
    fail(ErrorKind::Metadata, "storage '" + id.key + "' has location " + describe(t[3]) + ", not a string");
  if (t[4].kind != PidItem::Kind::Integer || t[4].integer < 0)
    fail(ErrorKind::Metadata, "storage '" + id.key + "' has numel " + describe(t[4]) + ", not a non-negative integer");
  id.numel = static_cast<uint64_t>(t[4].integer);
  return id;
}

uint64_t storage_nbytes(const StorageId& id, uint32_t itemsize) {
  uint64_t nbytes;
  if (!checked_mul(id.numel, itemsize, &nbytes))
    fail(ErrorKind::Metadata, "storage '" + id.key + "' has " + std::to_string(id.numel) + " elements of " +
                                  std::to_string(itemsize) + " bytes: more than 2^64 bytes");
  return nbytes;
}

void check_record_holds(const ZipRecord& r, uint64_t nbytes) {
  if (r.size != nbytes)
    fail(ErrorKind::Record, "record '" + r.name + "' holds " + std::to_string(r.size) + " bytes but its storage needs " +
                                std::to_string(nbytes));
}

}  // namespace fastckpt
