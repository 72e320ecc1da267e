// What a storage reference in a data pickle must be, and what its record must
// hold. torch.save pickles every storage as the persistent id
//   ('storage', storage type, key, location, numel)
// and writes its bytes to the record "data/<key>": numel elements of the
// storage type's size. Both pickle builders (the native one and the
// torch-free reader) and the Python fallback (through the binding
// `storage_reference`) judge references by these rules and no others.
#pragma once

#include <cstdint>
#include <string>

#include "core/zip_index.h"

namespace fastckpt {

// One item of a pickled persistent id, as the bindings convert it (the core
// sees no Python objects).
struct PidItem {
  enum class Kind : uint8_t { Text, Bytes, Integer, Other };
  Kind kind = Kind::Other;
  // Text: the string (UTF-8). Bytes: the bytes. Other: what it is, for
  // messages ("an object of type list", "an int that does not fit in 64 bits").
  std::string text;
  int64_t integer = 0;  // Integer
};

// A pickled persistent id as the bindings convert it. Reused across calls by
// the builders, so its strings keep their capacity.
struct PersistentId {
  static constexpr size_t kItems = 5;
  bool tuple = false;   // else `what` says what it is
  size_t count = 0;     // the tuple's items
  PidItem items[kItems];  // converted when count == kItems (items[1], the storage type, is not judged)
  std::string what;
};

// The parts of a storage reference the core judges. The storage type (item 1)
// stays with the caller: which objects are storage types, and of what element
// size, is the builder's knowledge.
struct StorageId {
  std::string key;       // the record is "data/<key>"
  std::string location;  // the tag torch.save wrote: "cpu", "cuda:0"...
  uint64_t numel = 0;
};

// Error(UnsafeGlobal) unless `pid` is a 5-tuple whose first item is
// "storage"; Error(Metadata) unless the key is a string, the location a
// string and numel a non-negative integer. Like torch (_maybe_decode_ascii),
// the tag and the location may also be ASCII bytes (Python 2 pickles read
// with encoding="bytes"); the key may not (torch would look up "data/b'0'").
StorageId judge_persistent_id(const PersistentId& pid);

// numel * itemsize bytes; Error(Metadata) naming the storage when it does not
// fit in 64 bits.
uint64_t storage_nbytes(const StorageId& id, uint32_t itemsize);

// Error(Record) unless record `r` (a storage's "data/<key>") holds exactly
// `nbytes` bytes.
void check_record_holds(const ZipRecord& r, uint64_t nbytes);

}  // namespace fastckpt
