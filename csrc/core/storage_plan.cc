#include "core/storage_plan.h"

#include <algorithm>
#include <cstring>

#include "core/copy_engine.h"
#include "core/errors.h"

namespace fastckpt {
namespace {

constexpr std::string_view kDataPrefix = "data/";

// torch.save's keys "0", "1", ... as an index below `bound`.
bool decimal_key(std::string_view key, size_t bound, size_t* out) {
  if (key.empty() || key.size() > 9 || (key.size() > 1 && key[0] == '0')) return false;
  size_t v = 0;
  for (char c : key) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<size_t>(c - '0');
  }
  *out = v;
  return v < bound;
}

std::string record_name(std::string_view key) { return std::string(kDataPrefix).append(key); }

}  // namespace

LocationRule LocationRule::constant(std::string target) {
  LocationRule r(Kind::Constant);
  r.constant_ = std::move(target);
  return r;
}

LocationRule LocationRule::table(std::unordered_map<std::string, std::string> table) {
  LocationRule r(Kind::Table);
  r.table_ = std::move(table);
  return r;
}

std::optional<std::string> LocationRule::target(std::string_view location) const {
  switch (kind_) {
    case Kind::Unchanged: return std::string(location);
    case Kind::Constant: return constant_;
    case Kind::Table: {
      auto it = table_.find(std::string(location));
      return it != table_.end() ? it->second : std::string(location);
    }
    case Kind::PerStorage: return std::nullopt;
  }
  return std::nullopt;
}

std::optional<std::vector<std::string>> LocationRule::named_targets() const {
  switch (kind_) {
    case Kind::Unchanged: return std::vector<std::string>{};
    case Kind::Constant: return std::vector<std::string>{constant_};
    case Kind::Table: {
      std::vector<std::string> values;
      for (const auto& [tag, target] : table_) values.push_back(target);
      return values;
    }
    case Kind::PerStorage: return std::nullopt;
  }
  return std::nullopt;
}

StoragePlan::StoragePlan(std::shared_ptr<const Archive> archive, Mode mode, LocationRule rule, bool native_cpu)
    : archive_(std::move(archive)), mode_(mode), rule_(std::move(rule)), native_cpu_(native_cpu) {
  // One sequential pass over the index: random probes into a large index cost a cache miss each.
  const auto& records = archive_->index.records();
  const Source source = mode_ == Mode::Mapped ? Source::Mapped : mode_ == Mode::Arena ? Source::Arena : Source::Meta;
  for (const ZipRecord& r : records) {
    if (r.name.compare(0, kDataPrefix.size(), kDataPrefix) != 0) continue;
    std::string_view key = std::string_view(r.name).substr(kDataPrefix.size());
    Entry e;
    e.record = &r;
    e.source = source;
    size_t i;
    if (decimal_key(key, records.size(), &i)) {
      if (i >= numbered_.size()) numbered_.resize(i + 1);
      numbered_[i] = e;
    } else {
      named_.emplace(std::string(key), e);
    }
  }
  for (size_t i = 0; i < numbered_.size(); ++i) numbered_[i].id = i;
  size_t next = numbered_.size();
  for (auto& [key, e] : named_) e.id = next++;
}

StoragePlan::~StoragePlan() = default;

bool StoragePlan::native(std::string_view location) const {
  if (!native_cpu_ || mode_ == Mode::Meta) return false;
  std::optional<std::string> t = rule_.target(location);
  return t && *t == "cpu";
}

StoragePlan::Entry* StoragePlan::find_mutable(std::string_view key) {
  return const_cast<Entry*>(static_cast<const StoragePlan*>(this)->find(key));
}

const StoragePlan::Entry* StoragePlan::find(std::string_view key) const {
  size_t i;
  if (decimal_key(key, numbered_.size(), &i)) return numbered_[i].record != nullptr ? &numbered_[i] : nullptr;
  auto it = named_.find(std::string(key));
  return it != named_.end() ? &it->second : nullptr;
}

void StoragePlan::stage(std::string_view key) {
  Entry* e = find_mutable(key);
  if (e == nullptr || started_) fail(ErrorKind::Record, "cannot stage record '" + record_name(key) + "'");
  e->source = Source::Staged;
}

void StoragePlan::adopt(std::string_view key, const uint8_t* data, size_t size) {
  Entry* e = find_mutable(key);
  if (e == nullptr || started_ || mode_ != Mode::Arena || e->record->size != size)
    fail(ErrorKind::Record, "cannot adopt the bytes of record '" + record_name(key) + "'");
  std::shared_ptr<MappedFile> own = size != 0 ? MappedFile::heap(size) : nullptr;
  if (size != 0) std::memcpy(own->mutable_data(), data, size);
  e->bytes = {own, own ? own->mutable_data() : nullptr, size};
  e->source = Source::Inflated;
}

std::vector<std::string> StoragePlan::deflated_keys() const {
  std::vector<std::string> keys;
  auto add = [&](const Entry& e) {
    if (e.record != nullptr && e.record->method != Method::Stored && e.source == Source::Arena)
      keys.push_back(e.record->name.substr(kDataPrefix.size()));
  };
  for (const Entry& e : numbered_) add(e);
  for (const auto& [key, e] : named_) add(e);
  return keys;
}

void StoragePlan::start(bool check_crc, unsigned threads) {
  if (started_) return;
  started_ = true;
  // The records this plan reads (Arena) or checks (Mapped), in file order.
  std::vector<Entry*> mine;
  auto collect = [&](Entry& e) {
    if (e.record != nullptr && e.source == (mode_ == Mode::Arena ? Source::Arena : Source::Mapped)) mine.push_back(&e);
  };
  for (Entry& e : numbered_) collect(e);
  for (auto& [key, e] : named_) collect(e);
  std::sort(mine.begin(), mine.end(), [](const Entry* a, const Entry* b) { return a->record->data_offset < b->record->data_offset; });

  if (mode_ == Mode::Arena) {
    std::vector<const ZipRecord*> records;
    records.reserve(mine.size());
    for (size_t i = 0; i < mine.size(); ++i) {
      records.push_back(mine[i]->record);
      mine[i]->job_index = i;
    }
    job_ = std::make_unique<ReadJob>(archive_, std::move(records), check_crc, threads);
    for (Entry* e : mine) e->bytes = job_->memory(e->job_index);
  } else if (mode_ == Mode::Mapped) {
    std::vector<CopyTask> tasks;
    std::vector<const ZipRecord*> checked;
    for (Entry* e : mine) {
      if (e->record->method != Method::Stored) continue;  // refused when used: a mapping cannot view deflated bytes
      e->bytes = archive_->stored_view(*e->record);
      if (check_crc) {
        tasks.push_back({e->record->data_offset, e->record->size, nullptr, true});
        checked.push_back(e->record);
      }
    }
    if (!tasks.empty()) {
      // Over a fresh read-only mapping: the file's bytes, not private writes of the load's own.
      std::shared_ptr<MappedFile> view = MappedFile::shared_view(*archive_->file);
      std::vector<CopyResult> results = run_copies(view ? *view : *archive_->file, tasks, threads);
      for (size_t i = 0; i < checked.size(); ++i) fastckpt::check_crc(*checked[i], results[i].crc32);
    }
  }
}

const StoragePlan::Entry& StoragePlan::lookup(std::string_view key) const {
  const Entry* e = find(key);
  if (e == nullptr) fail(ErrorKind::Record, "record '" + record_name(key) + "' not found in the archive");
  return *e;
}

const StoragePlan::Entry& StoragePlan::entry(std::string_view key, uint64_t nbytes) const {
  const Entry* e = &lookup(key);
  const ZipRecord& r = *e->record;
  if (e->source == Source::Meta) return *e;  // no bytes are read: torch checks no size either
  if (r.size != nbytes)
    fail(ErrorKind::Record, "record '" + r.name + "' holds " + std::to_string(r.size) +
                                " bytes but its storage needs " + std::to_string(nbytes));
  if (e->source == Source::Mapped && r.method != Method::Stored)
    fail(ErrorKind::Record, "record '" + r.name + "' is compressed; mmap=True needs stored records (load with mmap=False)");
  return *e;
}

void StoragePlan::wait(const Entry& e) {
  if (e.source != Source::Arena) return;
  if (!job_) fail(ErrorKind::Record, "record '" + e.record->name + "' is read before the load started");
  job_->wait_record(e.job_index);
}

void StoragePlan::finish() {
  if (job_) job_->wait();
}

}  // namespace fastckpt
