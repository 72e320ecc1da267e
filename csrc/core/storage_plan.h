// The storage plan of one load, decided before the pickle runs: for every
// storage record ("data/<key>") where its bytes come from, and for every
// location tag where map_location sends it. The unpickler (native or Python)
// asks the plan for a storage's bytes; nothing else keeps a map of records.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/archive.h"
#include "core/read_job.h"

namespace fastckpt {

// Where torch.load sends a storage tagged `location` (torch's rules for a
// map_location of None, a string or device, or a dict), fixed once per load.
// A callable map_location decides per storage: target() has no answer.
class LocationRule {
 public:
  enum class Kind : uint8_t { Unchanged, Constant, Table, PerStorage };
  static LocationRule unchanged() { return LocationRule(Kind::Unchanged); }
  static LocationRule constant(std::string target);
  // Tags in `table` go where it says; others stay where they are.
  static LocationRule table(std::unordered_map<std::string, std::string> table);
  static LocationRule per_storage() { return LocationRule(Kind::PerStorage); }

  Kind kind() const noexcept { return kind_; }
  std::optional<std::string> target(std::string_view location) const;
  // The targets map_location names itself (a constant, a dict's values; none
  // when tags are kept); nullopt when it decides per storage. A storage goes
  // to one of these or stays where its tag says.
  std::optional<std::vector<std::string>> named_targets() const;

 private:
  explicit LocationRule(Kind kind) : kind_(kind) {}
  Kind kind_;
  std::string constant_;
  std::unordered_map<std::string, std::string> table_;
};

class StoragePlan {
 public:
  // The load's mode: zero-copy views of the mapping (mmap=True), an eager
  // parallel read into memory of each record's own, or no bytes at all
  // (map_location="meta").
  enum class Mode : uint8_t { Mapped, Arena, Meta };
  // Where one storage's bytes come from. Staged: read and copied to a device
  // by another reader (the device stager), never through this plan's memory.
  // Inflated: a deflated record, inflated by the caller and adopted.
  enum class Source : uint8_t { Mapped, Arena, Meta, Staged, Inflated };

  // `native_cpu`: whether storages that stay on the CPU may be made over the
  // plan's bytes as they are (false when bytes must be swapped or a
  // deserializer registered ahead of torch's could claim them).
  StoragePlan(std::shared_ptr<const Archive> archive, Mode mode, LocationRule rule, bool native_cpu);
  ~StoragePlan();  // joins the eager reader
  StoragePlan(const StoragePlan&) = delete;
  StoragePlan& operator=(const StoragePlan&) = delete;

  Mode mode() const noexcept { return mode_; }
  const Archive& archive() const noexcept { return *archive_; }
  std::optional<std::string> target(std::string_view location) const { return rule_.target(location); }
  std::optional<std::vector<std::string>> named_targets() const { return rule_.named_targets(); }
  // Whether a storage tagged `location` is made natively, as a CPU storage
  // over the plan's bytes (else the Python path restores it, asking bytes()).
  bool native(std::string_view location) const;

  // Before start(): storage `key` goes to a device through another reader.
  void stage(std::string_view key);
  // Before start(), Arena mode: the inflated bytes of a deflated record
  // (copied into memory of the plan's; their CRC was checked by the caller).
  void adopt(std::string_view key, const uint8_t* data, size_t size);
  // Deflated records an Arena load must be given with adopt().
  std::vector<std::string> deflated_keys() const;
  // Starts the eager read (Arena), or checks every mapped record's CRC-32 up
  // front when `check_crc` (Mapped; throws Error(Integrity)).
  void start(bool check_crc, unsigned threads);

  struct Entry {
    const ZipRecord* record = nullptr;
    Source source = Source::Meta;
    size_t job_index = SIZE_MAX;  // Arena: its record's index in the read job
    ByteView bytes;               // Mapped, Arena (complete after wait), Inflated
    size_t id = 0;                // dense, below entry_count(): callers index their own tables by it
  };
  size_t entry_count() const noexcept { return numbered_.size() + named_.size(); }
  // The storage `key`, or nullptr when the archive has no record for it.
  const Entry* find(std::string_view key) const;
  // The storage `key`; throws Error(Record) when it has no record.
  const Entry& lookup(std::string_view key) const;
  // The same for a storage of `nbytes` bytes; throws Error(Record) when its
  // record is of another size or (Mapped) compressed.
  const Entry& entry(std::string_view key, uint64_t nbytes) const;
  // Blocks until the entry's bytes are read and checked (Arena); throws
  // Error(Integrity) on a CRC mismatch.
  void wait(const Entry& e);
  // Waits for every read; throws for the first failure or CRC mismatch.
  void finish();

 private:
  Entry* find_mutable(std::string_view key);

  std::shared_ptr<const Archive> archive_;
  Mode mode_;
  LocationRule rule_;
  bool native_cpu_;
  bool started_ = false;
  // torch.save names storages "0", "1", ...: those index a vector; any other key a map.
  std::vector<Entry> numbered_;
  std::unordered_map<std::string, Entry> named_;
  std::unique_ptr<ReadJob> job_;
};

}  // namespace fastckpt
